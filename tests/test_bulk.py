"""Bulk generation (`blt generate --input`): every record's output equals `api.generate` for the same prompt,
settings and seed (greedy and sampled, every method); bad records get error lines and the run goes on; a
rerun continues a killed job (a cut-off last line is not a record); two processes under `jax.distributed`
(launch/local.py) write one merged output identical to a single-process run; nothing recompiles as prompts
come and go.

Compile time dominates here, so the default tests share one small model and one set of shapes (buffer 64,
one prompt bucket, batch 3); the other methods and the two-process run (which compiles everything again in
two fresh processes) are slow tests."""

import base64
import dataclasses
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from blt_jax.cli import main
from blt_jax.config import get_preset
from blt_jax.generation import api, bulk, programs, prompts, samplers
from blt_jax.generation.sampling import SamplingConfig
from blt_jax.tokenizer import encode
from blt_jax.train import checkpoint as ckpt
from test_samplers import ALPHABET, random_model

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
BATCH, POSITIONS, SEED = 3, 64, 5  # every record below fits a 64-position row, as api.generate's own bucket
FLAGS = ["--batch-size", str(BATCH), "--max-positions", str(POSITIONS), "--seed", str(SEED), "--no-progress"]


def save_run(model, path: Path) -> str:
    """A parameters-only run directory for `model` (what `blt convert --params-only` writes)."""
    ckpt.write_run_meta(path, "blt", dataclasses.replace(get_preset("tiny"), model=model.cfg))
    ckpt.save_params(path / "params", model.params)
    ckpt.save_params(path / "entropy_model", model.entropy_params)
    return str(path)


def good_records(n: int, seed: int = 0) -> list[dict]:
    """Prompts of 1-30 bytes, budgets 3-24, greedy and sampled rows (temperature, top-p, top-k, own seeds)
    mixed; the first samples, so the live batch has one sampling structure from the start."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        prompt = bytes(rng.choice(list(ALPHABET), size=int(rng.integers(1, 31))).tolist()).decode()
        rec = {"id": f"r{i}", "prompt": prompt, "max_new_bytes": int(rng.integers(3, 25))}
        if i % 2 == 0:
            rec["temperature"] = float(rng.choice([0.7, 1.0, 1.3]))
            rec.update({"top_p": 0.9} if i % 4 == 0 else {"top_k": 20})
        if i % 3 == 0:
            rec["seed"] = int(rng.integers(0, 1000))
        records.append(rec)
    return records


BAD = [  # (input line, the error's start)
    ("{not json", "not a JSON object"),
    ('{"id": "r1", "prompt": "again"}', "id: 'r1' was used by an earlier record"),
    ('{"id": "neg", "prompt": "x", "max_new_bytes": -4}', "max_new_bytes: must be an integer >= 1"),
    ('{"id": "nan", "prompt": "x", "temperature": NaN}', "temperature: must be a finite number >= 0"),
    # float32 would make these inf and 0, and sample from garbage
    ('{"id": "hot", "prompt": "x", "temperature": 1e39}', "temperature: must be a finite number >= 0"),
    ('{"id": "p0", "prompt": "x", "top_p": 1e-50}', "top_p: must lie in (0, 1]"),
    ('{"id": "nop"}', "prompt: missing"),
    ('{"prompt": "no id"}', "id: missing"),
    ('{"id": "long", "prompt": "' + "y" * 60 + '", "max_new_bytes": 8}', "the prompt (60 bytes) and max_new_bytes=8"),
]


def expected(model, rec: dict, method: str = "ar") -> api.GenerationResult:
    sampling = SamplingConfig(temperature=rec.get("temperature", 0.0), top_k=rec.get("top_k", 0),
                              top_p=rec.get("top_p", 1.0))
    return api.generate(model, [rec["prompt"]], max_new_bytes=rec["max_new_bytes"], method=method,
                        sampling=sampling, seed=rec.get("seed", SEED))[0]


def assert_matches(line: dict, want: api.GenerationResult, label: str) -> None:
    cost = dict(want.cost)
    cost.pop("seconds")
    assert line["text"] == want.text, label
    assert base64.b64decode(line.get("bytes_b64", "")) == (want.new_bytes if "bytes_b64" in line else b""), label
    assert line["cost"] == cost, label
    assert line["finish_reason"] == ("stop" if want.token_ids[-1:] == [2] else "length"), label


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def generate(model, input: Path, output: Path, **options) -> dict:
    """`blt generate --input` with FLAGS' settings, in this process (the compiled programs are shared)."""
    return bulk.generate_file(model, str(input), str(output), api.method_config(model, "ar"), batch_size=BATCH,
                              max_positions=POSITIONS, defaults=bulk.Defaults(seed=SEED), progress=False,
                              **options)


