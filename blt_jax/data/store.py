"""The prepared data store: 1-D token and entropy arrays (zarr3 via tensorstore) plus `manifest.json`.

A store root is a local folder or any tensorstore kvstore URL (`file://`, `memory://`, `gs://`, ...); all
I/O goes through tensorstore, so a bucket behaves like a folder. Layout:

    {root}/manifest.json
    {root}/{split}/tokens      uint16: per document BOS, byte + 4 ..., EOS; documents concatenated
    {root}/{split}/entropies   float32, same length: the entropy model's prediction entropy at each token

Arrays are sharded: shards of `shard` elements (default 1M; the unit of writing and of resuming: every
shard is written whole, once, by one process, so a stored shard is a finished one) of 16K-element zstd
chunks (the unit of reading: a random window decodes ~32 KB, not a whole shard). Every shard within an
array's length is stored, fill values too, so a missing shard file is damage: `open_array` refuses it
(tensorstore would read zeros).

The manifest is written last: a store without one is unfinished and is never read. Entropies carry their
own completion mark (`entropies_complete`, written after every shard of both splits is stored) and the
digest of the entropy model that computed them (`entropy_model_digest`); the calibrated threshold is only
present with complete entropies.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import tensorstore as ts
from tqdm.auto import tqdm

from blt_jax.config import ConfigError
from blt_jax.data import first_few
from blt_jax.tokenizer import BOE_ID, BOS_ID, EOS_ID, OFFSET

FORMAT_VERSION = 2  # 2: entropies carry a completion mark and their model's digest
SPLITS = ("train", "heldout")
MANIFEST = "manifest.json"
WRITE_CHUNK = 1 << 20
READ_CHUNK = 1 << 14
_FLUSH_SHARDS = 4
GROWING = 1 << 40  # nominal length of an array whose length is not known yet (zarr stores only what is written)
STAGING = "_staging"  # per-process token arrays of a multi-process prepare, or of one replacing a store
# calibration fields: they describe a threshold, and go with it
THRESHOLD_FIELDS = ("patching_threshold", "patching_target", "patching_achieved", "patching_rule",
                    "patching_max_patch_length", "patching_seq_len")

# One context per process: `memory://` stores are only visible within a shared context, and the cache
# pool keeps recently read chunks and shard indexes.
_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 64 << 20}})


def kvstore_spec(root: str | os.PathLike, *parts: str) -> dict:
    """The tensorstore kvstore spec of `root` (a folder or a kvstore URL), joined with `parts` as a directory."""
    root = os.fspath(root)
    if "://" in root:
        spec = ts.KvStore.Spec(root).to_json()
    else:
        spec = {"driver": "file", "path": os.path.abspath(root)}
    path = spec.get("path", "")
    if path and not path.endswith("/"):
        path += "/"
    spec["path"] = path + "".join(p.strip("/") + "/" for p in parts)
    return spec


def _kvstore(root: str | os.PathLike) -> ts.KvStore:
    return ts.KvStore.open(kvstore_spec(root), context=_CONTEXT).result()


def _array_spec(root: str | os.PathLike, *parts: str, write: bool = False) -> dict:
    spec = {"driver": "zarr3", "kvstore": kvstore_spec(root, *parts)}
    if write:  # written data goes straight to storage: the read cache would only hold on to it
        spec["context"] = {"cache_pool": {"total_bytes_limit": 0}}
    return spec


def _prefix_range(prefix: str) -> ts.KvStore.KeyRange:
    return ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))


def delete_prefix(root: str | os.PathLike, prefix: str) -> None:
    """Delete every key under `prefix` (a folder name ending in '/', or one key), and a local folder it empties
    (tensorstore removes the folders below it, not that one)."""
    _kvstore(root).delete_range(_prefix_range(prefix)).result()
    spec = kvstore_spec(root)
    if prefix.endswith("/") and spec.get("driver") == "file":
        remove_folder_if_empty(os.path.join(spec["path"], prefix))


def new_local_folder(root: str | os.PathLike) -> str | None:
    """The folder of a local store that does not exist yet (the caller is about to make it), else None."""
    spec = kvstore_spec(root)
    path = spec["path"].rstrip("/")
    return path if spec.get("driver") == "file" and not os.path.lexists(path) else None


def remove_folder_if_empty(folder: str) -> None:
    with contextlib.suppress(OSError):  # gone already, or holds something (another writer's keys): leave it
        os.rmdir(folder)


def write_json(root: str | os.PathLike, key: str, value) -> None:
    _kvstore(root).write(key, json.dumps(value, indent=2, sort_keys=True).encode()).result()


def read_json(root: str | os.PathLike, key: str):
    result = _kvstore(root).read(key).result()
    return json.loads(result.value) if result.state == "value" else None


# ---- manifest ---------------------------------------------------------------------------------------------

def _is_a_file(root: str | os.PathLike) -> bool:
    """Whether a local `root` (or file:// URL) names a plain file, where a store's folder should be."""
    spec = kvstore_spec(root)
    return spec.get("driver") == "file" and os.path.isfile(spec["path"].rstrip("/"))


def _manifest_or_why_not(raw: bytes) -> tuple[dict | None, str]:
    """(the manifest, "") when `raw` is a data store's manifest (a JSON object with `format_version`, as every
    format wrote one), else (None, why not): a `manifest.json` of the user's own is neither read nor deleted as
    ours."""
    try:
        manifest = json.loads(raw)
    except ValueError as e:  # invalid JSON or invalid UTF-8
        return None, f"invalid JSON: {e}"
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        return None, "no format_version: not written by blt prepare"
    return manifest, ""


def read_manifest(root: str | os.PathLike) -> dict:
    result = _kvstore(root).read(MANIFEST).result()
    if result.state != "value":
        if _is_a_file(root):
            raise FileNotFoundError(f"no data store at {root}: it is a file, not a folder")
        raise FileNotFoundError(f"no data store at {root}: {MANIFEST} is missing (prepare the data first)")
    manifest, why = _manifest_or_why_not(result.value)
    if manifest is None:
        raise ValueError(f"{root}: {MANIFEST} is not a blt data store manifest ({why})")
    return manifest


def manifest_or_none(root: str | os.PathLike) -> dict | None:
    """The store's manifest; None where there is none, or where `manifest.json` is not a store's (a file of the
    user's own: `refuse_foreign_files` names it, and nothing may replace it)."""
    try:
        return read_manifest(root)
    except (FileNotFoundError, ValueError):
        return None


def _write_manifest(root: str | os.PathLike, manifest: dict) -> None:
    write_json(root, MANIFEST, manifest)


def update_manifest(root: str | os.PathLike, drop: Sequence[str] = (), **fields) -> dict:
    """Merge `fields` into the manifest's top level (e.g. a calibrated threshold), remove `drop`, rewrite it."""
    manifest = {k: v for k, v in read_manifest(root).items() if k not in drop}
    manifest.update(fields)
    _write_manifest(root, manifest)
    return manifest


def refuse_foreign_files(root: str | os.PathLike) -> None:
    """ConfigError when `root` is a file, or holds keys that are not a store's (its manifest, staging, arrays
    under the splits): the user's own files, which `clear` must never take with it. Only the exact manifest key
    is the store's, and only when it holds a store's manifest (`manifest.json.bak`, or an application's own
    `manifest.json`, is the user's)."""
    if _is_a_file(root):
        raise ConfigError(f"--store {root}: is a file, not a folder; nothing was changed: give a new or empty folder")
    kv = _kvstore(root)
    keys = sorted(k.decode() for k in kv.list().result())
    arrays = {k[:-len("zarr.json")] for k in keys if k.endswith("/zarr.json") and k.split("/", 1)[0] in SPLITS}
    foreign = [k for k in keys
               if not (k == MANIFEST or k.startswith(STAGING + "/") or any(k.startswith(a) for a in arrays))]
    if MANIFEST in keys:
        manifest, why = _manifest_or_why_not(kv.read(MANIFEST).result().value)
        if manifest is None:
            foreign.insert(0, f"{MANIFEST} ({why})")
    if foreign:
        raise ConfigError(f"--store {root}: holds files that are not a data store's ({first_few(foreign)}); nothing "
                          "was changed: give a new or empty folder")


def clear(root: str | os.PathLike, keep_staging: bool = False) -> None:
    """Remove a store's contents: the manifest first (so an interruption leaves no half-valid store), then
    its arrays and, unless `keep_staging` (the tokens of the prepare replacing them), any staging left by an
    interrupted prepare. A folder holding anything else is refused first (`refuse_foreign_files`), untouched."""
    refuse_foreign_files(root)
    _kvstore(root).delete_range(ts.KvStore.KeyRange(MANIFEST, MANIFEST + "\0")).result()  # that key, not namesakes
    for prefix in SPLITS if keep_staging else (*SPLITS, STAGING):
        delete_prefix(root, prefix + "/")  # local folders too: a cleared store leaves no empty split folders


# ---- arrays -----------------------------------------------------------------------------------------------

def has_array(root: str | os.PathLike, split: str, name: str) -> bool:
    return _kvstore(root).read(f"{split}/{name}/zarr.json").result().state == "value"


def open_array(root: str | os.PathLike, split: str, name: str, *more: str, write: bool = False,
               expect_complete: bool = True) -> ts.TensorStore:
    """A handle on `{root}/{split}/{name}` (read-only unless `write`). A read-only handle on a complete array
    (`expect_complete`: all but a resumable computation's or one still being written) is refused when a shard
    file is missing: tensorstore would read it as zeros."""
    try:
        array = ts.open(_array_spec(root, split, name, *more, write=write), context=_CONTEXT, open=True, read=True,
                        write=write).result()
    except ValueError as e:
        if "NOT_FOUND" in str(e):
            raise FileNotFoundError(f"data store {root} has no array {'/'.join((split, name, *more))}") from None
        raise
    if expect_complete and not write:
        _refuse_missing_shards(root, (split, name, *more), array)
    return array


def check_tokens(root: str | os.PathLike) -> None:
    """Refuse a store that lacks token shard files (`open_array`): what `blt prepare` would keep as it is and
    `blt train` would start a run on."""
    for split in SPLITS:
        open_array(root, split, "tokens")


def missing_shards(root: str | os.PathLike, parts: Sequence[str], array: ts.TensorStore) -> list[int]:
    """Shards within `array`'s length (the array at `{root}/{parts...}`) that have no stored file. Every shard
    of a finished array is stored, fill values included (`create_array`), so each one missing is damage (a
    deleted or partly copied file), or a computation still under way. One listing of the array's keys."""
    length = array.shape[0]
    if length >= GROWING:  # a nominal length: the array is still being written
        return []
    stored = _stored_shard_indices(root, "/".join(parts))
    return [s for s in range(-(-length // shard_size(array))) if s not in stored]


def _refuse_missing_shards(root: str | os.PathLike, parts: Sequence[str], array: ts.TensorStore) -> None:
    missing = missing_shards(root, parts, array)
    if not missing:
        return
    path = "/".join(parts)
    total = -(-array.shape[0] // shard_size(array))
    if parts[-1] == "entropies":  # the same model recomputes exactly the missing shards
        run = (manifest_or_none(root) or {}).get("entropy_run") or "ENTROPY_RUN"
        fix = f"recompute them with `blt prepare --store {root} --entropy-run {run}`"
    else:
        fix = f"prepare it again with `blt prepare --data ... --store {root} --overwrite`"
    raise ValueError(f"data store {root} is damaged: {path} is missing shard files "
                     f"{first_few(f'{path}/c/{s}' for s in missing)} ({len(missing)} of "
                     f"{total}), which would read as zeros; restore them from a good copy, or {fix}")


def shard_size(array: ts.TensorStore) -> int:
    return int(array.chunk_layout.write_chunk.shape[0])


def create_array(root: str | os.PathLike, parts: Sequence[str], dtype, length: int,
                 shard: int = WRITE_CHUNK) -> ts.TensorStore:
    """Create (replacing any) a 1-D array at `{root}/{parts...}`; `length` may be GROWING (resize it later)."""
    if shard < 1:
        raise ValueError(f"shard must be >= 1, got {shard}")
    spec = {**_array_spec(root, *parts, write=True), "store_data_equal_to_fill_value": True}
    return ts.open(
        spec, context=_CONTEXT, create=True, delete_existing=True,
        dtype=ts.dtype(np.dtype(dtype).name), shape=[length],
        chunk_layout=ts.ChunkLayout(write_chunk_shape=[shard], read_chunk_shape=[min(READ_CHUNK, shard)]),
        codec=ts.CodecSpec({"driver": "zarr3", "codecs": [{"name": "bytes"},
                                                          {"name": "zstd", "configuration": {"level": 3}}]}),
    ).result()


def set_length(array: ts.TensorStore, length: int) -> ts.TensorStore:
    """Shrink a GROWING array to its real length (metadata only: nothing past it was written)."""
    return array.resize(exclusive_max=[length], resize_metadata_only=True).result()


def write_array(root: str | os.PathLike, split: str, name: str, array: np.ndarray) -> None:
    """Create (or overwrite) `{root}/{split}/{name}` holding the 1-D `array`."""
    array = np.asarray(array)
    if array.ndim != 1:
        raise ValueError(f"{split}/{name}: expected a 1-D array, got shape {array.shape}")
    create_array(root, (split, name), array.dtype, array.shape[0]).write(array).result()


class StreamWriter:
    """Appends pieces to a 1-D array from element 0, writing whole shards so none is read back and rewritten.
    Each write runs in tensorstore's threads while the next pieces are made; at most two flushes of
    `_FLUSH_SHARDS` shards are held in memory."""

    def __init__(self, array: ts.TensorStore):
        self._array = array
        self._shard = shard_size(array)
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._inflight = None  # the previous flush's write
        self.length = 0  # elements written or pending

    def add(self, piece: np.ndarray) -> None:
        self._pending.append(piece)
        self._pending_len += len(piece)
        self.length += len(piece)
        if self._pending_len >= _FLUSH_SHARDS * self._shard:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        data = np.concatenate(self._pending) if self._pending else np.zeros(0, self._array.dtype.numpy_dtype)
        n = len(data) if final else len(data) // self._shard * self._shard
        start = self.length - self._pending_len
        if start + n > self._array.shape[0]:
            raise ValueError(f"wrote past the end of an array of length {self._array.shape[0]}")
        if self._inflight is not None:
            self._inflight.result()
        self._inflight = self._array[start:start + n].write(data[:n]) if n else None
        self._pending, self._pending_len = [data[n:]], len(data) - n

    def close(self) -> int:
        self._flush(final=True)
        if self._inflight is not None:
            self._inflight.result()
            self._inflight = None
        return self.length


def encode_documents(data: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Documents back to back (uint8 bytes, bytes per document) -> uint16 tokens: BOS, byte + 4 ..., EOS each."""
    lengths = np.asarray(lengths, np.int64)
    ends = np.cumsum(lengths + 2)
    starts = ends - lengths - 2
    out = np.empty(int(ends[-1]) if len(ends) else 0, np.uint16)
    is_byte = np.ones(len(out), bool)
    is_byte[starts] = is_byte[ends - 1] = False
    out[starts], out[ends - 1] = BOS_ID, EOS_ID
    out[is_byte] = data.astype(np.uint16) + OFFSET
    return out


def write_documents(root: str | os.PathLike, documents: dict[str, Sequence[bytes]], description: str = "documents",
                    shard: int = WRITE_CHUNK) -> dict:
    """A store holding the given documents (raw bytes) per split, written whole with its manifest last; for
    programs and tests that have their documents in memory (`blt prepare` streams files instead)."""
    manifest = {"format_version": FORMAT_VERSION, "corpus": description, "tokenizer": "bytes+4 (BOS=1, EOS=2)",
                "shard_tokens": shard}
    clear(root)
    for split in SPLITS:
        docs = [bytes(d) for d in documents.get(split, ())]
        if not docs:
            raise ValueError(f"cannot prepare {root}: the {split} split has no documents")
        tokens = encode_documents(np.frombuffer(b"".join(docs), np.uint8), np.array([len(d) for d in docs]))
        create_array(root, (split, "tokens"), np.uint16, len(tokens), shard).write(tokens).result()
        manifest[split] = {"num_docs": len(docs), "num_tokens": len(tokens)}
    _write_manifest(root, manifest)
    return manifest


def copy_regions(dest: ts.TensorStore, sources: Sequence[tuple[int, ts.TensorStore]], start: int, stop: int,
                 step: int) -> None:
    """dest[start:stop] from `sources`, each (offset, array) holding dest[offset:offset + len(array)]; in
    pieces of `step` elements (bounded memory)."""
    for a in range(start, stop, step):
        b = min(a + step, stop)
        buf = np.empty(b - a, dest.dtype.numpy_dtype)
        for offset, src in sources:
            x, y = max(a, offset), min(b, offset + src.shape[0])
            if x < y:
                buf[x - a:y - a] = src[x - offset:y - offset].read().result()
        dest[a:b].write(buf).result()


def shard_range(num_shards: int, index: int, count: int) -> range:
    """Process `index`'s contiguous share of `num_shards` shards."""
    return range(num_shards * index // count, num_shards * (index + 1) // count)


# ---- entropies --------------------------------------------------------------------------------------------

def stored_shards(root: str | os.PathLike, split: str, name: str) -> set[int]:
    """Indices of the shards of `{split}/{name}` present in the store (zarr3's `c/<index>` keys)."""
    return _stored_shard_indices(root, f"{split}/{name}")


def _stored_shard_indices(root: str | os.PathLike, path: str) -> set[int]:
    # listed through the store's own kvstore, so a bucket or memory:// store is checked like a folder
    prefix = f"{path}/c/"
    keys = _kvstore(root).list(_prefix_range(prefix)).result()
    return {int(k.decode()[len(prefix):]) for k in keys if k.decode()[len(prefix):].isdigit()}


def entropy_state(manifest: dict, digest: str | None = None) -> str:
    """none: no entropies; legacy: entropies from before completion marks (format 1, unverifiable);
    complete / partial: made by the model with `digest` (or, with digest None, by any); other: made by
    another model."""
    if "entropies_complete" not in manifest:
        return "legacy" if manifest.get("entropy_run") is not None else "none"
    if digest is not None and manifest.get("entropy_model_digest") != digest:
        return "other"
    return "complete" if manifest["entropies_complete"] else "partial"


def require_complete_entropies(root: str | os.PathLike, manifest: dict | None = None) -> dict:
    """The manifest, if the store's entropies are complete; else a ConfigError saying how to finish them."""
    manifest = manifest if manifest is not None else read_manifest(root)
    state = entropy_state(manifest)
    run = manifest.get("entropy_run") or "ENTROPY_RUN"
    if state == "none":
        raise ConfigError(f"{root}: the data store has no entropies; compute them with "
                          f"`blt prepare --store {root} --entropy-run ENTROPY_RUN`")
    if state == "partial":
        raise ConfigError(f"{root}: the entropy computation did not finish (interrupted?); resume it with "
                          f"`blt prepare --store {root} --entropy-run {run}`")
    if state == "legacy":
        raise ConfigError(f"{root}: its entropies were written by an older blt_jax that did not record whether "
                          f"they were complete, nor which model made them; recompute them with "
                          f"`blt prepare --store {root} --entropy-run {run}`")
    return manifest


def compute_entropies(root: str | os.PathLike, split: str, entropy_fn: Callable[[np.ndarray], np.ndarray],
                      chunk_len: int, context_len: int, rows: int, *, index: int = 0, count: int = 1,
                      barrier: Callable[[str], None] = lambda name: None, progress: bool = True) -> int:
    """Fill `{root}/{split}/entropies` with `entropy_fn` over the split's token stream; returns the number of
    shards this process computed (those already stored are kept: the computation resumes).

    The missing shards are shared among `count` processes (this one is `index`; `barrier` waits for all).
    Each row of a call holds up to `context_len` tokens of context followed by up to `chunk_len` new tokens
    of one shard, right-padded with BOE = 0, so calls are always shaped (rows, context_len + chunk_len) and
    a jitted function compiles once; only the new tokens' values are kept. Every process makes the same
    number of calls (padding rows fill the short ones), as a computation sharded over all processes needs.
    This equals one pass over the whole stream for any causal function whose value at t depends on tokens
    t - context_len .. t only (e.g. a one-layer model with that attention window); a deeper windowed model
    sees at least `context_len` tokens of context per position.
    """
    if chunk_len < 1 or context_len < 0 or rows < 1:
        raise ValueError(f"need chunk_len >= 1, context_len >= 0, rows >= 1; got {chunk_len}, {context_len}, {rows}")
    tokens = open_array(root, split, "tokens")
    n, shard = tokens.shape[0], shard_size(tokens)
    if index == 0:
        try:
            current = open_array(root, split, "entropies", expect_complete=False)  # resumable: shards may lack
            reuse = current.shape[0] == n and shard_size(current) == shard
        except FileNotFoundError:
            reuse = False
        if not reuse:
            create_array(root, (split, "entropies"), np.float32, n, shard)
    barrier(f"blt_jax: {split} entropies array ready")
    num_shards = -(-n // shard)
    missing = sorted(set(range(num_shards)) - stored_shards(root, split, "entropies"))
    barrier(f"blt_jax: {split} entropy shards listed")  # before anyone writes, everyone has the same list

    def shard_rows(s: int) -> list[tuple[int, int, int]]:
        lo, hi = s * shard, min((s + 1) * shard, n)
        return [(s, a, min(a + chunk_len, hi)) for a in range(lo, hi, chunk_len)]

    shares = [[missing[i] for i in shard_range(len(missing), p, count)] for p in range(count)]
    work = [[r for s in share for r in shard_rows(s)] for share in shares]
    calls = max(-(-len(w) // rows) for w in work)
    mine = work[index]
    out = open_array(root, split, "entropies", write=True)
    width = context_len + chunk_len
    shard_tokens: dict[int, tuple[int, np.ndarray]] = {}  # shard -> (first position, tokens from there)
    values: dict[int, list[np.ndarray]] = {}
    done = {s: 0 for s, _, _ in mine}
    needed = {}
    for s, _, _ in mine:
        needed[s] = needed.get(s, 0) + 1
    pending = []
    with tqdm(total=sum(b - a for _, a, b in mine), unit="tok", unit_scale=True, desc=f"entropies[{split}]",
              disable=not progress) as bar:
        for c in range(calls):
            group = mine[c * rows:(c + 1) * rows]
            window = np.full((rows, width), BOE_ID, np.int32)
            for row, (s, a, b) in enumerate(group):
                if s not in shard_tokens:
                    first = max(0, s * shard - context_len)
                    shard_tokens[s] = (first, tokens[first:min((s + 1) * shard, n)].read().result().astype(np.int32))
                first, toks = shard_tokens[s]
                ctx = max(0, a - context_len)
                window[row, : b - ctx] = toks[ctx - first:b - first]
            result = np.asarray(entropy_fn(window), dtype=np.float32)
            if result.shape != (rows, width):
                raise ValueError(f"entropy_fn returned shape {result.shape}, expected {(rows, width)}")
            for row, (s, a, b) in enumerate(group):
                ctx = max(0, a - context_len)
                values.setdefault(s, []).append(result[row, a - ctx:b - ctx])
                done[s] += 1
                bar.update(b - a)
                if done[s] == needed[s]:  # the shard is whole: write it in one piece
                    lo = s * shard
                    piece = np.concatenate(values.pop(s))
                    pending.append(out[lo:lo + len(piece)].write(piece))
                    shard_tokens.pop(s, None)
            if len(pending) > 8:
                for f in pending:
                    f.result()
                pending = []
    for f in pending:
        f.result()
    barrier(f"blt_jax: {split} entropies written")
    return len(shares[index])
