"""Issue 13, the data store (items 2, 6, 7): each test reproduces the defect first.

2. `blt prepare --store EXISTING` replaced the tokens, entropies and threshold without a word.
6. An interrupted entropy computation left zeros in the store while the manifest kept the old threshold, and
   training took it; now entropies carry a completion mark, a partial store is refused, and it resumes.
7. A store's entropies from entropy model A trained a BLT with `--entropy-run B`; now the store records a
   digest of A's parameters and B is refused.

And from a later probe: `prepare` took any file whose name starts with `manifest.json` (a backup, an
application's own manifest) for the store's own and deleted or replaced it; a deleted shard file read as
zeros in training, evaluation and calibration; `calibrate --target` took targets no threshold reaches.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import STDLIB, tiny_config

from blt_jax import prepare
from blt_jax.cli import main
from blt_jax.config import ConfigError, PatchingConfig
from blt_jax.data import store
from blt_jax.data.pipeline import LMWindows, WindowSource, make_eval_batches, make_train_iterator
from blt_jax.evaluate import unigram_bpb
from blt_jax.train import checkpoint as ckpt
from blt_jax.patching import calibrate_threshold, mean_patch_length, start_flags
from blt_jax.train.loop import train

SHARD = 2048
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tiny_runs, tmp_path_factory):
    """(cfg, entropy run A, entropy run B, a token store): A is the session's tiny entropy model, B another
    one (2 steps from another seed), the store a small corpus in shards of 2048 tokens."""
    cfg, _, run_a, _ = tiny_runs
    base = tmp_path_factory.mktemp("reliability_store")
    root = str(base / "data")
    prepare.prepare_corpus(root, [str(STDLIB / "json")], shard_tokens=SHARD)
    run_b = base / "entropy_b"
    train("entropy", tiny_config(root, "entropy_train.steps=2", "entropy_train.warmup_steps=1",
                                 "entropy_train.seed=7", "entropy_train.eval_batches=1"), run_b, progress=False)
    return cfg, run_a, run_b, root


def _copy(root: str, dest) -> str:
    shutil.copytree(root, dest)
    return str(dest)


@pytest.fixture(scope="module")
def with_entropies(runs, tmp_path_factory):
    """The fixture's token store with entropy model A's entropies and a calibrated threshold (copy it to
    change it)."""
    cfg, run_a, _, tokens_only = runs
    root = _copy(tokens_only, tmp_path_factory.mktemp("with_entropies") / "store")
    prepare.ensure_entropies(root, run_a, cfg.model.patching, cfg.data.seq_len, progress=False)
    return root


# ---- 2: an existing store is not replaced without --overwrite ---------------------------------------------

def test_prepare_refuses_an_existing_store_unless_overwrite(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "one.txt").write_text("first corpus, first file\n" * 20)
    (a / "two.txt").write_text("first corpus, second file\n" * 20)
    (b / "other.jsonl").write_text("".join(f'{{"text": "second corpus {i}"}}\n' for i in range(50)))
    root = str(tmp_path / "store")
    assert main(["prepare", "--data", str(a), "--store", root, "--no-progress"]) == 0
    store.update_manifest(root, patching_threshold=1.5)  # stands for derived data worth keeping
    before = store.open_array(root, "train", "tokens").read().result()
    capsys.readouterr()

    assert main(["prepare", "--data", str(b), "--store", root, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already holds a data store" in err and "--overwrite" in err
    np.testing.assert_array_equal(store.open_array(root, "train", "tokens").read().result(), before)
    assert store.read_manifest(root)["patching_threshold"] == 1.5

    # the same command again (a restarted job) changes nothing and succeeds
    assert main(["prepare", "--data", str(a), "--store", root, "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert store.read_manifest(root)["patching_threshold"] == 1.5

    assert main(["prepare", "--data", str(b), "--store", root, "--overwrite", "--no-progress"]) == 0
    manifest = store.read_manifest(root)
    assert "patching_threshold" not in manifest and manifest["corpus"].endswith(str(b))


def _store_and_a_corpus_that_fails(tmp_path) -> tuple[str, Path, bytes]:
    """(a prepared store with a threshold, a folder of new inputs whose last file is a gzip file cut in half,
    that file whole)."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    for i in range(4):
        (old / f"doc{i}.txt").write_text(f"the old corpus, file {i}\n" * 30)
        (new / f"doc{i}.txt").write_text(f"the new corpus, file {i}\n" * 300)
    whole = gzip.compress(np.random.default_rng(0).integers(97, 123, 50_000, dtype=np.uint8).tobytes())
    (new / "zz.txt.gz").write_bytes(whole[:len(whole) // 2])
    root = str(tmp_path / "store")
    prepare.prepare_corpus(root, [str(old)], shard_tokens=SHARD)
    store.update_manifest(root, patching_threshold=1.5)  # stands for derived data worth keeping
    return root, new, whole


def _contents(root: str) -> tuple[dict, dict]:
    return store.read_manifest(root), {split: store.open_array(root, split, "tokens").read().result()
                                       for split in store.SPLITS}


def _assert_unchanged(root: str, before: tuple[dict, dict]) -> None:
    manifest, tokens = _contents(root)
    assert manifest == before[0]
    for split in store.SPLITS:
        np.testing.assert_array_equal(tokens[split], before[1][split], err_msg=split)


def test_a_failed_overwrite_leaves_the_old_store_as_it_was(tmp_path, capsys):
    """`--overwrite` cleared the store before reading the inputs: a truncated .gz among them left an empty
    store, the old corpus and its threshold lost. Now the old store goes only once the new corpus is read."""
    root, new, whole = _store_and_a_corpus_that_fails(tmp_path)
    before = _contents(root)
    assert main(["prepare", "--data", str(new), "--store", root, "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "zz.txt.gz: truncated or corrupt gzip file" in err and len(err.strip().splitlines()) == 1
    _assert_unchanged(root, before)

    (new / "zz.txt.gz").write_bytes(whole)  # the input mended: now it replaces the store, staging and all
    assert main(["prepare", "--data", str(new), "--store", root, "--overwrite", "--no-progress"]) == 0
    manifest = store.read_manifest(root)
    assert "patching_threshold" not in manifest and manifest["corpus"].endswith(str(new))
    assert manifest["train"]["num_docs"] + manifest["heldout"]["num_docs"] == 5
    assert not [p for p in Path(root).rglob("*") if p.is_file() and store.STAGING in p.parts]


def test_a_failed_overwrite_leaves_no_staging_behind(tmp_path, capsys, monkeypatch):
    """A probe: the failed `--overwrite` above left the new corpus's partial tokens in `_staging/` inside the
    store, for good (a re-run of the old corpus keeps the store as it is): now a failure before the old store
    is replaced, a bad input or Ctrl-C, takes the staging with it and leaves the store exactly as it was."""
    root, new, whole = _store_and_a_corpus_that_fails(tmp_path)
    before = _contents(root)
    files_before = sorted(p.relative_to(root) for p in Path(root).rglob("*"))
    assert main(["prepare", "--data", str(new), "--store", root, "--overwrite", "--no-progress"]) == 2
    assert "zz.txt.gz: truncated or corrupt gzip file" in capsys.readouterr().err
    assert not (Path(root) / store.STAGING).exists()
    assert sorted(p.relative_to(root) for p in Path(root).rglob("*")) == files_before
    _assert_unchanged(root, before)

    (new / "zz.txt.gz").write_bytes(whole)

    def interrupted(*args, **kwargs):  # Ctrl-C while the new corpus is read: after its staging arrays exist
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "_tokenize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_corpus(root, [str(new)], overwrite=True, shard_tokens=SHARD)
    assert not (Path(root) / store.STAGING).exists()
    _assert_unchanged(root, before)


def test_a_failed_first_prepare_leaves_nothing_of_its_store(tmp_path, capsys, monkeypatch):
    """A probe: a first `blt prepare` that failed on a bad record (--strict) left the store's folder with
    empty token arrays and no manifest, which looks like a store to a user listing it. Now a failure takes
    back what it wrote: a folder it made goes, a folder the user made is left as it was (empty)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello"}\nnot json\n')
    fresh, made = tmp_path / "fresh", tmp_path / "made"
    made.mkdir()
    for root in (fresh, made):
        capsys.readouterr()
        assert main(["prepare", "--data", str(bad), "--store", str(root), "--strict", "--no-progress"]) == 2
        assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
    assert not fresh.exists()
    assert made.is_dir() and not list(made.iterdir())

    def interrupted(*args, **kwargs):  # Ctrl-C while the corpus is read: after its token arrays exist
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "_tokenize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_corpus(str(fresh), [str(bad)], shard_tokens=SHARD)
    assert not fresh.exists()


def test_a_failed_overwrite_by_two_processes_leaves_the_old_store_as_it_was(tmp_path):
    """The same with two processes: the second one's share holds the truncated file, and the first, which
    removes the old store, never does; with the file mended they write what one process writes. The failing
    process leaves the job at once, so the launcher stops its peer: a probe found both still running past
    250 s, the failing one in jax's shutdown barrier, waiting for the peer that waited for it."""
    root, new, whole = _store_and_a_corpus_that_fails(tmp_path)
    before = _contents(root)

    def two_processes(timeout: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "blt_jax", "prepare", "--data", str(new), "--store", root, "--overwrite",
               "--shard-tokens", str(SHARD), "--no-progress"]
        return subprocess.run([sys.executable, str(REPO / "launch" / "local.py"), "--num-processes", "2",
                               "--devices-per-process", "1", "--timeout", str(timeout), "--", *cmd],
                              cwd=REPO, capture_output=True, text=True, timeout=timeout + 60, check=False)

    proc = two_processes(120)
    assert proc.returncode == 2, "the launcher's timeout stopped the job"  # not 124
    assert "zz.txt.gz: truncated or corrupt gzip file" in proc.stdout + proc.stderr
    _assert_unchanged(root, before)

    (new / "zz.txt.gz").write_bytes(whole)
    proc = two_processes(300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    one = str(tmp_path / "one")
    prepare.prepare_corpus(one, [str(new)], shard_tokens=SHARD)
    _assert_unchanged(root, _contents(one))


def test_prepare_never_deletes_files_that_are_not_a_stores(tmp_path, capsys):
    """`--store` naming a folder of the user's own files (here: the input corpus itself, under train/, or a
    run folder) used to clear train/ and heldout/ and write into it; now it is refused and nothing changes.
    A store inside an input folder is not read as input, so the same command again changes nothing."""
    project = tmp_path / "project"
    (project / "train").mkdir(parents=True)
    for i in range(4):
        (project / "train" / f"notes{i}.md").write_text(f"my notes, part {i}\n" * 30)
    (tmp_path / "other.txt").write_text("another corpus\n" * 40)
    (tmp_path / "more.txt").write_text("and more of it\n" * 40)
    before = {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}
    for extra in ([], ["--overwrite"]):
        assert main(["prepare", "--data", str(project / "train"), "--store", str(project), "--no-progress",
                     *extra]) == 2
        assert "lies inside the store folder" in capsys.readouterr().err
        assert main(["prepare", "--data", str(tmp_path / "other.txt"), str(tmp_path / "more.txt"), "--store",
                     str(project), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert "not a data store's" in err and "train/notes0.md" in err and "nothing was changed" in err
        assert {p: p.read_bytes() for p in project.rglob("*") if p.is_file()} == before

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(f"document {i}\n" * 40)
    inside = str(corpus / "store")
    assert main(["prepare", "--data", str(corpus), "--store", inside, "--no-progress"]) == 0
    docs = store.read_manifest(inside)["train"]["num_docs"] + store.read_manifest(inside)["heldout"]["num_docs"]
    assert docs == 4  # the store's own files are not documents
    capsys.readouterr()
    assert main(["prepare", "--data", str(corpus), "--store", inside, "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["prepare", "--data", str(corpus), "--store", inside, "--no-progress", "--overwrite"]) == 0
    assert store.read_manifest(inside)["train"]["num_docs"] + store.read_manifest(inside)["heldout"]["num_docs"] == 4


def test_a_damaged_manifest_is_named(tmp_path, capsys):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "manifest.json").write_text("hi\n")
    (tmp_path / "a.txt").write_text("text\n" * 10)
    (tmp_path / "b.txt").write_text("more text\n" * 10)
    for extra in ([], ["--overwrite"]):  # not a store's manifest: the user's file, never replaced
        assert main(["prepare", "--data", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--store",
                     str(tmp_path / "store"), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert "not a data store's (manifest.json (invalid JSON" in err and len(err.strip().splitlines()) == 1
        assert (tmp_path / "store" / "manifest.json").read_text() == "hi\n"
    with pytest.raises(ValueError, match="manifest.json is not a blt data store manifest \\(invalid JSON"):
        WindowSource(str(tmp_path / "store"), "train", 64)


def test_prepare_keeps_files_that_only_look_like_the_manifest(tmp_path, capsys):
    """`manifest.json.bak` was deleted by `prepare` (the store's own keys were those *starting with*
    manifest.json), and an application's own `manifest.json` was taken for a store's (without --overwrite:
    "already holds a data store (unknown corpus)"; with it: replaced). Both are the user's files now: refused,
    with and without --overwrite, and left as they were."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(f"document {i}\n" * 40)
    backup, app = tmp_path / "backup", tmp_path / "app"
    backup.mkdir()
    app.mkdir()
    (backup / "manifest.json.bak").write_text("backup\n")
    (app / "manifest.json").write_text('{"name": "my app"}')
    for folder, named in ((backup, "manifest.json.bak"), (app, "manifest.json (no format_version")):
        before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        for extra in ([], ["--overwrite"]):
            assert main(["prepare", "--data", str(corpus), "--store", str(folder), "--no-progress", *extra]) == 2
            err = capsys.readouterr().err
            assert f"holds files that are not a data store's ({named}" in err and "nothing was changed" in err
            assert len(err.strip().splitlines()) == 1
            assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    # training and evaluation on the app's folder: a one-line error, not a KeyError from a foreign manifest
    with pytest.raises(ValueError, match="manifest.json is not a blt data store manifest \\(no format_version"):
        WindowSource(str(app), "train", 64)
    assert store.manifest_or_none(str(app)) is None

    # a real store next to the user's backup of its manifest: --overwrite refuses to take the backup with it
    root = tmp_path / "store"
    assert main(["prepare", "--data", str(corpus), "--store", str(root), "--no-progress"]) == 0
    (root / "manifest.json.bak").write_bytes((root / "manifest.json").read_bytes())
    capsys.readouterr()
    assert main(["prepare", "--data", str(corpus), "--store", str(root), "--no-progress", "--overwrite"]) == 2
    assert "not a data store's (manifest.json.bak)" in capsys.readouterr().err
    assert (root / "manifest.json.bak").read_bytes() == (root / "manifest.json").read_bytes()
    (root / "manifest.json.bak").unlink()
    (root / "manifest.json.keep").write_text("mine\n")
    with pytest.raises(ConfigError, match="manifest.json.keep"):
        store.clear(str(root))
    (root / "manifest.json.keep").unlink()
    store.clear(str(root))
    assert [p for p in root.rglob("*") if p.is_file()] == []


def test_prepare_refuses_a_store_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("text\n" * 10)
    (tmp_path / "b.txt").write_text("more text\n" * 10)
    plain = tmp_path / "notes.txt"
    plain.write_text("my notes\n")
    for extra in ([], ["--overwrite"]):
        assert main(["prepare", "--data", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--store", str(plain),
                     "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert f"--store {plain}: is a file, not a folder" in err and "NOT_FOUND" not in err
        assert plain.read_text() == "my notes\n"
    with pytest.raises(FileNotFoundError, match="it is a file, not a folder"):
        store.read_manifest(str(plain))


# ---- a missing shard file is damage, refused where the arrays are opened (it would read as zeros) ----------

def _drop_shard(root: str, path: str, index: int) -> None:
    """Delete one shard file of a local store, as a partial copy or a stray `rm` would."""
    (Path(root) / path / "c" / str(index)).unlink()


def test_a_missing_token_shard_is_refused_not_read_as_zeros(runs, tmp_path, capsys):
    cfg, _, _, tokens_only = runs
    root = _copy(tokens_only, tmp_path / "store")
    manifest = store.read_manifest(root)
    train_shards = -(-manifest["train"]["num_tokens"] // SHARD)
    assert train_shards > 3 and manifest["heldout"]["num_tokens"] > 0
    _drop_shard(root, "train/tokens", 2)
    _drop_shard(root, "heldout/tokens", 0)
    data_cfg = tiny_config(root).data
    for split, gone in (("train", "train/tokens/c/2"), ("heldout", "heldout/tokens/c/0")):
        pattern = f"damaged: {split}/tokens is missing shard files {gone} \\(1 of .*--store {root} --overwrite"
        with pytest.raises(ValueError, match=pattern):
            WindowSource(root, split, 64)  # what training and evaluation read through
        with pytest.raises(ValueError, match=pattern):
            store.open_array(root, split, "tokens")
    with pytest.raises(ValueError, match="train/tokens is missing shard files"):
        make_train_iterator(data_cfg, "train", LMWindows(), seed=0)
    with pytest.raises(ValueError, match="heldout/tokens is missing shard files"):
        make_eval_batches(data_cfg, "heldout", LMWindows())
    with pytest.raises(ValueError, match="missing shard files"):
        unigram_bpb(root)  # `blt eval`'s baseline
    # the command line: one line, exit status 2
    assert main(["train", "--preset", "tiny", "--store", root, "--run", str(tmp_path / "run"), "--set",
                 "model.patching.mode=static", "--set", "train.steps=2", "--set", "train.warmup_steps=1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train/tokens is missing shard files train/tokens/c/2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before the run folder (and its lock) was made
    # a re-run of the same `blt prepare` says the store is damaged (it said "nothing to do")
    with pytest.raises(ValueError, match="train/tokens is missing shard files"):
        store.check_tokens(root)


def test_missing_shards_are_found_in_any_kvstore_and_not_in_unfinished_arrays():
    root = f"memory://{uuid.uuid4().hex}/"
    store.write_documents(root, {"train": [bytes(range(200))] * 3, "heldout": [b"held out"]}, shard=64)
    tokens = store.open_array(root, "train", "tokens")
    last = -(-tokens.shape[0] // 64) - 1
    store.delete_prefix(root, f"train/tokens/c/{last}")  # the last shard: a prefix of no other key
    with pytest.raises(ValueError, match=f"missing shard files train/tokens/c/{last} "):
        store.open_array(root, "train", "tokens")
    assert store.missing_shards(root, ("train", "tokens"), tokens) == [last]
    # what is still being written, or computed resumably, is opened without the check
    assert store.open_array(root, "train", "tokens", expect_complete=False).shape == tokens.shape
    growing = store.create_array(root, ("train", "more"), np.uint16, store.GROWING, 64)
    growing[:10].write(np.ones(10, np.uint16)).result()
    assert store.missing_shards(root, ("train", "more"), growing) == []
    store.open_array(root, "train", "more")


def test_a_missing_entropy_shard_is_refused_and_recomputed(runs, with_entropies, tmp_path, monkeypatch):
    """Entropy shards: refused once the store says they are complete (never while a computation resumes);
    the command the error names computes the lost shard again, to the same values."""
    cfg, run_a, _, _ = runs
    root = _copy(with_entropies, tmp_path / "store")
    _drop_shard(root, "train/entropies", 1)
    _drop_shard(root, "heldout/entropies", 0)
    with pytest.raises(ValueError, match=f"train/entropies is missing shard files train/entropies/c/1 .*"
                                         f"blt prepare --store {root} --entropy-run {run_a}"):
        WindowSource(root, "train", 64, ("tokens", "entropies"))
    WindowSource(root, "train", 64, ("tokens",))  # the tokens are whole
    with pytest.raises(ValueError, match="heldout/entropies is missing shard files heldout/entropies/c/0 "):
        prepare.calibrate(root, cfg.model.patching, cfg.data.seq_len)  # calibrates on held-out entropies
    calls = []
    _interrupt_after(monkeypatch, 10**6, calls)  # never interrupts: counts the entropy model's calls
    result = prepare.ensure_entropies(root, run_a, cfg.model.patching, cfg.data.seq_len, progress=False)
    assert result["entropies"] == "resumed" and result["calibrated"]
    assert len(calls) == 2  # the lost shards only: one per split, one call each
    for split in store.SPLITS:
        np.testing.assert_array_equal(store.open_array(root, split, "entropies").read().result(),
                                      store.open_array(with_entropies, split, "entropies").read().result())
    assert store.read_manifest(root)["entropies_complete"] is True
    WindowSource(root, "train", 64, ("tokens", "entropies"))


# ---- calibration refuses targets no threshold reaches --------------------------------------------------------

def test_calibrate_refuses_unreachable_targets_and_keeps_the_threshold(with_entropies, tmp_path, capsys):
    root = _copy(with_entropies, tmp_path / "store")
    before = store.read_manifest(root)
    for target, says in (("0", "--target: a mean patch length must be > 1 byte per patch, got 0"),
                         ("-2", "must be > 1 byte"), ("1", "must be > 1 byte"),
                         ("1e9", "target mean patch length 1e+09 is out of reach"),
                         ("9", "model.patching.max_patch_length 8 caps it")):
        assert main(["calibrate", "--preset", "tiny", "--store", root, "--target", target]) == 2, target
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
        assert store.read_manifest(root) == before
    assert main(["calibrate", "--preset", "tiny", "--store", root, "--target", "3"]) == 0
    achieved = json.loads(capsys.readouterr().out)["mean_patch_length"]
    assert abs(achieved - 3) < 0.3 and store.read_manifest(root)["patching_target"] == 3


def test_monotonic_calibration_reaches_short_patches():
    """The monotonic rule compares the threshold with each entropy's rise over the previous one, which can be
    negative: the search covers those values, so targets under ~2 bytes are reached rather than refused."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 260, (32, 128))
    entropies = rng.gamma(2.0, 0.7, (32, 128)).astype(np.float32)
    cfg = PatchingConfig(rule="monotonic")
    for target in (1.3, 1.6, 4.0):
        threshold, achieved = calibrate_threshold(cfg, tokens, entropies, target)
        assert abs(achieved - target) < 0.05 * target
        assert mean_patch_length(start_flags(cfg, tokens, entropies, threshold)) == achieved


# ---- 6: entropies are valid only when complete; a partial computation is refused and resumes ---------------

class Interrupted(Exception):
    pass


def _interrupt_after(monkeypatch, calls: int, counter: list) -> None:
    """The entropy model stops (as a killed process would) after `calls` batches."""
    real = prepare.make_entropy_fn

    def make(run_dir):
        fn, context, rows, digest = real(run_dir)

        def stopping(window):
            if len(counter) >= calls:
                raise Interrupted
            counter.append(1)
            return fn(window)
        return stopping, context, rows, digest

    monkeypatch.setattr(prepare, "make_entropy_fn", make)


def test_interrupted_entropies_are_refused_then_resume(runs, tmp_path, monkeypatch):
    cfg, run_a, run_b, tokens_only = runs
    root = _copy(tokens_only, tmp_path / "store")
    fresh = _copy(tokens_only, tmp_path / "fresh")
    prepare.ensure_entropies(root, run_a, cfg.model.patching, cfg.data.seq_len, progress=False)
    assert store.read_manifest(root)["patching_threshold"] is not None

    counter = []
    _interrupt_after(monkeypatch, 1, counter)
    with pytest.raises(Interrupted):
        prepare.ensure_entropies(root, run_b, cfg.model.patching, cfg.data.seq_len, overwrite=True,
                                 progress=False)
    monkeypatch.undo()
    manifest = store.read_manifest(root)
    assert "patching_threshold" not in manifest and manifest["entropies_complete"] is False
    stored = store.stored_shards(root, "train", "entropies")
    total = -(-manifest["train"]["num_tokens"] // SHARD)
    assert 0 < len(stored) < total
    with pytest.raises(ConfigError, match="did not finish.*blt prepare --store .* --entropy-run"):
        WindowSource(root, "train", 64, ("tokens", "entropies"))
    with pytest.raises(ConfigError, match="did not finish"):
        prepare.check_entropy_run(root, run_b)
    # training refuses it, also with a threshold given explicitly (which skips the store's)
    blt_cfg = tiny_config(root, "train.steps=1", "train.warmup_steps=0", "model.patching.threshold=1.0")
    with pytest.raises(ConfigError, match="did not finish"):
        train("blt", blt_cfg, tmp_path / "blt", entropy_run=str(run_b), progress=False)
    assert store.entropy_state(store.read_manifest(root)) == "partial"

    # resuming computes the missing shards only, and ends where an uninterrupted computation ends
    counter.clear()
    _interrupt_after(monkeypatch, 10**6, counter)
    result = prepare.ensure_entropies(root, run_b, cfg.model.patching, cfg.data.seq_len, progress=False)
    resumed_calls = len(counter)
    counter.clear()
    prepare.ensure_entropies(fresh, run_b, cfg.model.patching, cfg.data.seq_len, progress=False)
    assert result["entropies"] == "resumed" and result["calibrated"]
    assert 0 < resumed_calls < len(counter)
    for split in store.SPLITS:
        np.testing.assert_array_equal(store.open_array(root, split, "entropies").read().result(),
                                      store.open_array(fresh, split, "entropies").read().result())
    a, b = store.read_manifest(root), store.read_manifest(fresh)
    assert a["entropies_complete"] is True and a["patching_threshold"] == b["patching_threshold"]
    WindowSource(root, "train", 64, ("tokens", "entropies"))  # accepted now


def test_stores_from_before_completion_marks_are_refused_with_the_fix(runs, tmp_path):
    """A store written before this change (format 1) cannot say whether its entropies are complete: tokens
    still load; entropies are refused with the command that recomputes them, which works in place."""
    cfg, run_a, _, tokens_only = runs
    root = _copy(tokens_only, tmp_path / "store")
    prepare.ensure_entropies(root, run_a, cfg.model.patching, cfg.data.seq_len, progress=False)
    legacy = {k: v for k, v in store.read_manifest(root).items()
              if k not in ("entropies_complete", "entropy_model_digest", "source_digest", "shard_tokens", "inputs")}
    store.write_json(root, store.MANIFEST, {**legacy, "format_version": 1})
    WindowSource(root, "train", 64, ("tokens",))
    with pytest.raises(ConfigError, match=f"older blt_jax.*blt prepare --store {root} --entropy-run {run_a}"):
        WindowSource(root, "train", 64, ("tokens", "entropies"))
    result = prepare.ensure_entropies(root, run_a, cfg.model.patching, cfg.data.seq_len, progress=False)
    assert result["entropies"] == "computed"
    WindowSource(root, "train", 64, ("tokens", "entropies"))


# ---- 7: the store records which entropy model made its entropies -------------------------------------------

def test_entropies_of_another_model_are_refused(runs, tmp_path, capsys):
    _, run_a, run_b, tokens_only = runs
    root = _copy(tokens_only, tmp_path / "store")
    assert main(["prepare", "--preset", "tiny", "--store", root, "--entropy-run", str(run_a), "--no-progress"]) == 0
    manifest = store.read_manifest(root)
    assert manifest["entropy_model_digest"].startswith("sha256:")
    assert prepare.check_entropy_run(root, run_a)["entropy_run"] == str(run_a.absolute())
    with pytest.raises(ConfigError, match="is not the entropy model that computed the entropies"):
        prepare.check_entropy_run(root, run_b)
    # a run's frozen copy of its entropy model (saved and restored) has the same digest
    params = ckpt.load_trained_params(run_a, expect_kind="entropy")
    ckpt.save_params(tmp_path / "frozen", params)
    restored = ckpt.load_params(tmp_path / "frozen", params)
    assert prepare.params_digest(restored) == manifest["entropy_model_digest"]
    prepare.check_entropy_run(root, run_a, params=restored)

    # replacing the entropies with B's needs --overwrite; the same model again is a no-op
    capsys.readouterr()
    assert main(["prepare", "--preset", "tiny", "--store", root, "--entropy-run", str(run_b), "--no-progress"]) == 2
    assert "another entropy model" in capsys.readouterr().err
    assert main(["prepare", "--preset", "tiny", "--store", root, "--entropy-run", str(run_a), "--no-progress"]) == 0
    assert "already complete" in capsys.readouterr().out

    # training on A's entropies with B's model is refused (blt_jax.train checks where it resolves the run)
    blt_cfg = tiny_config(root, "train.steps=1", "train.warmup_steps=0")
    with pytest.raises(ConfigError, match="is not the entropy model that computed the entropies"):
        train("blt", blt_cfg, tmp_path / "blt", entropy_run=str(run_b), progress=False)
