"""`blt prepare` on pretraining data as it ships: JSON Lines (plain, gzip, zstd), Parquet and text, given as
files, folders or glob patterns; bad records; the record-level held-out split; one-line errors for broken
inputs; and the same store from one process or from two processes joined by jax.distributed."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from blt_jax import prepare
from blt_jax.cli import main
from blt_jax.config import ConfigError
from blt_jax.data import corpus, sources, store
from blt_jax.tokenizer import BOS_ID, decode_bytes

REPO = Path(__file__).resolve().parents[1]


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["byte", "latent", "patch", "entropy", "ünïcödé", "λ", "€", "tab\there", "quote\"d", "new\nline"]
    return [" ".join(rng.choice(words, int(rng.integers(1, 40)))) for _ in range(n)]


def jsonl(records: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def documents(root: str, split: str) -> list[bytes]:
    tokens = store.open_array(root, split, "tokens").read().result()
    return [decode_bytes(d) for d in np.split(tokens, np.nonzero(tokens == BOS_ID)[0][1:])]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """A folder with every format; {file name: its documents in order}."""
    base = tmp_path_factory.mktemp("formats")
    docs = {"a.jsonl": texts(60, 0), "b.jsonl.gz": texts(30, 1), "sub/c.jsonl.zst": texts(40, 2),
            "d.parquet": texts(50, 3), "e.txt": ["a plain text file\nwith two lines\n"],
            "f.md.gz": ["# compressed text, one document\n"]}
    (base / "sub").mkdir()
    (base / "a.jsonl").write_bytes(jsonl([{"text": t, "id": i} for i, t in enumerate(docs["a.jsonl"])]))
    (base / "b.jsonl.gz").write_bytes(gzip.compress(jsonl([{"text": t} for t in docs["b.jsonl.gz"]])))
    # two zstd frames, as concatenated shards are
    frames = [zstandard.ZstdCompressor().compress(jsonl([{"text": t} for t in part]))
              for part in (docs["sub/c.jsonl.zst"][:25], docs["sub/c.jsonl.zst"][25:])]
    (base / "sub" / "c.jsonl.zst").write_bytes(b"".join(frames))
    pq.write_table(pa.table({"text": docs["d.parquet"], "n": range(50)}), base / "d.parquet", row_group_size=16)
    (base / "e.txt").write_text(docs["e.txt"][0])
    (base / "f.md.gz").write_bytes(gzip.compress(docs["f.md.gz"][0].encode()))
    return base, docs


def test_every_format_gives_one_document_per_record_and_a_record_level_split(shards, tmp_path):
    base, docs = shards
    root = str(tmp_path / "store")
    manifest = prepare.prepare_corpus(root, [str(base)], heldout_fraction=0.2)
    got = {split: documents(root, split) for split in store.SPLITS}
    # expected: files in name order, records in order, each record held out by a hash of (file, line / row)
    expected = {"train": [], "heldout": []}
    for name in sorted(docs):
        fmt = sources.file_format(name)
        for i, text in enumerate(docs[name], 1):
            if fmt in sources.RECORD_FORMATS:
                split = "heldout" if corpus.split_key(name, i) < 0.2 else "train"
            else:
                split = "heldout" if corpus.split_key(name) < 0.2 else "train"
            expected[split].append(text.encode())
    assert got == expected
    assert 0 < len(got["heldout"]) < len(got["train"])
    # the record files each put records on both sides (the split is not by file)
    held_files = {e["name"] for e in manifest["heldout"]["files"]}
    train_files = {e["name"] for e in manifest["train"]["files"]}
    assert {"a.jsonl", "d.parquet", "sub/c.jsonl.zst"} <= held_files & train_files
    for split in store.SPLITS:
        assert sum(e["docs"] for e in manifest[split]["files"]) == manifest[split]["num_docs"] == len(got[split])
        assert manifest[split]["num_tokens"] == sum(len(d) + 2 for d in got[split])
    assert manifest["inputs"]["bad_records"] == 0 and manifest["inputs"]["files"] == 6


def test_a_single_record_file_still_gets_a_heldout_part(tmp_path):
    path = tmp_path / "one.jsonl"
    records = texts(200, 7)
    path.write_bytes(jsonl([{"text": t} for t in records]))
    manifest = prepare.prepare_corpus(str(tmp_path / "store"), [str(path)], heldout_fraction=0.05)
    held = [i for i in range(1, 201) if corpus.split_key("one.jsonl", i) < 0.05]
    assert manifest["heldout"]["num_docs"] == len(held) > 0
    assert documents(str(tmp_path / "store"), "heldout") == [records[i - 1].encode() for i in held]


def _name_where(n: int, one_sided) -> str:
    """A record file name whose n records' split keys satisfy `one_sided` (a deterministic search)."""
    return next(name for name in (f"r{i}.jsonl" for i in range(10_000))
                if one_sided([corpus.split_key(name, k) for k in range(1, n + 1)]))


