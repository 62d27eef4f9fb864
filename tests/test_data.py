"""Data layer: corpus selection, the tensorstore store, chunked entropies and the grain pipeline."""

from __future__ import annotations

import itertools
import pickle
import threading
import uuid
from pathlib import Path

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import zstandard

from blt_jax.config import DataConfig, PatchingConfig
from blt_jax.data import corpus, sources, store
from blt_jax.data.pipeline import LMWindows, PatchedWindows, WindowSource, make_eval_batches, make_train_iterator
from blt_jax.patching import start_flags
from blt_jax.tokenizer import BOS_ID, EOS_ID, decode_bytes, encode

SEQ = 16
CONTEXT = 5


def toy_entropy_fn(context_len: int):
    """A causal stand-in for the entropy model: value at t depends on tokens t - context_len .. t only."""
    def fn(tokens: np.ndarray) -> np.ndarray:
        x = tokens.astype(np.float64)
        out = np.zeros_like(x)
        for k in range(context_len + 1):
            out[:, k:] += np.sin(x[:, : x.shape[1] - k] * (k + 1))
        return (np.abs(out) / (context_len + 1)).astype(np.float32)
    return fn


def write_files(folder: Path, sizes: list[int], seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, size in enumerate(sizes):
        f = folder / f"doc{i}.bin"
        f.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        files.append(f)
    return files


def split_docs(tokens: np.ndarray) -> list[np.ndarray]:
    return np.split(tokens, np.nonzero(tokens == BOS_ID)[0][1:])


def add_toy_entropies(root: str, context_len: int = CONTEXT, chunk_len: int = 32) -> None:
    """Toy entropies for both splits, marked complete as `blt prepare --entropy-run` marks them."""
    for split in store.SPLITS:
        store.compute_entropies(root, split, toy_entropy_fn(context_len), chunk_len, context_len, rows=8,
                                progress=False)
    store.update_manifest(root, entropy_run="toy", entropy_model_digest="toy", entropies_complete=True)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    """A store whose train split has exactly 40 windows of SEQ (641 tokens), with toy entropies."""
    base = tmp_path_factory.mktemp("corpus")
    train = write_files(base / "train", [100, 200, 131, 150, 50], seed=0)  # 631 bytes + 2 * 5 specials
    heldout = write_files(base / "heldout", [90, 120], seed=1)
    root = str(tmp_path_factory.mktemp("store"))
    store.write_documents(root, {"train": [f.read_bytes() for f in train],
                                 "heldout": [f.read_bytes() for f in heldout]})
    add_toy_entropies(root)
    return root


def cfg(root: str, **kw) -> DataConfig:
    return DataConfig(**{"path": root, "seq_len": SEQ, "batch_size": 4, **kw})


def window_keys(batches: list[dict]) -> list[bytes]:
    return [row.tobytes() for b in batches for row in b["tokens"]]


# ---- corpus -----------------------------------------------------------------------------------------------

def test_default_corpus_is_stdlib_without_tests_or_packages():
    files = corpus.default_corpus_files()
    root = corpus.stdlib_root()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 100 and sum(f.stat().st_size for f in files) > 1_000_000
    assert files == corpus.default_corpus_files()
    assert rel == sorted(rel)
    assert "os.py" in rel and "json/__init__.py" in rel
    banned = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    assert not [r for r in rel if banned & set(r.split("/")[:-1])]
    assert all(f.suffix in (".py", ".txt", ".rst") and f.stat().st_size > 0 for f in files)


def test_split_is_disjoint_stable_and_pinned():
    files = [Path(f"/c/doc{i:03d}.txt") for i in range(100)]
    train, heldout = corpus.split_files(files, "/c", 0.05)
    # sha256 of the relative path decides: these names must never change across machines or versions.
    assert [f.name for f in heldout] == ["doc014.txt", "doc061.txt", "doc076.txt", "doc099.txt"]
    assert set(train).isdisjoint(heldout) and len(train) + len(heldout) == 100
    assert corpus.split_files(files[::-1], "/c", 0.05) == (train[::-1], heldout[::-1])
    moved = corpus.split_files([Path("/elsewhere") / f.name for f in files], "/elsewhere", 0.05)
    assert [f.name for f in moved[1]] == [f.name for f in heldout]


def test_split_keeps_both_sides_non_empty():
    for files in ([Path("/c/a"), Path("/c/b")], [Path(f"/c/{i}") for i in range(5)]):
        for fraction in (1e-9, 0.999999):
            train, heldout = corpus.split_files(files, "/c", fraction)
            assert train and heldout and len(train) + len(heldout) == len(files)
    with pytest.raises(ValueError, match="at least 2 files"):
        corpus.split_files([Path("/c/a")], "/c")


def test_default_split_holds_out_a_few_files():
    files = corpus.default_corpus_files()
    train, heldout = corpus.split_files(files, corpus.stdlib_root())
    assert 0 < len(heldout) < 0.05 * len(files) and len(train) + len(heldout) == len(files)


def test_text_files_filters_and_dedups(tmp_path):
    (tmp_path / "sub" / ".hidden_dir").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "sub" / "b.py").write_text("print(1)")
    (tmp_path / "sub" / "latin1.txt").write_bytes("café".encode("latin-1"))  # not UTF-8, still text
    (tmp_path / "sub" / ".hidden").write_text("secret")
    (tmp_path / "sub" / ".hidden_dir" / "c.txt").write_text("secret")
    (tmp_path / "sub" / "blob.bin").write_bytes(b"abc\0def")
    (tmp_path / "sub" / "empty.txt").write_bytes(b"")
    (tmp_path / "sub" / "rows.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "x"}\n'))
    (tmp_path / "sub" / "utf16.txt").write_text("hello", encoding="utf-16")  # NUL bytes: binary, but said so
    with pytest.warns(sources.SkippedBinaryFiles, match=r"skipped 2 binary files .*UTF-16.*blob.bin, .*utf16.txt$"):
        got = sources.text_files([str(tmp_path), str(tmp_path / "a.txt"), str(tmp_path / "sub")])
    assert [f.relative_to(tmp_path.resolve()).as_posix() for f in got] == ["a.txt", "sub/b.py", "sub/latin1.txt"]
    # glob patterns follow the same rules as `blt prepare --data` (they were refused as missing paths)
    with pytest.warns(sources.SkippedBinaryFiles, match=r"skipped 1 binary file .*utf16.txt$"):
        got = sources.text_files([str(tmp_path / "**" / "*.py"), str(tmp_path / "sub" / "*.txt")])
    assert [f.relative_to(tmp_path.resolve()).as_posix() for f in got] == ["sub/b.py", "sub/latin1.txt"]
    with pytest.raises(FileNotFoundError, match="missing"):
        sources.text_files([str(tmp_path / "missing")])


def test_empty_corpus_names_the_path(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=str(tmp_path)):
        sources.text_files([str(tmp_path)])
    with pytest.raises(ValueError, match="heldout"):
        store.write_documents(str(tmp_path / "store"), {"train": [b"abc"]})


# ---- store ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["folder", "file_url", "memory_url"])
def test_documents_round_trip_through_a_store(tmp_path, kind):
    docs = [b"", b"x", bytes(range(256)) * 4, "héllo wörld\n".encode(), b"\0\1\2"]
    root = {"folder": str(tmp_path / "store"), "file_url": (tmp_path / "store").as_uri(),
            "memory_url": f"memory://{uuid.uuid4().hex}/"}[kind]
    manifest = store.write_documents(root, {"train": docs[:4], "heldout": docs[4:]}, description="toy", shard=100)
    assert manifest == store.read_manifest(root)
    assert manifest["corpus"] == "toy" and manifest["format_version"] == store.FORMAT_VERSION
    for split, expected in (("train", docs[:4]), ("heldout", docs[4:])):
        tokens = store.open_array(root, split, "tokens").read().result()
        assert tokens.dtype == np.uint16
        got = split_docs(tokens)
        assert [decode_bytes(d) for d in got] == expected
        assert all(d[0] == BOS_ID and d[-1] == EOS_ID for d in got)
        entry = manifest[split]
        assert entry["num_docs"] == len(expected) and entry["num_tokens"] == len(tokens)
    assert store.shard_size(store.open_array(root, "train", "tokens")) == 100
    if kind == "folder":
        assert (tmp_path / "store" / "manifest.json").is_file()


def test_encode_documents_matches_the_tokenizer():
    docs = [b"ab", b"", "ü".encode(), bytes([0, 255])]
    tokens = store.encode_documents(np.frombuffer(b"".join(docs), np.uint8), np.array([len(d) for d in docs]))
    assert tokens.dtype == np.uint16
    np.testing.assert_array_equal(tokens, np.concatenate([encode(d, bos=True, eos=True) for d in docs]))


def test_manifest_update_and_clear(tmp_path):
    root = str(tmp_path / "store")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        store.read_manifest(root)
    store.write_documents(root, {"train": [b"0123456789"], "heldout": [b"x" * 20]})
    store.write_array(root, "train", "entropies", np.zeros(12, np.float32))
    updated = store.update_manifest(root, patching_threshold=1.25, entropy_checkpoint="ckpt/7")
    assert updated["patching_threshold"] == 1.25 and updated["train"]["num_tokens"] == 12
    assert store.read_manifest(root) == updated and store.has_array(root, "train", "entropies")
    assert "patching_threshold" not in store.update_manifest(root, drop=["patching_threshold"])
    store.clear(root)  # the manifest and every array go
    assert not store.has_array(root, "train", "entropies") and not store.has_array(root, "train", "tokens")
    assert store.manifest_or_none(root) is None
    with pytest.raises(FileNotFoundError, match="train/entropies"):
        store.open_array(root, "train", "entropies")


@pytest.mark.parametrize("chunk_len,context_len,shard", [(7, 5, 1 << 20), (64, 5, 1 << 20), (16, 0, 32),
                                                         (3, 40, 1 << 20), (5, 9, 24)])
def test_chunked_entropies_equal_whole_stream(chunk_len, context_len, shard):
    root = f"memory://{uuid.uuid4().hex}/"
    rng = np.random.default_rng(4)
    docs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (40, 57, 3)]  # 106 tokens
    store.write_documents(root, {"train": docs, "heldout": docs[:1]}, shard=shard)
    fn = toy_entropy_fn(context_len)
    shapes = []
    computed = store.compute_entropies(root, "train", lambda t: (shapes.append(t.shape), fn(t))[1],
                                       chunk_len, context_len, rows=3, progress=False)
    tokens = store.open_array(root, "train", "tokens").read().result().astype(np.int32)
    got = store.open_array(root, "train", "entropies").read().result()
    assert got.dtype == np.float32 and got.shape == tokens.shape
    np.testing.assert_array_equal(got, fn(tokens[None])[0])
    n_shards = -(-len(tokens) // shard)
    n_rows = sum(-(-min(shard, len(tokens) - s) // chunk_len) for s in range(0, len(tokens), shard))
    assert computed == n_shards
    assert set(shapes) == {(3, context_len + chunk_len)} and len(shapes) == -(-n_rows // 3)
    # every shard is stored: nothing left to compute
    assert store.compute_entropies(root, "train", fn, chunk_len, context_len, rows=3, progress=False) == 0


def test_entropies_resume_the_missing_shards_only():
    root = f"memory://{uuid.uuid4().hex}/"
    rng = np.random.default_rng(5)
    store.write_documents(root, {"train": [rng.integers(0, 256, 300, dtype=np.uint8).tobytes()],
                                 "heldout": [b"x"]}, shard=64)
    fn = toy_entropy_fn(5)
    store.compute_entropies(root, "train", fn, 16, 5, rows=2, progress=False)
    expected = store.open_array(root, "train", "entropies").read().result()
    store.delete_prefix(root, "train/entropies/c/1")  # shards 1 and 2 are lost, as in an interrupted run
    store.delete_prefix(root, "train/entropies/c/2")
    assert store.stored_shards(root, "train", "entropies") == {0, 3, 4}
    calls = []
    assert store.compute_entropies(root, "train", lambda t: (calls.append(1), fn(t))[1], 16, 5, rows=2,
                                   progress=False) == 2
    assert len(calls) == 4  # 2 shards x 4 chunks of 16, 2 rows per call
    np.testing.assert_array_equal(store.open_array(root, "train", "entropies").read().result(), expected)


def test_processes_share_the_missing_shards_in_lockstep():
    """Two processes (threads here, meeting at a real barrier) fill every shard together, each writing its
    own shards and calling the function the same number of times; the result equals one process's."""
    rng = np.random.default_rng(6)
    docs = [rng.integers(0, 256, 500, dtype=np.uint8).tobytes()]
    fn = toy_entropy_fn(5)
    roots = [f"memory://{uuid.uuid4().hex}/" for _ in range(2)]
    for root in roots:
        store.write_documents(root, {"train": docs, "heldout": [b"x"]}, shard=64)
    store.compute_entropies(roots[0], "train", fn, 16, 5, rows=4, progress=False)
    barrier = threading.Barrier(2, timeout=60)
    calls, written, errors = [0, 0], [None, None], []

    def process(index):
        def counted(t):
            calls[index] += 1
            return fn(t)
        try:
            written[index] = store.compute_entropies(roots[1], "train", counted, 16, 5, rows=4, index=index,
                                                     count=2, barrier=lambda name: barrier.wait(), progress=False)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert written == [4, 4]  # 502 tokens: 8 shards of 64, 4 per process
    assert calls[0] == calls[1] == 4  # 4 chunks of 16 per shard, 4 rows per call
    np.testing.assert_array_equal(store.open_array(roots[1], "train", "entropies").read().result(),
                                  store.open_array(roots[0], "train", "entropies").read().result())


# ---- pipeline ---------------------------------------------------------------------------------------------

def test_window_source(data_root):
    src = WindowSource(data_root, "train", SEQ, ("tokens", "entropies"))
    tokens = store.open_array(data_root, "train", "tokens").read().result()
    assert len(tokens) == 641 and len(src) == 40
    windows = [src[i] for i in range(len(src))]
    assert all(w["tokens"].shape == (SEQ + 1,) and w["tokens"].dtype == np.int32 for w in windows)
    assert all(w["entropies"].shape == (SEQ + 1,) and w["entropies"].dtype == np.float32 for w in windows)
    assert all(a["tokens"][-1] == b["tokens"][0] for a, b in itertools.pairwise(windows))
    np.testing.assert_array_equal(np.concatenate([windows[0]["tokens"]] + [w["tokens"][1:] for w in windows[1:]]),
                                  tokens)
    with pytest.raises(IndexError):
        src[len(src)]
    clone = pickle.loads(pickle.dumps(src))
    assert repr(clone) == repr(src) == (f"WindowSource(root={data_root!r}, split='train', seq_len={SEQ}, "
                                        "fields=('tokens', 'entropies'))")
    np.testing.assert_array_equal(clone[7]["entropies"], windows[7]["entropies"])


def test_train_batches_shapes_and_get_set_state(data_root):
    it = make_train_iterator(cfg(data_root), "train", LMWindows(), seed=3)
    first = next(it)
    assert {k: (v.shape, v.dtype) for k, v in first.items()} == {
        "tokens": ((4, SEQ), np.int32), "targets": ((4, SEQ), np.int32), "loss_mask": ((4, SEQ), np.float32)}
    np.testing.assert_array_equal(first["tokens"][:, 1:], first["targets"][:, :-1])
    assert (first["loss_mask"] == 1).all()
    state = it.get_state()
    expected = [next(it) for _ in range(12)]  # crosses the 40-window epoch boundary
    resumed = make_train_iterator(cfg(data_root), "train", LMWindows(), seed=3)
    resumed.set_state(state)
    assert window_keys([next(resumed) for _ in range(12)]) == window_keys(expected)
    other_seed = make_train_iterator(cfg(data_root), "train", LMWindows(), seed=4)
    assert window_keys([next(other_seed)]) != window_keys([first])


def test_orbax_checkpoint_restores_iterator(data_root, tmp_path):
    it = make_train_iterator(cfg(data_root), "train", LMWindows(), seed=5)
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",)) as mngr:
        mngr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = [next(it) for _ in range(4)]
    fresh = make_train_iterator(cfg(data_root), "train", LMWindows(), seed=5)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",)) as mngr:
        mngr.restore(mngr.latest_step(), args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    assert window_keys([next(fresh) for _ in range(4)]) == window_keys(expected)


def test_processes_see_disjoint_windows(data_root):
    src = WindowSource(data_root, "train", SEQ)
    all_inputs = {src[i]["tokens"][:-1].tobytes() for i in range(len(src))}
    seen = []
    for index in range(2):
        it = make_train_iterator(cfg(data_root), "train", LMWindows(), seed=0, process_index=index, process_count=2)
        batches = [next(it) for _ in range(10)]  # one epoch: 40 windows / 2 processes / 2 per batch
        assert batches[0]["tokens"].shape == (2, SEQ)
        seen.append(set(window_keys(batches)))
    assert len(seen[0]) == len(seen[1]) == 20 and not seen[0] & seen[1]
    assert seen[0] | seen[1] == all_inputs
    with pytest.raises(ValueError, match="divisible"):
        make_train_iterator(cfg(data_root, batch_size=3), "train", LMWindows(), seed=0, process_index=0,
                            process_count=2)


def test_worker_processes_resume(data_root):
    conf = cfg(data_root, worker_count=2)
    it = make_train_iterator(conf, "train", LMWindows(), seed=1)
    next(it)
    state = it.get_state()
    expected = window_keys([next(it) for _ in range(3)])
    it.close()
    resumed = make_train_iterator(conf, "train", LMWindows(), seed=1)
    resumed.set_state(state)
    assert window_keys([next(resumed) for _ in range(3)]) == expected
    resumed.close()


def test_patched_windows_truncate_past_max_patches(data_root):
    window = WindowSource(data_root, "train", SEQ)[3]
    out = PatchedWindows(PatchingConfig(mode="byte", max_patches=5)).map(window)
    assert out["patch_starts"].shape == (SEQ + 1,) and out["patch_starts"].dtype == bool
    np.testing.assert_array_equal(out["loss_mask"], np.r_[np.ones(5), np.zeros(SEQ - 5)].astype(np.float32))
    assert out["dropped_bytes"] == SEQ - 5 and out["dropped_bytes"].dtype == np.int32
    np.testing.assert_array_equal(out["targets"], window["tokens"][1:])

    roomy = PatchedWindows(PatchingConfig(mode="static", patch_size=4, max_patches=64))
    assert roomy.fields == ("tokens",)
    out = roomy.map(window)
    assert out["patch_starts"][:2].all() and (out["loss_mask"] == 1).all() and out["dropped_bytes"] == 0


def test_patched_batches_with_entropies(data_root):
    patching = PatchingConfig(mode="entropy", max_patches=4, max_patch_length=4)
    transform = PatchedWindows(patching, threshold=0.4)
    assert transform.fields == ("tokens", "entropies")
    batch = next(make_train_iterator(cfg(data_root), "train", transform, seed=2))
    assert batch["patch_starts"].shape == (4, SEQ + 1) and batch["dropped_bytes"].shape == (4,)
    assert batch["patch_starts"][:, :2].all()
    src = WindowSource(data_root, "train", SEQ, ("tokens", "entropies"))
    by_key = {src[i]["tokens"][:-1].tobytes(): src[i] for i in range(len(src))}
    for row in range(4):
        w = by_key[batch["tokens"][row].tobytes()]
        expected = start_flags(patching, w["tokens"][None, :-1], w["entropies"][None, :-1], 0.4)[0]
        np.testing.assert_array_equal(batch["patch_starts"][row], expected)
        assert batch["dropped_bytes"][row] == SEQ - batch["loss_mask"][row].sum()
    assert (batch["dropped_bytes"] >= 3).all()  # BOS + 3 patches of <= 4 bytes hold at most 13 bytes
    with pytest.raises(ValueError, match="threshold"):
        PatchedWindows(PatchingConfig(mode="entropy"))


def test_eval_batches_spread_over_split(data_root):
    src = WindowSource(data_root, "heldout", SEQ)
    assert len(src) == (90 + 120 + 4 - 1) // SEQ == 13
    batches = make_eval_batches(cfg(data_root), "heldout", LMWindows(), num_batches=2, batch_size=3)
    assert len(batches) == 2 and batches[0]["tokens"].shape == (3, SEQ)
    expected = [src[i]["tokens"][:-1].tobytes() for i in np.arange(6) * 13 // 6]  # 0, 2, 4, 6, 8, 10
    assert window_keys(batches) == expected
    assert window_keys(make_eval_batches(cfg(data_root), "heldout", LMWindows(), num_batches=2,
                                         batch_size=3)) == expected
    assert len(make_eval_batches(cfg(data_root), "heldout", LMWindows(), num_batches=100)) == 3  # 13 // 4
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_eval_batches(cfg(data_root), "heldout", LMWindows(), num_batches=1, batch_size=14)