def as_processes(n: int, monkeypatch, run) -> dict:
    """`run()` as each of n processes of a job under jax.distributed (n threads, each one process, sharing the
    barriers). Returns {process index: what its `run()` returned}."""

    class Process(threading.local):
        index = 0

    process = Process()

    class Processes:  # jax, as each of the processes sees it
        def __getattr__(self, name):
            return getattr(jax, name)

        def process_count(self):
            return n

        def process_index(self):
            return process.index

    barrier = threading.Barrier(n, timeout=600)
    monkeypatch.setattr(bulk, "jax", Processes())
    monkeypatch.setattr(bulk, "_barrier", lambda name: barrier.wait())
    results, failures = {}, []

    def run_process(index: int) -> None:
        process.index = index
        try:
            results[index] = run()
        except BaseException as e:
            failures.append(e)
            barrier.abort()  # the others stop at their next barrier instead of waiting there

    threads = [threading.Thread(target=run_process, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    return results


def made_by_the_killed_job(line: str) -> str:
    """An output line whose text the model would not generate: a record that keeps it was not generated again."""
    return json.dumps({**json.loads(line), "text": "made by the killed job"}, ensure_ascii=False) + "\n"


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A plain random BLT saved as a run, an input of good and bad records, and `blt generate --input` run on
    it once as it finishes and once in input order. Returns (the model, the run, its folder, the good records)."""
    base = tmp_path_factory.mktemp("bulk")
    model = random_model()
    run = save_run(model, base / "run")
    records = good_records(10)
    lines = [json.dumps(r) for r in records[:4]] + [""] + [b for b, _ in BAD] + [json.dumps(r) for r in records[4:]]
    (base / "in.jsonl").write_text("\n".join(lines) + "\n")
    for name, extra in (("out.jsonl", []), ("ordered.jsonl", ["--ordered"])):
        assert main(["generate", "--checkpoint", run, "--input", str(base / "in.jsonl"), "--output",
                     str(base / name), *FLAGS, *extra]) == 0
    return model, run, base, records


def test_every_record_equals_api_generate_and_bad_records_get_error_lines(job):
    model, _, base, records = job
    out = read_lines(base / "out.jsonl")
    assert len(out) == len(records) + len(BAD)  # one line per record, the blank line is not one
    by_id = {o["id"]: o for o in out if "error" not in o}
    assert set(by_id) == {r["id"] for r in records}
    for rec in records:
        assert_matches(by_id[rec["id"]], expected(model, rec), rec["id"])
    assert len({o["text"] for o in by_id.values()}) > 5, "outputs should differ across records"
    errors = [o for o in out if "error" in o]
    assert all(e["error"].startswith(start) for e, (_, start) in zip(errors, BAD, strict=True))
    # file lines: id missing or reused
    assert [e.get("line") for e in errors] == [6, 7, None, None, None, None, None, 13, None]
    assert {e["id"] for e in errors if "line" not in e} == {"neg", "nan", "hot", "p0", "nop", "long"}


def test_ordered_output_is_the_same_records_in_input_order(job):
    _, _, base, records = job
    ordered = (base / "ordered.jsonl").read_text().splitlines()
    assert sorted(ordered) == sorted((base / "out.jsonl").read_text().splitlines())
    ids = [json.loads(line)["id"] for line in ordered]
    assert ids == [r["id"] for r in records[:4]] + [None, "r1", "neg", "nan", "hot", "p0", "nop", None, "long"] + \
        [r["id"] for r in records[4:]]


def test_a_rerun_continues_a_killed_job_without_recompiling(job, capsys):
    """The first 4 records, an error line and half of the 6th line were written when the job died: the rerun
    drops the cut-off line, keeps the 4, generates the rest (the error line's record again) once, and
    compiles nothing new. A rerun of the finished job retries its error lines and, --ordered, leaves the file
    as it was, even after an unordered rerun put those lines last."""
    _, run, base, _ = job
    model = api.load(run)  # as the CLI loaded it (the compiled programs are keyed by how parameters are placed)
    full = (base / "ordered.jsonl").read_text().splitlines(keepends=True)
    killed = base / "killed.jsonl"
    killed.write_text("".join(full[:5]) + full[5][:17])
    bulk.settings_path(killed).write_text(bulk.settings_path(base / "ordered.jsonl").read_text())
    caches = [f._cache_size() for f in (samplers.prefill, samplers.advance, samplers.insert_rows)]

    def rerun(ordered: bool) -> dict:
        return bulk.generate_file(model, str(base / "in.jsonl"), str(killed), api.method_config(model, "ar"),
                                  batch_size=BATCH, max_positions=POSITIONS, defaults=bulk.Defaults(seed=SEED),
                                  ordered=ordered, progress=False)

    summary = rerun(ordered=True)
    assert "dropped a cut-off last line" in capsys.readouterr().err
    assert killed.read_text() == "".join(full)
    assert (summary["skipped"], summary["retried"], summary["generated"] + summary["errors"]) == \
        (4, 1, len(full) - 4)
    assert [f._cache_size() for f in (samplers.prefill, samplers.advance, samplers.insert_rows)] == caches
    errors = sum('"error": ' in line for line in full)
    again = rerun(ordered=False)  # the error lines' records come last
    assert (again["skipped"], again["retried"], again["errors"]) == (len(full) - errors, errors, errors)
    assert killed.read_text() != "".join(full) and sorted(killed.read_text().splitlines(True)) == sorted(full)
    again = rerun(ordered=True)
    assert again["skipped"] == len(full) - errors and killed.read_text() == "".join(full)


def test_a_rerun_with_other_settings_is_refused_not_mixed_in(job, capsys):
    """Resuming an output with other weights (another checkpoint), method, temperature or seed once appended
    records made differently to the old ones without a word."""
    _, run, base, _ = job
    out = base / "resume.jsonl"
    out.write_text((base / "out.jsonl").read_text().splitlines(keepends=True)[0])
    bulk.settings_path(out).write_text((bulk.settings_path(base / "out.jsonl")).read_text())
    before = out.read_text()
    other = save_run(random_model(seed=1), base / "other_run")
    for extra, changed in ((["--temperature", "0.9"], "sampling"), (["--method", "s"], "method 'ar' -> 's'"),
                           (["--seed", str(SEED + 1)], f"seed {SEED} -> {SEED + 1}"),
                           (["--checkpoint", other], "weights")):
        assert main(["generate", "--checkpoint", run, "--input", str(base / "in.jsonl"), "--output", str(out),
                     *FLAGS, *extra]) == 2  # the last --seed (--checkpoint) wins
        err = capsys.readouterr().err
        assert "its records were made with other settings" in err and changed in err, err
        assert out.read_text() == before


def test_refuses_an_output_it_did_not_write_and_options_without_input(job, capsys):
    _, run, base, _ = job
    foreign = base / "notes.jsonl"
    foreign.write_text("my notes\n")
    assert main(["generate", "--checkpoint", run, "--input", str(base / "in.jsonl"), "--output", str(foreign),
                 *FLAGS]) == 2
    assert "notes.jsonl:1: not a record written by `blt generate --input`" in capsys.readouterr().err
    assert foreign.read_text() == "my notes\n"
    assert main(["generate", "--checkpoint", run, "--batch-size", "4", "abc"]) == 2
    assert "--batch-size: only with --input" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", run, "--input", str(base / "in.jsonl"), "--method", "d"]) == 2
    assert "needs a model trained with the diffusion objective" in capsys.readouterr().err


def test_a_foreign_output_is_refused_and_left_byte_for_byte_as_it_was(job, capsys):
    """--output once dropped a file's last line if it lacked a newline before reading it (a one-line file was
    emptied, then filled with records), and took any JSON lines with an id (a prompts file, another tool's
    results) for finished records. Every line is now checked first; a settings file next to it changes
    nothing. The error is one line and the file, and its folder, stay as they were."""
    _, run, base, _ = job
    settings = bulk.settings_path(base / "out.jsonl").read_bytes()
    result = (base / "out.jsonl").read_bytes().splitlines(keepends=True)[0]
    cases = [("notes2.txt", b"my notes\nlast line without newline", False, 1),
             ("notes3.txt", b"single line, e.g. a config", False, 1),
             ("prompts.jsonl", (base / "in.jsonl").read_bytes(), True, 1),
             ("other_tool.jsonl", b'{"id": "q", "text": "x"}\n', True, 1),
             ("not_cut_off.jsonl", result + b"my last line", True, 2)]  # no killed run wrote that last line
    for name, content, with_settings, number in cases:
        path = base / "foreign" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        if with_settings:
            bulk.settings_path(path).write_bytes(settings)
        before = sorted(p.name for p in path.parent.iterdir())
        assert main(["generate", "--checkpoint", run, "--input", str(base / "in.jsonl"), "--output", str(path),
                     *FLAGS]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{name}:{number}: not a record written by `blt generate --input`" in err
        assert path.read_bytes() == content, name
        assert sorted(p.name for p in path.parent.iterdir()) == before, name  # no settings file made, no temp
        if with_settings:
            assert bulk.settings_path(path).read_bytes() == settings


def test_an_output_without_its_settings_file_is_refused_not_mixed(job, capsys):
    """With the settings file removed, a rerun with another temperature once added sampled records to greedy
    ones and wrote a settings file claiming the new temperature for all of them."""
    _, run, base, _ = job
    out = base / "no_settings.jsonl"
    out.write_text("".join((base / "out.jsonl").read_text().splitlines(keepends=True)[:3]))
    before = out.read_bytes()
    assert main(["generate", "--checkpoint", run, "--input", str(base / "in.jsonl"), "--output", str(out),
                 *FLAGS, "--temperature", "0.7"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has records but no settings file (no_settings.jsonl.settings.json)" in err
    assert out.read_bytes() == before and not bulk.settings_path(out).exists()


def test_error_lines_are_generated_again_on_a_rerun_and_replaced(job, tmp_path, capsys, monkeypatch):
    """The README's advice for a prompt over --max-positions is to rerun with a larger one; the rerun took the
    error line for a finished record and never generated it. Error lines are removed (the file replaced at
    once: a failure leaves the old one) and their records generated; the output keeps one line per record."""
    _, run, _, records = job
    long = {"id": "long", "prompt": "y" * 60, "max_new_bytes": 8}  # 70 positions
    (tmp_path / "in.jsonl").write_text(json.dumps(long) + "\n" + json.dumps(records[1]) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", "--checkpoint", run, "--input", str(tmp_path / "in.jsonl"), "--output", str(out), *FLAGS]
    assert main(args) == 0
    # the summary's time includes compiling: a job this small printed "1 B/s", read as the generation rate
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"\([\d,]+ bytes in \d+\.\d s, compiling included\)", summary) and "B/s" not in summary, summary
    first = read_lines(out)
    assert [o["id"] for o in first] == ["long", "r1"] and first[0]["error"].startswith("the prompt (60 bytes)")
    before, names = out.read_bytes(), sorted(p.name for p in tmp_path.iterdir())

    def no_room(src, dst):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(bulk.os, "replace", no_room)
        assert main(args + ["--max-positions", "128"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == names
    assert main(args + ["--max-positions", "128", "--ordered"]) == 0
    assert "1 generated" in (err := capsys.readouterr().err) and "1 retried (error lines of an earlier run)" in err
    lines = out.read_text().splitlines(keepends=True)
    assert [json.loads(line)["id"] for line in lines] == ["long", "r1"]  # --ordered: input order
    assert "error" not in json.loads(lines[0]) and json.loads(lines[0])["cost"]["new_bytes"] == 8
    assert lines[1].encode() == before.splitlines(keepends=True)[1]  # the generated record is kept as it was
    after = out.read_bytes()
    assert main(args + ["--max-positions", "128"]) == 0
    assert "2 already in the output" in (err := capsys.readouterr().err) and "retried" not in err
    assert out.read_bytes() == after


def test_two_processes_resume_a_killed_job_retrying_error_lines(job, tmp_path, monkeypatch, capsys):
    """The files of a two-process job under jax.distributed (two threads here, each one process, sharing the
    barriers): the killed job left an output with an error line and process 1's part with records, error
    lines and a cut-off line. The rerun keeps every generated record, generates the error lines' records
    again, merges the parts and leaves the file one process writes, with no part left."""
    _, run, base, _ = job
    model = api.load(run)
    full = (base / "ordered.jsonl").read_text().splitlines(keepends=True)  # line i: record i of the input
    failed = '{"id": "%s", "error": "an earlier failure"}\n'
    out = tmp_path / "out.jsonl"
    out.write_text(full[0] + full[1] + failed % "r2")
    bulk.settings_path(out).write_text(bulk.settings_path(base / "ordered.jsonl").read_text())
    assert '"line": 7' in full[5] and '"id": "r4"' in full[13]
    bulk.part_path(out, 1, 2).write_text(f"3\t{full[3]}5\t{full[5]}13\t{failed % 'r4'}15\t{full[15][:9]}")
    summaries = as_processes(2, monkeypatch, lambda: generate(model, base / "in.jsonl", out))
    assert out.read_text() == "".join(full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.settings.json"]
    # process 0 takes the even indices (0 skipped, 2 retried), process 1 the odd (1 and 3; 5 and 13)
    assert [(summaries[i]["skipped"], summaries[i]["retried"]) for i in (0, 1)] == [(1, 1), (2, 2)]
    assert "part-00001-of-00002: dropped a cut-off last line" in capsys.readouterr().err


def test_one_process_finishes_a_killed_two_process_job_from_its_parts(job, tmp_path, capsys):
    """A killed two-process job left no output, only its parts (finished records, an error line, a cut-off
    line). A rerun as one process (the job died, the user reruns on one machine) ignored them: it generated
    every record again and left the parts behind, for a later multi-process run to merge. It now merges them
    first: their records are kept, not generated again, and the output is the job's, in input order."""
    _, run, base, _ = job
    model = api.load(run)
    full = (base / "ordered.jsonl").read_text().splitlines(keepends=True)  # line i: record i of the input
    kept = [made_by_the_killed_job(line) for line in full[:4]]
    out = tmp_path / "out.jsonl"
    bulk.settings_path(out).write_text(bulk.settings_path(base / "ordered.jsonl").read_text())
    bulk.part_path(out, 0, 2).write_text(f"0\t{kept[0]}2\t{kept[2]}")
    assert '"id": "r6"' in full[15]
    bulk.part_path(out, 1, 2).write_text(f"1\t{kept[1]}3\t{kept[3]}15\t{{\"id\": \"r6\", \"error\": \"x\"}}\n"
                                         f"17\t{full[17][:9]}")
    summary = generate(model, base / "in.jsonl", out)  # as it finishes: the parts' order is input order
    assert (summary["skipped"], summary["retried"], summary["generated"] + summary["errors"]) == \
        (4, 1, len(full) - 4)
    assert out.read_text() == "".join(kept + full[4:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.settings.json"]
    assert "merged the 2 part file(s) a killed job left (4 finished records)" in capsys.readouterr().err


def test_the_parts_a_killed_job_left_are_checked_like_the_output(job, tmp_path, capsys):
    """A one-process rerun once took a folder with only a killed job's parts for a new output: with other
    settings, it rewrote the settings file and the parts' records (the old settings') were later merged into
    the new ones; a part it did not write went unnoticed. Both are refused in one line, nothing changed."""
    _, run, base, _ = job
    out = tmp_path / "out.jsonl"
    settings = bulk.settings_path(base / "ordered.jsonl").read_text()
    bulk.settings_path(out).write_text(settings)
    full = (base / "ordered.jsonl").read_text().splitlines(keepends=True)
    bulk.part_path(out, 1, 2).write_text(f"1\t{full[1]}")
    args = ["generate", "--checkpoint", run, "--input", str(base / "in.jsonl"), "--output", str(out), *FLAGS]
    for content, extra, says in ((f"0\t{full[0]}", ["--seed", str(SEED + 1)], f"seed {SEED} -> {SEED + 1}"),
                                 (f"0\t{full[0]}my notes\n", [], "part-00000-of-00002:2: not a record written")):
        bulk.part_path(out, 0, 2).write_text(content)
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        assert main(args + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_job_of_another_process_count_takes_a_killed_jobs_parts(job, tmp_path, monkeypatch, capsys):
    """A killed two-process job's parts, rerun by three processes: merged first, whatever the count (their
    records kept, not generated again), so every record is in the output once and no part is left. Its output
    already holds two of the parts' records, as a one-process rerun that ignored the parts left it; a part of
    another killed job holds one record again (kept once); a user's copy of a part is not a part (left alone)."""
    _, run, base, _ = job
    model = api.load(run)
    full = (base / "ordered.jsonl").read_text().splitlines(keepends=True)
    kept = [made_by_the_killed_job(line) for line in full[:4]]
    out = tmp_path / "out.jsonl"
    out.write_text(full[0] + full[1])
    bulk.settings_path(out).write_text(bulk.settings_path(base / "ordered.jsonl").read_text())
    bulk.part_path(out, 0, 2).write_text(f"0\t{kept[0]}2\t{kept[2]}")
    bulk.part_path(out, 1, 2).write_text(f"1\t{kept[1]}3\t{kept[3]}")
    bulk.part_path(out, 2, 3).write_text(f"3\t{kept[3]}")
    backup = Path(f"{bulk.part_path(out, 0, 2)}.bak")
    backup.write_text("my copy\n")
    summaries = as_processes(3, monkeypatch, lambda: generate(model, base / "in.jsonl", out))
    assert out.read_text() == "".join(full[:2] + kept[2:] + full[4:])
    assert sum(s["skipped"] for s in summaries.values()) == 4
    assert backup.read_text() == "my copy\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", backup.name, "out.jsonl.settings.json"]
    assert "merged the 3 part file(s) a killed job left (2 finished records)" in capsys.readouterr().err


def test_a_second_run_on_an_output_a_live_run_writes_is_refused(job, tmp_path, monkeypatch, capsys):
    """A probe: two `blt generate --input` runs on one --output at once each generated every record, and the
    file kept each line twice for good (a rerun skipped them all). While one run holds the output a second is
    refused in one line, before it reads or changes anything; the first's output has one line per record, and
    the output is free again once it ends (a lock file a killed run left does not hold it)."""
    _, run, _, records = job
    model = api.load(run)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:4]))
    out = tmp_path / "out.jsonl"
    args = ["generate", "--checkpoint", run, "--input", str(tmp_path / "in.jsonl"), "--output", str(out), *FLAGS]
    running, finish = threading.Event(), threading.Event()
    advance = bulk.ContinuousBatcher._advance

    def held_mid_run(self, carry):  # the first run waits in the middle of its job (rows admitted) for the second
        if threading.current_thread() is first:
            running.set()
            finish.wait(600)
        return advance(self, carry)

    monkeypatch.setattr(bulk.ContinuousBatcher, "_advance", held_mid_run)
    summary: dict = {}
    first = threading.Thread(target=lambda: summary.update(generate(model, tmp_path / "in.jsonl", out)))
    first.start()
    try:
        assert running.wait(600)
        code = main(args)
    finally:
        finish.set()
        first.join()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "another `blt generate` run is writing it" in err, err
    assert summary["generated"] == 4 and sorted(o["id"] for o in read_lines(out)) == ["r0", "r1", "r2", "r3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl", "out.jsonl.settings.json"]
    bulk.lock_path(out).touch()  # as a killed run leaves it: the OS let go of its lock
    assert main(args) == 0 and "4 already in the output" in capsys.readouterr().err
    assert not bulk.lock_path(out).exists()


def test_a_record_written_twice_is_kept_once(job, tmp_path, capsys):
    """What two runs at once left before the second was refused: each record's line twice, interleaved. A rerun
    said "16 already in the output" and kept every line; it now drops the repeats (each record keeps its first
    line, as merging parts does) and says so, so the output has one line per record again."""
    _, run, _, records = job
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:4]))
    out = tmp_path / "out.jsonl"
    args = ["generate", "--checkpoint", run, "--input", str(tmp_path / "in.jsonl"), "--output", str(out), *FLAGS]
    assert main(args) == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2] + [lines[0], made_by_the_killed_job(lines[1])] + lines[2:] + lines[2:]))
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "dropped 4 repeated lines" in err and "4 already in the output" in err, err
    assert out.read_text() == "".join(lines)


