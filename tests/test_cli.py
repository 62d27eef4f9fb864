"""The `blt` command line: real subcommands on a real (tiny) trained run."""

import io
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from blt_jax import cli
from blt_jax.cli import main
from blt_jax.data import store
from blt_jax.evaluate import heldout_bpb
from blt_jax.generation import api


def test_params_prints_paper_counts(capsys):
    assert main(["params", "--preset", "fast-blt-1b"]) == 0
    out = capsys.readouterr().out
    assert "1,284,608,000" in out and "19,406,848" in out and "157,852,672" in out


def test_bad_override_exits_2_naming_the_field(capsys, tmp_path):
    rc = main(["train", "--preset", "tiny", "--run", str(tmp_path / "r"), "--set", "model.encoder.n_heads=3"])
    assert rc == 2
    assert "model.encoder.n_heads" in capsys.readouterr().err


def test_eval_reports_bpb_and_unigram_baseline(tiny_runs, capsys):
    _, root, _, blt_run = tiny_runs
    assert main(["eval", "--checkpoint", str(blt_run), "--batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bits_per_byte"] == pytest.approx(heldout_bpb(blt_run, num_batches=2)["bits_per_byte"])
    train = store.open_array(root, "train", "tokens").read().result()
    held = store.open_array(root, "heldout", "tokens").read().result()[1:]
    p = (np.bincount(train[1:], minlength=260) + 1.0) / (len(train) - 1 + 260)
    assert result["unigram_bits_per_byte"] == pytest.approx(-np.log2(p[held]).mean(), rel=1e-9)
    assert 0 < result["bits_per_byte"] < result["unigram_bits_per_byte"]


@pytest.mark.slow
def test_generate_json_matches_the_api(tiny_runs, capsys):
    run = str(tiny_runs[3])
    assert main(["generate", "--checkpoint", run, "--max-new-bytes", "8", "--json", "--method", "s",
                 "--draft-len", "4", "def f(", "import"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    expected = api.generate(api.load(run), ["def f(", "import"], max_new_bytes=8, method="ar")
    assert [line["text"] for line in lines] == [r.text for r in expected]  # BLT-S greedy == BLT greedy
    assert all(line["cost"]["method"] == "s" and line["cost"]["drafted"] > 0 for line in lines)


def test_generate_streams_the_same_text_from_a_parameters_only_export(tiny_runs, capsys, tmp_path):
    run = str(tiny_runs[3])
    assert main(["convert", "--params-only", run, str(tmp_path / "params")]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "params"), "--max-new-bytes", "40", "--stream",
                 "class A:"]) == 0
    expected = api.generate(api.load(run), ["class A:"], max_new_bytes=40)[0]
    assert capsys.readouterr().out == "class A:" + expected.text + "\n"
    assert not (tmp_path / "params" / "checkpoints").exists()  # no optimizer state travels
    assert main(["generate", "--checkpoint", run, "--stream", "a", "b"]) == 2
    assert "exactly one prompt" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", run, "--method", "d", "abc"]) == 2  # a plain BLT has no blocks
    assert "diffusion" in capsys.readouterr().err


def test_generate_stream_keeps_a_character_split_between_pieces(tiny_runs, capsys, monkeypatch):
    """A probe: each streamed piece was decoded alone, so a character split between two pieces (or between
    the prompt and the first piece) printed as two U+FFFD."""
    pieces = [b"caf\xc3", b"\xa9 \xe2\x82", b"\xac", b"!"]
    monkeypatch.setattr(api, "stream", lambda model, prompt, **kw: iter(pieces))
    prompt = "x\udcc3"  # argv bytes b"x\xc3" (not UTF-8 alone): the first piece's "caf" does not complete it
    assert main(["generate", "--checkpoint", str(tiny_runs[3]), "--stream", prompt]) == 0
    assert capsys.readouterr().out == (b"x\xc3" + b"".join(pieces)).decode("utf-8", errors="replace") + "\n"
    monkeypatch.setattr(api, "stream", lambda model, prompt, **kw: iter([b"\xa9!"]))
    assert main(["generate", "--checkpoint", str(tiny_runs[3]), "--stream", "caf\udcc3"]) == 0
    assert capsys.readouterr().out == "café!\n"


def test_generate_rejects_an_empty_prompt(tiny_runs, capsys):
    assert main(["generate", "--checkpoint", str(tiny_runs[3]), ""]) == 2
    assert "empty" in capsys.readouterr().err


def test_generate_refuses_an_entropy_run(tiny_runs, capsys):
    assert main(["generate", "--checkpoint", str(tiny_runs[2]), "abc"]) == 2
    assert "entropy" in capsys.readouterr().err


def test_generate_file_leaves_a_piped_stdin_alone(monkeypatch, tmp_path):
    """`--file` inside a shell loop (stdin piped: the loop's own input) once also read stdin as a prompt."""
    (tmp_path / "p.txt").write_bytes(b"def f(")
    args = cli.build_parser().parse_args(["generate", "--checkpoint", "run", "--file", str(tmp_path / "p.txt")])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"p.txt\np.txt\n")))
    assert cli._read_prompts(args) == [b"def f("]
    args = cli.build_parser().parse_args(["generate", "--checkpoint", "run"])
    assert cli._read_prompts(args) == [b"p.txt\np.txt\n"]  # no prompt and no --file: the pipe is the prompt