@pytest.mark.parametrize("fraction", [0.02, 0.99])
def test_a_small_record_corpus_on_one_side_of_the_fraction_still_gets_both_splits(tmp_path, fraction):
    """80 records at 0.02 hold none out about one time in five (and 20 at 0.99 keep none for training): the
    record whose split key lies nearest the other side moves there, deterministically."""
    n = 80 if fraction < 0.5 else 20
    name = _name_where(n, (lambda keys: min(keys) >= fraction) if fraction < 0.5 else
                       (lambda keys: max(keys) < fraction))
    records = texts(n, 3)
    (tmp_path / name).write_bytes(jsonl([{"text": t} for t in records]))
    root = str(tmp_path / "store")
    manifest = prepare.prepare_corpus(root, [str(tmp_path / name)], heldout_fraction=fraction)
    keys = [corpus.split_key(name, k) for k in range(1, n + 1)]
    moved = keys.index(min(keys) if fraction < 0.5 else max(keys))
    lone, rest = ("heldout", "train") if fraction < 0.5 else ("train", "heldout")
    assert documents(root, lone) == [records[moved].encode()]
    assert documents(root, rest) == [r.encode() for i, r in enumerate(records) if i != moved]
    assert manifest[lone]["num_docs"] == 1 and manifest[rest]["num_docs"] == n - 1
    assert manifest["inputs"]["heldout_threshold"] != fraction
    assert prepare.prepare_corpus(root, [str(tmp_path / name)], heldout_fraction=fraction) == manifest  # kept


def test_glob_patterns_and_the_text_field(tmp_path):
    for i in range(3):
        (tmp_path / f"part-{i}.jsonl").write_bytes(jsonl([{"content": t} for t in texts(20, i)]))
    (tmp_path / "notes.txt").write_text("not matched by the pattern")
    root = str(tmp_path / "store")
    manifest = prepare.prepare_corpus(root, [str(tmp_path / "part-*.jsonl")], heldout_fraction=0.3,
                                      text_field="content")
    names = {e["name"] for split in store.SPLITS for e in manifest[split]["files"]}
    assert names == {"part-0.jsonl", "part-1.jsonl", "part-2.jsonl"}
    assert manifest["train"]["num_docs"] + manifest["heldout"]["num_docs"] == 60
    # the default field does not exist in these records: every one is bad, so nothing is left
    with pytest.raises(ValueError, match="empty corpus.*60 bad records"):
        prepare.prepare_corpus(str(tmp_path / "other"), [str(tmp_path / "part-*.jsonl")])
    with pytest.raises(FileNotFoundError, match="no files match"):
        prepare.prepare_corpus(str(tmp_path / "other"), [str(tmp_path / "*.parquet")])


