"""`blt prepare`: corpus files -> tensorstore token arrays; then, given a trained entropy model, the
precomputed next-byte entropies (as BLT precomputes them for training) and a patching threshold
calibrated on the held-out split to the target mean patch length.

Both stages run in one process or as a multi-process job over `jax.distributed` (a pod preparing the corpus
it trains on), with the same result for any number of processes:

- tokens: every process tokenises a contiguous, size-balanced share of the input files (sorted by name)
  into its own staging arrays in the store; then each copies a contiguous run of whole shards of the final
  arrays from the staging arrays (no shard is written by two processes), and process 0 writes the manifest.
  A single process writes the final arrays directly, unless it replaces a store (`--overwrite`): then it
  stages its tokens too, so that the old store stays whole until the new corpus is read to the end.
- entropies: the missing shards are shared among the processes; each call of the entropy model is one
  batch sharded over every device of every process (a fixed number of rows per device, so a row's values
  do not depend on how many devices there are).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from blt_jax.config import ConfigError, PatchingConfig
from blt_jax.data import corpus, sources, store
from blt_jax.patching import calibrate_threshold
from blt_jax.tokenizer import BOS_ID, EOS_ID, OFFSET

# The entropy stage's modules (flax, the model, orbax checkpoints) are imported where they are used: preparing
# tokens needs none of them, and importing them costs seconds and hundreds of MB.

ENTROPY_CHUNK = 1024  # new tokens per row; dense attention cost grows with (context + chunk)^2
# rows per device per call, whatever the device count: every device runs the same (rows, width) program, so
# a row's entropies are the same bits on 1 device or on 2 processes x 4 (XLA's numerics depend on shapes)
ENTROPY_ROWS_PER_DEVICE = 16
CALIBRATION_MAX_TOKENS = 1 << 22  # the calibration sample: at most this many held-out tokens are read
_COPY_SHARDS = 16  # shards per read/write while assembling the final arrays (bounded memory)


@dataclass(frozen=True)
class Processes:
    """This process's place in the job, and a barrier across it (a no-op for one process)."""

    index: int = 0
    count: int = 1

    @classmethod
    def current(cls) -> Processes:
        return cls(jax.process_index(), jax.process_count())

    def barrier(self, name: str) -> None:
        if self.count > 1:
            multihost_utils.sync_global_devices(name)


# ---- tokens -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CorpusPlan:
    """What a store will hold: the input files in store order, where each text file goes, and the options
    that decide the content (their digest tells a re-run of the same command from a different corpus)."""

    files: tuple[sources.InputFile, ...]
    text_split: dict  # text file name -> "train", "heldout" or None (left out by max_train_bytes)
    description: str
    options: dict

    @property
    def digest(self) -> str:
        # a split key enters only where it differs from the name, so stores made before keys existed still match
        files = [(f.name, f.format, f.size, f.mtime_ns) + ((f.split_name,) if f.split_name != f.name else ())
                 for f in self.files]
        text = json.dumps({"files": files, "options": self.options}, sort_keys=True)
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()

    def matches(self, manifest: dict | None) -> bool:
        return manifest is not None and manifest.get("source_digest") == self.digest