def test_one_per_line_prompts_lose_a_crlf_files_carriage_returns(tmp_path):
    """A probe: each prompt of a CRLF file kept its trailing \r (the model continued after a carriage return)."""
    (tmp_path / "p.txt").write_bytes(b"def a(\r\nclass B:\r\n\r\nx = 1\n")
    args = cli.build_parser().parse_args(["generate", "--checkpoint", "run", "--file", str(tmp_path / "p.txt"),
                                          "--one-per-line"])
    assert cli._read_prompts(args) == [b"def a(", b"class B:", b"x = 1"]


def test_bulk_input_from_a_pipe_and_an_output_in_a_missing_folder(tiny_runs, tmp_path, capsys):
    """A probe: `--input <(...)` (a pipe) was refused as "no such file"; an --output in a missing folder
    failed naming an internal temporary file."""
    run = str(tiny_runs[3])
    fifo = tmp_path / "records"
    os.mkfifo(fifo)
    records = b'{"id": "a", "prompt": "def f(", "max_new_bytes": 6}\n{"id": "b", "prompt": "x", "max_new_bytes": 4}\n'
    writer = threading.Thread(target=lambda: fifo.write_bytes(records))
    writer.start()
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--checkpoint", run, "--input", str(fifo), "--output", str(out), "--no-progress"]) == 0
    writer.join()
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == ["a", "b"]
    capsys.readouterr()
    missing = tmp_path / "nodir" / "out.jsonl"
    assert main(["generate", "--checkpoint", run, "--input", str(out), "--output", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "the folder" in err and "nodir" in err and ".tmp" not in err and len(err.strip().splitlines()) == 1, err


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "blt_jax", "--help"], capture_output=True, text=True, check=True)
    for sub in ("quickstart", "prepare", "train", "eval", "generate", "params"):
        assert sub in out.stdout


def _options(command: str, group: str | None = None) -> dict:
    sub = cli.build_parser()._subparsers._group_actions[0].choices[command]  # noqa: SLF001
    groups = [g for g in sub._action_groups if group is None or g.title == group]  # noqa: SLF001
    return {a.option_strings[-1]: a for g in groups for a in g._group_actions if a.option_strings}  # noqa: SLF001


def test_generate_and_eval_share_one_generation_option_group():
    """Declared once, so `blt eval` takes every generation option `blt generate` does (it lacked --unmask,
    --alpha, --gamma and --no-eos-stop), with the same defaults and choices."""
    gen, ev = _options("generate", "generation"), _options("eval", "generation")
    assert {"--unmask", "--alpha", "--gamma", "--no-eos-stop", "--method", "--top-p"} <= set(gen)
    assert {k: (a.default, a.type, list(a.choices or ())) for k, a in gen.items()} == \
        {k: (a.default, a.type, list(a.choices or ())) for k, a in ev.items()}
    args = cli.build_parser().parse_args(["eval", "--checkpoint", "run", "--task", "continuation", "--unmask",
                                          "entropy", "--gamma", "2.5", "--no-eos-stop", "--method", "d"])
    kwargs = cli._generation_kwargs(args)  # noqa: SLF001
    assert kwargs["unmask"] == api.UnmaskConfig(rule="entropy", alpha=0.7, gamma=2.5)
    assert kwargs["stop_at_eos"] is False and kwargs["method"] == "d"


def test_choices_come_from_the_code_that_defines_them():
    import typing  # noqa: PLC0415

    from blt_jax.presets import PRESETS  # noqa: PLC0415
    from blt_jax.train.loop import KINDS  # noqa: PLC0415

    gen = _options("generate")
    assert list(gen["--method"].choices) == list(api.METHODS)
    assert list(gen["--unmask"].choices) == list(typing.get_args(typing.get_type_hints(api.UnmaskConfig)["rule"]))
    assert list(_options("train")["--what"].choices) == list(KINDS)
    assert list(_options("train")["--preset"].choices) == sorted(PRESETS)