def test_max_positions_over_the_generation_limit_is_refused_up_front(job, tmp_path, capsys):
    """A probe: --max-positions 100000000 (or 2000000) hung the run, or got it killed at 22 GB RSS, without a
    word. More than api.generate's limit (its longest length bucket) is refused in one line before anything
    is written; the batcher `blt serve` runs refuses it too."""
    model, run, base, _ = job
    limit = prompts.LENGTH_BUCKETS[-1]
    with pytest.raises(ValueError, match=f"--max-positions {limit + 1}: more than the {limit} positions"):
        bulk.ContinuousBatcher(model, api.method_config(model, "ar"), max_positions=limit + 1)
    out = tmp_path / "out.jsonl"
    for n in (10**8, 2 * 10**6, limit + 1):  # the last --max-positions wins over FLAGS'
        assert main(["generate", "--checkpoint", run, "--input", str(base / "in.jsonl"), "--output", str(out),
                     *FLAGS, "--max-positions", str(n)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--max-positions {n}: more than the {limit} positions" in err, err
    assert list(tmp_path.iterdir()) == []


def test_another_dtype_is_named_not_taken_for_other_weights(job, tmp_path, capsys):
    """After --dtype bfloat16 the refusal said the weights changed ('9250111ed64b17cb' -> '873c4e188b6ccfaf'),
    though only the dtype did: it names the dtype. An output whose settings file predates the dtype setting
    still tells another dtype by the weights' digest, and is continued with the same settings."""
    _, run, base, _ = job
    out = tmp_path / "out.jsonl"
    out.write_text((base / "out.jsonl").read_text())
    settings = json.loads(bulk.settings_path(base / "out.jsonl").read_text())
    bulk.settings_path(out).write_text(json.dumps(settings))
    args = ["generate", "--checkpoint", run, "--input", str(base / "in.jsonl"), "--output", str(out), *FLAGS]
    before = out.read_bytes()
    assert main(args + ["--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert "its records were made with other settings (dtype 'float32' -> 'bfloat16');" in err, err
    del settings["dtype"]
    bulk.settings_path(out).write_text(json.dumps(settings))
    assert main(args + ["--dtype", "bfloat16"]) == 2
    assert "(weights " in capsys.readouterr().err and out.read_bytes() == before
    assert main(args) == 0 and "10 already in the output" in capsys.readouterr().err


def test_near_the_memory_map_limit_the_programs_are_freed_and_the_output_stays_the_same(job, monkeypatch):
    """A server that meets every method and prompt length compiles one program per prompt bucket per method
    (measured: each 4096-position bucket's prefill holds ~2,060 more memory maps) and used to die inside LLVM
    past vm.max_map_count. Near the limit, a new bucket's admission first frees every compiled program; the
    output does not change. The process's map count is the one thing faked: it drops once programs are freed."""
    _, run, base, _ = job
    model = api.load(run)
    before = programs.frees
    monkeypatch.setattr(programs, "map_usage", lambda: (60_000 if programs.frees == before else 5_000, 65_530))
    monkeypatch.setattr(programs, "CHECK_EVERY_S", 0.0)
    out = base / "near_the_limit.jsonl"
    with pytest.warns(programs.CompiledProgramsFreed, match="they were freed"):
        bulk.generate_file(model, str(base / "in.jsonl"), str(out), api.method_config(model, "ar"),
                           batch_size=BATCH, max_positions=POSITIONS, defaults=bulk.Defaults(seed=SEED),
                           ordered=True, progress=False)
    assert programs.frees == before + 1  # once: the count it left is well below the limit
    assert out.read_text() == (base / "ordered.jsonl").read_text()


def test_a_batch_larger_than_the_input_is_cut_to_it(job, tmp_path):
    """A probe: `--batch-size 100000000` on two records ran out of memory (a traceback): rows no record can fill
    are not allocated."""
    model, run, _, records = job
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    summary = bulk.generate_file(api.load(run), str(tmp_path / "two.jsonl"), str(tmp_path / "out.jsonl"),
                                 api.method_config(model, "ar"), batch_size=10**8, max_positions=POSITIONS,
                                 defaults=bulk.Defaults(16, SamplingConfig(), SEED), progress=False)
    assert summary["generated"] == 2
    for line, rec in zip(read_lines(tmp_path / "out.jsonl"), records[:2], strict=True):
        assert_matches(line, expected(model, rec), rec["id"])


def test_a_misspelt_setting_is_an_error_not_a_default():
    """A record's `temprature` or `max_tokens` once ran silently with the default; other extra fields are the
    user's metadata and pass."""
    for key, name in (("temprature", "temperature"), ("max_new_byte", "max_new_bytes"), ("topk", "top_k"),
                      ("max_tokens", "max_new_bytes")):
        with pytest.raises(bulk.RecordError, match=f"{key}: not a field; did you mean {name}"):
            bulk.record_settings({"prompt": "a", key: 1}, bulk.Defaults())
    prompt, budget, _, _ = bulk.record_settings({"prompt": "a", "source": "x", "uid": 3, "max_new_bytes": 5},
                                                bulk.Defaults())
    assert (prompt, budget) == (b"a", 5)


def test_maps_that_freeing_cannot_release_are_not_freed_again(monkeypatch):
    """If the maps are not the programs' (freeing leaves as many), freeing again would only recompile
    everything on every call: it warns once and stops."""
    looks = []
    monkeypatch.setattr(programs, "map_usage", lambda: looks.append(1) or (60_000, 65_530))
    monkeypatch.setattr(programs, "_gave_up", False)
    monkeypatch.setattr(programs, "CHECK_EVERY_S", 0.0)
    before = programs.frees
    with pytest.warns(programs.CompiledProgramsFreed, match="something else holds them"):
        assert programs.make_room()
    assert not programs.make_room() and programs.frees == before + 1 and len(looks) == 2  # before and after


def test_the_map_count_is_read_at_most_every_check_interval(monkeypatch):
    looks = []
    monkeypatch.setattr(programs, "map_usage", lambda: looks.append(1) or (100, 65_530))
    monkeypatch.setattr(programs, "_last_check", -float("inf"))
    assert not programs.make_room() and not programs.make_room() and len(looks) == 1


@pytest.mark.slow
def test_two_processes_write_one_output_identical_to_one_process(job, tmp_path):
    """launch/local.py runs `blt generate --input` in 2 processes joined by jax.distributed: each generates
    every other record into its part, process 0 merges them in input order and removes the parts. A rerun
    generates the error lines' records again and leaves the same file."""
    _, run, base, _ = job
    out = tmp_path / "out.jsonl"
    sys.path.insert(0, str(LAUNCH))
    try:
        import local  # noqa: PLC0415 (launch/ is not a package: imported from its folder)
    finally:
        sys.path.remove(str(LAUNCH))
    log = tmp_path / "log.txt"
    for mode in ("w", "a"):  # then a rerun: every error line's record again, the same file
        with open(log, mode) as f:
            code = local.launch([sys.executable, "-m", "blt_jax", "generate", "--checkpoint", run, "--input",
                                 str(base / "in.jsonl"), "--output", str(out), *FLAGS], 2, 1, timeout=600, out=f)
        assert code == 0, log.read_text()[-3000:]
        assert out.read_text() == (base / "ordered.jsonl").read_text()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "out.jsonl", "out.jsonl.settings.json"]
    assert "[process 1 of 2]" in log.read_text() and "retried (error lines of an earlier run)" in log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["s", "d", "dv"])
def test_every_method_equals_api_generate_under_continuous_batching(method):
    """BLT-S, BLT-D and BLT-DV through the batcher (3 rows refilled 11 times, greedy and sampled rows mixed,
    a second prompt bucket) == api.generate of each prompt alone."""
    model = random_model(block_size=4)
    mc = api.method_config(model, method)
    batcher = bulk.ContinuousBatcher(model, mc, batch_size=BATCH, max_positions=96)
    records = good_records(14, seed=1)
    records[3]["prompt"] = "abc(), " * 10  # 70 bytes: the second prompt bucket
    records[3]["max_new_bytes"] = 9
    requests = iter([bulk.Request(encode(r["prompt"]), r["max_new_bytes"],
                                  SamplingConfig(r.get("temperature", 0.0), r.get("top_k", 0), r.get("top_p", 1.0)),
                                  bulk.request_key(r.get("seed", SEED)), tag=r) for r in records])
    got = {f.request.tag["id"]: f for f in batcher.run(lambda wait: next(requests, bulk.END))}
    assert len(got) == len(records) and batcher.peak_rows == BATCH
    for rec in records:
        want = expected(model, rec, method)
        assert got[rec["id"]].ids.tolist() == want.token_ids, f"{method} {rec['id']}"
        cost = dict(want.cost)
        cost.pop("seconds")
        assert bulk.cost_of(got[rec["id"]], method, bulk.ParamsForCost.of(model.cfg)) == cost



@pytest.mark.slow
def test_a_stopped_two_process_job_ends_and_its_rerun_finishes(job, tmp_path):
    """A probe: SIGTERM to a 2-process job, while process 0 (its share done) waited in the barrier for process 1,
    hung both for good: process 1 stopped (status 75), then jax's shutdown waited for process 0, which waited
    for process 1. Now a stopped process leaves the job at once; the job ends, and the same command again
    finishes it with every record once."""
    _, run, _, _ = job
    # process 0 takes the even records (1 byte each), process 1 the odd ones (long): process 0 finishes first
    records = [{"id": f"r{i}", "prompt": "abc" * (1 + i % 5), "max_new_bytes": 1 if i % 2 == 0 else 90}
               for i in range(200)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    command = [sys.executable, str(LAUNCH / "local.py"), "--num-processes", "2", "--devices-per-process", "1", "--",
               sys.executable, "-m", "blt_jax", "generate", "--checkpoint", run, "--input", str(tmp_path / "in.jsonl"),
               "--output", str(out), "--batch-size", "1", "--max-positions", "128", "--no-eos-stop", "--no-progress"]
    part0, part1 = (bulk.part_path(out, p, 2) for p in range(2))
    lines = lambda p: len(p.read_text().splitlines()) if p.exists() else 0  # noqa: E731
    with open(tmp_path / "log.txt", "w") as log:
        launcher = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not (lines(part0) == 100 and lines(part1) >= 1) and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert launcher.poll() is None and lines(part1) < 100, (tmp_path / "log.txt").read_text()[-3000:]
        launcher.send_signal(signal.SIGTERM)
        try:
            code = launcher.wait(timeout=150)
        except subprocess.TimeoutExpired:
            launcher.kill()
            subprocess.run(["pkill", "-KILL", "-f", str(tmp_path / "in.jsonl")])
            raise AssertionError("the stopped job hung") from None
    assert code != 0, (tmp_path / "log.txt").read_text()[-3000:]
    assert "this process's part" in (tmp_path / "log.txt").read_text()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    got = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(got) == sorted(r["id"] for r in records)