def test_bad_records_are_counted_with_file_and_line_or_refused(tmp_path, capsys):
    good = texts(12, 8)
    lines = [json.dumps({"text": t}) for t in good]
    lines[2] = "{broken json"
    lines[4] = json.dumps(["not", "an", "object"])
    lines[6] = json.dumps({"txt": "wrong field"})
    lines[8] = json.dumps({"text": 42})
    lines[10] = '{"text": "lone \\udc80 surrogate"}'
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.jsonl").write_bytes(("\n".join(lines) + "\n\n").encode() + b'{"text": "\xff not utf-8"}\n')
    pq.write_table(pa.table({"text": ["fine", None, "also fine"]}), data / "y.parquet")
    root = str(tmp_path / "store")
    assert main(["prepare", "--data", str(data), "--store", root, "--heldout-fraction", "0.5",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "skipped 7 bad records" in err and "x.jsonl:3: invalid JSON" in err
    inputs = store.read_manifest(root)["inputs"]
    assert inputs["bad_records"] == 7
    assert inputs["bad_record_examples"] == [
        "x.jsonl:3: invalid JSON", "x.jsonl:5: not a JSON object (list)", "x.jsonl:7: no 'text' field",
        "x.jsonl:9: 'text' is int, not a string", "x.jsonl:11: 'text' holds a lone surrogate (no UTF-8 form)",
        "x.jsonl:14: invalid JSON", "y.parquet:row 2: 'text' is null, not a string"]
    kept = sorted(documents(root, "train") + documents(root, "heldout"))
    assert kept == sorted([t.encode() for i, t in enumerate(good) if i not in (2, 4, 6, 8, 10)]
                          + [b"fine", b"also fine"])
    assert main(["prepare", "--data", str(data), "--store", str(tmp_path / "strict"), "--strict",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("blt prepare: error: x.jsonl:3: invalid JSON (--strict refuses bad records; without it they "
                   "are skipped and counted)")
    assert store.manifest_or_none(str(tmp_path / "strict")) is None  # nothing half-written passes for a store


def _broken_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (input path, what the one-line error must say)."""
    cases = {}
    (tmp_path / "empty.jsonl").write_bytes(b"\n\n  \n")
    cases["empty input"] = (tmp_path / "empty.jsonl", "empty corpus: .* holds no documents")
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "blob.bin").write_bytes(b"\0\1\2" * 100)
    (tmp_path / "unreadable" / "empty.txt").write_bytes(b"")
    (tmp_path / "unreadable" / ".hidden.jsonl").write_bytes(jsonl([{"text": "hidden"}]))
    cases["no readable files"] = (tmp_path / "unreadable", "empty corpus: no readable files in .*unreadable")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    cases["parquet without the column"] = (tmp_path / "nocol.parquet",
                                           r"nocol.parquet: no column 'text' \(columns: body\)")
    blob = jsonl([{"text": t} for t in texts(400, 9)])
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(blob)[:-30])
    cases["truncated gzip"] = (tmp_path / "cut.jsonl.gz", "cut.jsonl.gz: truncated or corrupt gzip file")
    (tmp_path / "cut.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(blob)[:-30])
    cases["truncated zstd"] = (tmp_path / "cut.jsonl.zst", "cut.jsonl.zst: truncated or corrupt zstd file")
    pq.write_table(pa.table({"text": texts(50, 10)}), tmp_path / "whole.parquet")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "whole.parquet").read_bytes()[:-100])
    cases["truncated parquet"] = (tmp_path / "cut.parquet", "cut.parquet: not a readable Parquet file")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "int.parquet")
    cases["parquet with a non-string column"] = (tmp_path / "int.parquet", "int.parquet: column 'text' holds int64")
    cases["missing path"] = (tmp_path / "nowhere", "data path does not exist: .*nowhere")
    return cases


def test_broken_inputs_get_one_line_errors_naming_the_file(tmp_path, capsys):
    for what, (path, message) in _broken_inputs(tmp_path).items():
        root = tmp_path / "stores" / what.replace(" ", "_")
        assert main(["prepare", "--data", str(path), "--store", str(root), "--no-progress"]) == 2, what
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("blt prepare: error: "), (what, err)
        assert re.search(message, err), (what, err)
        assert store.manifest_or_none(str(root)) is None, what


def test_records_stream_in_bounded_chunks(tmp_path):
    path = tmp_path / "big.jsonl.zst"
    records = texts(500, 11)
    path.write_bytes(zstandard.ZstdCompressor().compress(jsonl([{"text": t} for t in records])))
    f = sources.input_files([path], tmp_path)[0]
    chunks = list(sources.records(f, "text", sources.BadRecords(), chunk_bytes=1000))
    longest = max(len(t.encode()) for t in records)
    assert len(chunks) > 10 and all(c.data.size < 1000 + longest for c in chunks)
    joined = b"".join(c.data.tobytes() for c in chunks)
    assert joined == b"".join(t.encode() for t in records)
    assert np.concatenate([c.numbers for c in chunks]).tolist() == list(range(1, 501))


def test_file_shares_are_contiguous_balanced_and_cover_every_file():
    sizes = [5, 1, 1, 1, 10, 2, 2, 8, 0, 3]
    for count in (1, 2, 3, 4, 16):
        shares = prepare.file_shares(sizes, count)
        assert len(shares) == count
        assert [i for r in shares for i in r] == list(range(len(sizes)))
    halves = prepare.file_shares(sizes, 2)
    assert [sum(sizes[i] for i in r) for r in halves] == [18, 15]
    assert prepare.file_shares([], 3) == [range(0)] * 3


def test_text_only_inputs_keep_the_file_level_split(tmp_path):
    """Plain text files are held out whole, as before record formats existed (the default corpus's split
    and the experiments' numbers depend on it)."""
    files = [tmp_path / "docs" / f"doc{i:03d}.txt" for i in range(40)]
    files[0].parent.mkdir()
    for i, f in enumerate(files):
        f.write_text(f"document {i}\n")
    manifest = prepare.prepare_corpus(str(tmp_path / "store"), [str(tmp_path / "docs")], heldout_fraction=0.1)
    _, heldout = corpus.split_files(files, tmp_path / "docs", 0.1)
    assert [e["name"] for e in manifest["heldout"]["files"]] == [f.name for f in heldout]
    assert all(e["docs"] == 1 for e in manifest["train"]["files"])


def test_a_files_split_does_not_depend_on_the_other_inputs(tmp_path):
    """Preparing folder a alone, a with folder b, or a through a glob pattern holds out the same documents of
    a: otherwise a model trained on one store and scored on another would be scored on its training data.
    Text files (a whole file each) and records (one by one) both."""
    data = tmp_path / "corpus"
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        for i in range(40):
            (data / name / f"doc{i:03d}.txt").write_text(f"{name} document {i}\n")
    stores = {}
    for label, inputs in (("a", [data / "a"]), ("a+b", [data / "a", data / "b"]),
                          ("pattern", [str(data / "a" / "*.txt"), data / "b"])):
        stores[label] = tmp_path / f"store-{label}"
        prepare.prepare_corpus(str(stores[label]), [str(p) for p in inputs], heldout_fraction=0.2)
    of_a = lambda docs: {d for d in docs if d.startswith(b"a ")}  # noqa: E731
    held = {label: of_a(documents(str(root), "heldout")) for label, root in stores.items()}
    assert held["a"] and held["a"] == held["a+b"] == held["pattern"]

    (data / "a" / "records.jsonl").write_bytes(jsonl([{"text": f"a record {i}"} for i in range(200)]))
    (data / "b" / "records.jsonl").write_bytes(jsonl([{"text": f"b record {i}"} for i in range(200)]))
    records = {}
    for label, inputs in (("a", [data / "a"]), ("a+b", [data / "a", data / "b"])):
        root = tmp_path / f"records-{label}"
        prepare.prepare_corpus(str(root), [str(p) for p in inputs], heldout_fraction=0.2)
        records[label] = {d for d in documents(str(root), "heldout") if d.startswith(b"a record")}
    assert records["a"] and records["a"] == records["a+b"]


def test_the_capped_training_subset_does_not_depend_on_where_the_corpus_lies(tmp_path):
    """`max_train_bytes` keeps the same files of the same corpus wherever it is on disk (the quickstart's 3 MB
    subset of the standard library must not change with the Python installation's prefix)."""
    plans = []
    for place in ("here", "elsewhere/deeper"):
        folder = tmp_path / place / "corpus"
        folder.mkdir(parents=True)
        for i in range(60):
            (folder / f"doc{i:03d}.txt").write_text(f"document {i}\n" * 10)
        plans.append(prepare.plan_corpus([str(folder)], 0.1, max_train_bytes=2_000))
    kept = [{n for n, s in p.text_split.items() if s == "train"} for p in plans]
    assert 0 < len(kept[0]) < 50 and kept[0] == kept[1]


@pytest.mark.parametrize("value", ["0", "-5"])
def test_max_train_bytes_below_one_is_refused_naming_it(tmp_path, capsys, value):
    """0 (or a negative count) left the training split empty and the error blamed --heldout-fraction."""
    for i in range(4):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n" * 10)
    root = tmp_path / "store"
    with pytest.raises(SystemExit) as e:  # the command line refuses it while parsing
        main(["prepare", "--data", str(tmp_path / "doc*.txt"), "--store", str(root), "--max-train-bytes", value,
              "--no-progress"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and error.startswith("blt prepare: error: argument --max-train-bytes: must be >= 1")
    with pytest.raises(ConfigError, match=f"--max-train-bytes: must be >= 1 .*, got {value}$"):  # and the API
        prepare.plan_corpus([str(tmp_path / "doc*.txt")], max_train_bytes=int(value), store_root=str(root))
    assert not root.exists()


# ---- the same store from 1 and 2 processes ------------------------------------------------------------------

def _pod_corpus(base: Path) -> Path:
    data = base / "pod"
    data.mkdir()
    for i in range(5):
        records = [{"text": t} for t in texts(60, 20 + i)]
        blob = jsonl(records)
        name = data / f"shard-{i}.jsonl"
        if i % 2:
            name.with_suffix(".jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(blob))
        else:
            name.write_bytes(blob)
    pq.write_table(pa.table({"text": texts(80, 30)}), data / "shard-5.parquet")
    (data / "readme.txt").write_text("a text file among the shards\n" * 50)
    return data


def test_two_processes_prepare_the_same_store_as_one(tiny_runs, tmp_path):
    """Tokens, entropies (sharded over 2 processes x 4 CPU devices) and the calibrated threshold: byte for
    byte what one process with one device writes; the manifests are identical."""
    entropy_run = str(tiny_runs[2])
    data = _pod_corpus(tmp_path)
    shard = 2048
    one = str(tmp_path / "one")
    prepare.prepare_corpus(one, [str(data)], heldout_fraction=0.2, shard_tokens=shard)
    cfg = tiny_runs[0]
    prepare.ensure_entropies(one, entropy_run, cfg.model.patching, cfg.data.seq_len, progress=False)
    two = str(tmp_path / "two")
    cmd = [sys.executable, "-m", "blt_jax", "prepare", "--preset", "tiny", "--data", str(data), "--store", two,
           "--heldout-fraction", "0.2", "--shard-tokens", str(shard), "--entropy-run", entropy_run, "--no-progress"]
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "local.py"), "--num-processes", "2",
                           "--devices-per-process", "4", "--timeout", "300", "--", *cmd],
                          cwd=REPO, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert store.read_manifest(two) == store.read_manifest(one)
    for split in store.SPLITS:
        for name in ("tokens", "entropies"):
            a = store.open_array(one, split, name).read().result()
            b = store.open_array(two, split, name).read().result()
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b, err_msg=f"{split}/{name}")
    tokens = store.open_array(one, "train", "tokens")
    assert tokens.shape[0] > 4 * shard  # several shards, so both processes wrote some of each array
    assert not [p for p in Path(two).rglob("*") if p.is_file() and store.STAGING in p.parts]  # staging is gone


def test_a_stopped_entropy_computation_reports_it_and_the_same_command_finishes(tiny_runs, tmp_path, capsys,
                                                                                 monkeypatch):
    """A probe: Ctrl-C during `prepare --entropy-run` printed a KeyboardInterrupt traceback, SIGTERM ended it
    with no word. Both now say how to finish (exit 75, like an interrupted train), and the rerun does."""
    entropy_run = str(tiny_runs[2])
    root = str(tmp_path / "store")
    prepare.prepare_corpus(root, [str(_pod_corpus(tmp_path))], heldout_fraction=0.2, shard_tokens=2048)
    cmd = ["prepare", "--preset", "tiny", "--store", root, "--entropy-run", entropy_run, "--no-progress"]
    calibrate = prepare.calibrate

    def stopped_by_a_scheduler(*a, **k):  # the entropies are written; the stop comes while calibrating
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(prepare, "calibrate", stopped_by_a_scheduler)
    assert main(cmd) == 75
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "blt prepare: stopped; run the same command again to finish")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command's handler is gone
    monkeypatch.setattr(prepare, "calibrate", calibrate)
    assert main(cmd) == 0
    out = capsys.readouterr().out
    assert "entropies already complete" in out and "calibrated threshold" in out