def plan_corpus(data: Sequence[str] | None = None, heldout_fraction: float = 0.02,
                max_train_bytes: int | None = None, text_field: str = "text",
                shard_tokens: int = store.WRITE_CHUNK, store_root: str | None = None) -> CorpusPlan:
    """The embedded default corpus (CPython's standard library source and docs text), or the user's files,
    folders and glob patterns. Text files are held out whole by a hash of their path relative to the input
    that names them (`sources.find_inputs`; with at least one file on each side when every input is a text
    file); records one by one, by a hash of (that path, line or row).

    `max_train_bytes` (text files only) keeps a deterministic pseudo-random subset of the training files
    (ordered by a hash of the same relative paths the split uses, so the subset spans the whole corpus and does
    not depend on where it lies on disk) up to that many bytes; the held-out split is never truncated.

    Files under `store_root` (the store being written, when it lies inside an input folder) are never inputs."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if max_train_bytes is not None and max_train_bytes < 1:  # 0 would empty the train split and blame the fraction
        raise ConfigError(f"--max-train-bytes: must be >= 1 (leave it out to keep every training file), "
                          f"got {max_train_bytes}")
    if data:
        roots = sources.find_inputs(data, exclude=store_root)
        paths = sorted(roots, key=lambda f: f.as_posix())
        base = corpus.common_root(paths)
        description = "user files: " + ", ".join(str(d) for d in data)
    else:
        paths, roots = corpus.default_corpus_files(), None
        base = corpus.stdlib_root()
        description = corpus.default_corpus_description()
    files = sources.input_files(paths, base, roots)
    texts = [f for f in files if not f.has_records]
    if len(texts) == len(files):
        held = corpus.heldout_indices([f.split_name for f in texts], heldout_fraction)
        text_split = {f.name: "heldout" if i in held else "train" for i, f in enumerate(texts)}
    else:
        text_split = {f.name: "heldout" if corpus.split_key(f.split_name) < heldout_fraction else "train"
                      for f in texts}
    if max_train_bytes is not None:
        if len(texts) != len(files):
            raise ConfigError("--max-train-bytes selects whole text files; it does not apply to record files "
                              "(.jsonl, .parquet)")
        kept, total = set(), 0
        for f in sorted((f for f in texts if text_split[f.name] == "train"),
                        key=lambda f: (hashlib.sha256(f.split_name.encode()).digest(), f.name)):
            if total >= max_train_bytes:
                break
            kept.add(f.name)
            total += f.size
        text_split = {n: s if s != "train" or n in kept else None for n, s in text_split.items()}
        description += f" (training split capped at {max_train_bytes} bytes)"
    files = sorted(files, key=lambda f: f.name)
    options = {"heldout_fraction": heldout_fraction, "max_train_bytes": max_train_bytes, "text_field": text_field,
               "shard_tokens": shard_tokens, "description": description}
    return CorpusPlan(tuple(files), text_split, description, options)


def file_shares(sizes: Sequence[int], count: int) -> list[range]:
    """Contiguous ranges of the files for `count` processes, balanced by bytes on disk (deterministic): a file
    goes to the process whose byte range holds its middle."""
    sizes = np.asarray(sizes, np.float64)
    total = sizes.sum()
    if total > 0:
        owner = np.minimum((np.cumsum(sizes) - sizes / 2) * count // total, count - 1)
    else:
        owner = np.arange(len(sizes)) * count // max(len(sizes), 1)
    return [range(int(np.searchsorted(owner, p, "left")), int(np.searchsorted(owner, p, "right")))
            for p in range(count)]


def _tokenize(files: Sequence[sources.InputFile], plan: CorpusPlan, threshold: float, writers: dict,
              bad: sources.BadRecords, progress: bool) -> tuple[list[dict], int, Optional[list[float]]]:
    """Documents of `files` -> the split writers (a record is held out when its split key lies below
    `threshold`); returns (per-file {split: {docs, bytes}}, empty records, the lowest and highest split key of
    the records written (None without records))."""
    entries, empty, lo, hi = [], 0, 1.0, -1.0
    bos, eos = np.array([BOS_ID], np.uint16), np.array([EOS_ID], np.uint16)
    with tqdm(total=sum(f.size for f in files), unit="B", unit_scale=True, desc="prepare",
              disable=not progress) as bar:
        for f in files:
            stats = {split: {"docs": 0, "bytes": 0} for split in store.SPLITS}
            if not f.has_records:
                split = plan.text_split[f.name]
                if split is not None:
                    writers[split].add(bos)
                    for piece in sources.text_pieces(f):
                        writers[split].add(np.frombuffer(piece, np.uint8).astype(np.uint16) + OFFSET)
                        stats[split]["bytes"] += len(piece)
                    writers[split].add(eos)
                    stats[split]["docs"] = 1
            else:
                for chunk in sources.records(f, plan.options["text_field"], bad):
                    empty += chunk.empty
                    keys = np.fromiter((corpus.split_key(f.split_name, int(k)) for k in chunk.numbers), np.float64,
                                       len(chunk.numbers))
                    if len(keys):
                        lo, hi = min(lo, float(keys.min())), max(hi, float(keys.max()))
                    held = keys < threshold
                    for split, keep in (("train", ~held), ("heldout", held)):
                        if keep.any():
                            part = chunk.select(keep)
                            writers[split].add(store.encode_documents(part.data, part.lengths))
                            stats[split]["docs"] += len(part.lengths)
                            stats[split]["bytes"] += int(part.lengths.sum())
            bar.update(f.size)
            entries.append({"name": f.name, **stats})
    return entries, empty, ([lo, hi] if hi >= 0 else None)


def _one_sided_threshold(plan: CorpusPlan, reports: list[dict]) -> Optional[float]:
    """A record corpus small enough to put every document on one side of the held-out fraction (80 records at
    0.02 hold none out one time in five): the threshold that moves the one record whose split key lies
    nearest the other side, so both splits hold documents. None when both already do (or when fewer than two
    documents exist: `_manifest` refuses that). Text files move only when every input is a text file, and
    `corpus.heldout_indices` has already put one on each side then."""
    docs = {split: sum(e[split]["docs"] for r in reports for e in r["files"]) for split in store.SPLITS}
    keys = [r["record_keys"] for r in reports if r["record_keys"] is not None]
    if not keys or min(docs.values()) > 0 or sum(docs.values()) < 2:
        return None
    fraction = plan.options["heldout_fraction"]
    lowest, highest = min(k[0] for k in keys), max(k[1] for k in keys)
    if docs["heldout"] == 0 and fraction <= lowest < 1.0:  # hold out the record with the lowest key
        return float(np.nextafter(lowest, 1.0))
    if docs["train"] == 0 and highest < fraction:  # keep the record with the highest key for training
        return highest
    return None


def _manifest(root, plan: CorpusPlan, reports: list[dict], threshold: float) -> dict:
    """The store's manifest from every process's report; refuses an empty split. `threshold`: the split key
    below which records were held out (the held-out fraction, unless `_one_sided_threshold` moved it)."""
    entries = [e for r in reports for e in r["files"]]
    bad = sum(r["bad_records"] for r in reports)
    manifest = {
        "format_version": store.FORMAT_VERSION, "corpus": plan.description, "tokenizer": "bytes+4 (BOS=1, EOS=2)",
        "source_digest": plan.digest, "shard_tokens": plan.options["shard_tokens"],
        "inputs": {"files": len(plan.files), "text_field": plan.options["text_field"],
                   "heldout_fraction": plan.options["heldout_fraction"], "bad_records": bad,
                   "bad_record_examples": [x for r in reports for x in r["bad_examples"]][:10],
                   "empty_records": sum(r["empty_records"] for r in reports)},
    }
    if threshold != plan.options["heldout_fraction"]:
        manifest["inputs"]["heldout_threshold"] = threshold
    for split in store.SPLITS:
        docs = sum(e[split]["docs"] for e in entries)
        size = sum(e[split]["bytes"] for e in entries)
        if docs == 0:
            why = f" ({bad} bad records skipped)" if bad else ""
            if not entries or all(e["train"]["docs"] + e["heldout"]["docs"] == 0 for e in entries):
                raise ValueError(f"empty corpus: {plan.description} holds no documents{why}")
            raise ValueError(f"cannot prepare {root}: the {split} split has no documents{why} (every record was "
                             f"assigned to the other one; choose another --heldout-fraction or add data)")
        manifest[split] = {"num_docs": docs, "num_tokens": size + 2 * docs,
                           "files": [{"name": e["name"], "docs": e[split]["docs"], "bytes": e[split]["bytes"]}
                                     for e in entries if e[split]["docs"]]}
    return manifest


def write_corpus(root: str, plan: CorpusPlan, *, strict: bool = False, overwrite: bool = False,
                 progress: bool = False) -> dict:
    """Tokenise `plan` into the store at `root` and write its manifest (last); returns the manifest.

    A store that already holds this plan's corpus (same files, sizes, times and options) is kept as it is;
    one holding anything else is refused unless `overwrite`, and then removed only once every process has
    tokenised its share (a truncated input file leaves it as it was). Runs as one process or as all processes
    of a `jax.distributed` job (every process calls it with the same arguments)."""
    procs = Processes.current()
    made_folder = store.new_local_folder(root)  # a failed first prepare removes the folder it made
    existing = store.manifest_or_none(root)
    if existing is not None and not overwrite:
        if plan.matches(existing):
            store.check_tokens(root)  # kept as it is only if whole: a re-run says a damaged store is damaged
            return existing
        raise ConfigError(f"--store {root}: already holds a data store ({existing.get('corpus', 'unknown corpus')}); "
                          "--overwrite replaces it, with its entropies and threshold")
    store.refuse_foreign_files(root)  # here too (clear checks again): every process stops before the barrier
    procs.barrier("blt_jax: prepare: store inspected")  # every process decided before anything changes
    staged = procs.count > 1 or existing is not None
    if not staged:  # one process, no store to keep: only what an interrupted prepare left
        store.clear(root)
    shard = plan.options["shard_tokens"]
    share = file_shares([f.size for f in plan.files], procs.count)[procs.index]

    def location(split):
        return (store.STAGING, f"{procs.index}-of-{procs.count}", split, "tokens") if staged else (split, "tokens")

    def tokenise(threshold: float, attempt: str):
        arrays = {split: store.create_array(root, location(split), np.uint16, store.GROWING, shard)
                  for split in store.SPLITS}
        writers = {split: store.StreamWriter(a) for split, a in arrays.items()}
        bad = sources.BadRecords(strict)
        entries, empty, keys = _tokenize([plan.files[i] for i in share], plan, threshold, writers, bad,
                                         progress and procs.index == 0)
        report = {"lengths": {split: w.close() for split, w in writers.items()}, "files": entries,
                  "bad_records": bad.count, "bad_examples": bad.examples, "empty_records": empty,
                  "record_keys": keys}
        if not staged:
            return arrays, report, [report]
        store.write_json(root, f"{store.STAGING}/report-{procs.index}-of-{procs.count}.json", report)
        procs.barrier(f"blt_jax: prepare: shares tokenised{attempt}")
        return arrays, report, [store.read_json(root, f"{store.STAGING}/report-{q}-of-{procs.count}.json")
                                for q in range(procs.count)]

    threshold = plan.options["heldout_fraction"]
    try:
        arrays, report, reports = tokenise(threshold, "")
        moved = _one_sided_threshold(plan, reports)
        if moved is not None:  # every process sees the same reports, so all of them tokenise again
            threshold = moved
            procs.barrier("blt_jax: prepare: reports read")  # nobody rewrites a report another is still reading
            arrays, report, reports = tokenise(threshold, " again")
        manifest = _manifest(root, plan, reports, threshold)
    except BaseException:  # a bad input, Ctrl-C: the old store is untouched, so leave nothing of the new one
        if staged:
            _drop_staging(root, procs)
        else:
            _drop_first_store(root, made_folder)
        raise
    if staged:
        procs.barrier("blt_jax: prepare: corpus staged")  # the old store goes only once every share is read
        if procs.index == 0:
            store.clear(root, keep_staging=True)
        _assemble(root, reports, procs, shard)
    else:
        for split, a in arrays.items():
            store.set_length(a, report["lengths"][split])
    procs.barrier("blt_jax: prepare: tokens assembled")
    if procs.index == 0:
        if staged:
            store.delete_prefix(root, store.STAGING + "/")
        store.write_json(root, store.MANIFEST, manifest)
    procs.barrier("blt_jax: prepare: manifest written")
    return manifest


def _drop_staging(root: str, procs: Processes) -> None:
    """Remove what this process staged: all of `_staging/` when it is the only process (earlier leftovers
    too), else only its own part (a peer may still be writing its own)."""
    mine = f"{procs.index}-of-{procs.count}"
    prefixes = ([f"{store.STAGING}/"] if procs.count == 1
                else [f"{store.STAGING}/{mine}/", f"{store.STAGING}/report-{mine}.json"])
    try:
        for prefix in prefixes:
            store.delete_prefix(root, prefix)
    except Exception:  # the error that brought us here is the one to report, not this one
        pass


def _drop_first_store(root: str, made_folder: Optional[str]) -> None:
    """Remove what a failed prepare wrote where no store was (one process): its arrays, and the folder when
    this prepare made it, so nothing that looks like a store is left."""
    try:
        store.clear(root)
        if made_folder is not None:
            store.remove_folder_if_empty(made_folder)
    except Exception:  # the error that brought us here is the one to report, not this one
        pass


def _assemble(root: str, reports: list[dict], procs: Processes, shard: int) -> None:
    """The final token arrays from every process's staging arrays; each process writes whole shards."""
    lengths = {split: [r["lengths"][split] for r in reports] for split in store.SPLITS}
    if procs.index == 0:
        for split in store.SPLITS:
            store.create_array(root, (split, "tokens"), np.uint16, sum(lengths[split]), shard)
    procs.barrier("blt_jax: prepare: final arrays created")
    for split in store.SPLITS:
        offsets = np.cumsum([0] + lengths[split][:-1])
        # staging arrays keep their GROWING length: nominal, so their shards are not checked
        parts = [(int(offset), store.open_array(root, store.STAGING, f"{q}-of-{procs.count}", split, "tokens",
                                                expect_complete=False)[:n])
                 for q, (offset, n) in enumerate(zip(offsets, lengths[split], strict=True)) if n]
        total = sum(lengths[split])
        mine = store.shard_range(-(-total // shard), procs.index, procs.count)
        dest = store.open_array(root, split, "tokens", write=True)
        store.copy_regions(dest, parts, mine.start * shard, min(mine.stop * shard, total), _COPY_SHARDS * shard)


def prepare_corpus(root: str, data: Sequence[str] | None = None, heldout_fraction: float = 0.02,
                   max_train_bytes: int | None = None, *, text_field: str = "text", strict: bool = False,
                   overwrite: bool = False, shard_tokens: int = store.WRITE_CHUNK, progress: bool = False) -> dict:
    """plan_corpus + write_corpus: tokenise a corpus into a store at `root`; returns the manifest."""
    plan = plan_corpus(data, heldout_fraction, max_train_bytes, text_field, shard_tokens, store_root=root)
    return write_corpus(root, plan, strict=strict, overwrite=overwrite, progress=progress)


# ---- entropies --------------------------------------------------------------------------------------------

def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def params_digest(params) -> str:
    """A digest of a parameter tree's values (names, dtypes, shapes, bytes): which model made a store's
    entropies. Replicated multi-process arrays are read from this process's copy."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)
        value = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{_path_name(path)}|{value.dtype}|{value.shape}|".encode())
        h.update(value.tobytes())
    return "sha256:" + h.hexdigest()


@functools.cache
def _entropy_program(em_cfg, devices: tuple) -> tuple:
    """(jitted params, tokens -> entropies with rows sharded over `devices`, the mesh); one per model shape,
    so a process that computes entropies several times compiles once."""
    from flax import nnx  # noqa: PLC0415

    from blt_jax import model as model_lib  # noqa: PLC0415
    from blt_jax.model.entropy_model import entropies  # noqa: PLC0415

    devices = sorted(devices, key=lambda d: (d.process_index, d.id))  # each process's rows contiguous
    mesh = Mesh(np.array(devices), ("data",))
    graphdef, _ = model_lib.abstract_state(em_cfg)
    fn = jax.jit(lambda p, tokens: entropies(nnx.merge(graphdef, p)(tokens)[0]),
                 out_shardings=NamedSharding(mesh, P("data")))
    return fn, mesh


def make_entropy_fn(run_dir: str | Path):
    """(fn, context, rows, digest) for an entropy-model run: `fn` maps this process's `rows` rows of
    (context + ENTROPY_CHUNK) tokens to their entropies, as its part of one batch sharded over every device
    of every process (all processes call it together); `digest` identifies the parameters."""
    from blt_jax.train import checkpoint as ckpt  # noqa: PLC0415

    kind, cfg, _ = ckpt.load_run_config(run_dir)
    if kind != "entropy":
        raise ConfigError(f"entropy_run: {run_dir} holds a {kind!r} run, not an entropy model")
    em_cfg = cfg.model.entropy_model
    fn, mesh = _entropy_program(em_cfg, tuple(jax.devices()))
    by_row = NamedSharding(mesh, P("data"))
    params = ckpt.load_trained_params(run_dir, expect_kind="entropy", sharding=NamedSharding(mesh, P()))

    def run(local: np.ndarray) -> np.ndarray:
        x = jax.make_array_from_process_local_data(by_row, local, (local.shape[0] * jax.process_count(),
                                                                  local.shape[1]))
        shards = sorted(fn(params, x).addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards])

    stack = em_cfg.stack
    # receptive field n_layers * window, but training never showed the model more than seq_len tokens
    context = min(stack.n_layers * (stack.window or cfg.data.seq_len), cfg.data.seq_len)
    return run, context, ENTROPY_ROWS_PER_DEVICE * jax.local_device_count(), params_digest(params)


def add_entropies(root: str, entropy_run: str | Path, progress: bool = True, overwrite: bool = False) -> str:
    """Precompute the entropies of both splits with the given entropy model; returns "computed", "resumed"
    (an interrupted computation by the same model finished, or shard files lost from finished entropies
    computed again) or "complete" (nothing to do).

    The manifest first records the model and an unset completion mark (and loses any calibrated threshold);
    the mark is set after every shard of both splits is stored. Entropies of another model are replaced only
    with `overwrite`."""
    procs = Processes.current()
    fn, context, rows, digest = make_entropy_fn(entropy_run)
    manifest = store.read_manifest(root)
    state = store.entropy_state(manifest, digest)
    run = str(Path(entropy_run).absolute())
    if state == "complete" and not _lost_entropy_shards(root):
        return "complete"
    if state == "complete":  # shard files lost from a finished store: the same model computes just those again
        state = "partial"
        procs.barrier("blt_jax: entropies: lost shards listed")  # every process listed before the mark changes
        if procs.index == 0:
            store.update_manifest(root, entropies_complete=False)
    if (state == "other" or (state == "legacy" and manifest.get("entropy_run") != run)) and not overwrite:
        which = "an unfinished computation of entropies" if manifest.get("entropies_complete") is False else \
            "entropies"
        raise ConfigError(f"--store {root}: holds {which} by another entropy model ({manifest.get('entropy_run')}); "
                          f"--overwrite replaces them (and the calibrated threshold) with those of {entropy_run}")
    fresh = state != "partial"
    procs.barrier("blt_jax: entropies: store inspected")
    if procs.index == 0 and fresh:
        store.update_manifest(root, drop=store.THRESHOLD_FIELDS, format_version=store.FORMAT_VERSION,
                              entropy_run=run, entropy_model_digest=digest, entropies_complete=False)
        for split in store.SPLITS:
            store.delete_prefix(root, f"{split}/entropies/")
    procs.barrier("blt_jax: entropies: started")
    for split in store.SPLITS:
        store.compute_entropies(root, split, fn, ENTROPY_CHUNK, context, rows, index=procs.index, count=procs.count,
                                barrier=procs.barrier, progress=progress and procs.index == 0)
    if procs.index == 0:
        store.update_manifest(root, entropy_run=run, entropies_complete=True)  # the completion mark, last
    procs.barrier("blt_jax: entropies: complete")
    return "computed" if fresh else "resumed"


def _lost_entropy_shards(root: str) -> bool:
    for split in store.SPLITS:
        try:
            array = store.open_array(root, split, "entropies", expect_complete=False)
        except FileNotFoundError:
            return True
        if store.missing_shards(root, (split, "entropies"), array):
            return True
    return False


def check_entropy_run(store_root: str, entropy_run: str | Path, params=None) -> dict:
    """Refuse a store whose entropies are unfinished, unverifiable (written before completion marks) or made
    by another model than `entropy_run` (its `params`, if already loaded: e.g. a run's frozen copy); returns
    the manifest. Training calls this where it resolves its entropy model."""
    manifest = store.require_complete_entropies(store_root)
    if params is None:
        from blt_jax.train import checkpoint as ckpt  # noqa: PLC0415

        params = ckpt.load_trained_params(entropy_run, expect_kind="entropy")
    if manifest.get("entropy_model_digest") != params_digest(params):
        raise ConfigError(f"entropy_run: {entropy_run} is not the entropy model that computed the entropies of "
                          f"{store_root} (they come from {manifest.get('entropy_run')}); train with that one, or "
                          f"recompute them: `blt prepare --store {store_root} --entropy-run {entropy_run} --overwrite`")
    return manifest


def calibrate(root: str, patching: PatchingConfig, seq_len: int, target: float | None = None,
              max_windows: int = 4096, max_tokens: int = CALIBRATION_MAX_TOKENS) -> tuple[float, float]:
    """Calibrate the global entropy threshold on held-out windows (shaped like training windows) to the
    target mean patch length; store it in the manifest. Returns (threshold, achieved mean patch length).

    Reads a bounded sample: at most `max_windows` windows and `max_tokens` tokens, spread evenly over the
    held-out split (all of it when it is smaller)."""
    if patching.mode != "entropy":
        raise ConfigError(f"model.patching.mode: calibration applies to entropy patching, not {patching.mode!r}")
    if target is not None and not target > 1:  # model.patching.target_patch_length's own rule
        raise ConfigError(f"--target: a mean patch length must be > 1 byte per patch, got {target}")
    manifest = store.read_manifest(root)
    if store.entropy_state(manifest) == "none":
        raise ConfigError(f"{root}: no entropies; run `blt prepare --entropy-run RUN` first")
    store.require_complete_entropies(root, manifest)
    tokens = store.open_array(root, "heldout", "tokens")
    ent = store.open_array(root, "heldout", "entropies")
    available = (tokens.shape[0] - 1) // seq_len
    if available < 1:
        raise ValueError(f"{root}: the held-out split has {tokens.shape[0]} tokens, fewer than one "
                         f"{seq_len}-byte window")
    n = min(available, max_windows, max(1, max_tokens // seq_len))
    starts = (np.arange(n) * available // n) * seq_len
    reads = [(tokens[s:s + seq_len].read(), ent[s:s + seq_len].read()) for s in starts]
    tok_w = np.stack([t.result() for t, _ in reads]).astype(np.int32)
    ent_w = np.stack([e.result() for _, e in reads])
    threshold, achieved = calibrate_threshold(patching, tok_w, ent_w, target)
    if jax.process_index() == 0:
        store.update_manifest(root, patching_threshold=threshold,
                              patching_target=target or patching.target_patch_length, patching_achieved=achieved,
                              patching_rule=patching.rule, patching_max_patch_length=patching.max_patch_length,
                              patching_seq_len=seq_len)
    Processes.current().barrier("blt_jax: calibrated")
    return threshold, achieved


def ensure_entropies(root: str, entropy_run: str | Path, patching: PatchingConfig, seq_len: int, *,
                     overwrite: bool = False, progress: bool = True) -> dict:
    """Complete entropies of `entropy_run` and a calibrated threshold in the store, doing only what is
    missing (computing, resuming, calibrating). Returns {"entropies", "threshold", "mean_patch_length",
    "calibrated"}: entropies is add_entropies' status; calibrated says whether this call calibrated."""
    status = add_entropies(root, entropy_run, progress=progress, overwrite=overwrite)
    manifest = store.read_manifest(root)
    calibrated = status != "complete" or manifest.get("patching_threshold") is None
    if calibrated:
        calibrate(root, patching, seq_len)
        manifest = store.read_manifest(root)
    return {"entropies": status, "threshold": manifest["patching_threshold"],
            "mean_patch_length": manifest.get("patching_achieved"), "calibrated": calibrated}
