"""The `blt` command line: real subcommands on a real (tiny) trained run."""

import dataclasses
import inspect
import io
import json
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

from blt_jax import cli, exit_codes
from blt_jax.cli import main
from blt_jax.data import store
from blt_jax.evaluate import heldout_bpb
from blt_jax.generation import api
from blt_jax.generation.samplers import MethodConfig
from blt_jax.tasks import scoring


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


@pytest.mark.parametrize("given, named", [
    (["--method", "ar", "--alpha", "0.7"],  # the default value, given: still refused
     "--alpha is an option of --method d/dv (confidence unmasking); --method ar does not read it"),
    (["--draft-len", "4"], "--draft-len is an option of --method s (speculative drafting); --method ar does not"),
    (["--method", "d", "--draft-len", "4"], "--draft-len is an option of --method s"),
    (["--method", "s", "--gamma", "2"], "--gamma is an option of --method d/dv (entropy unmasking); --method s"),
    (["--method", "s", "--block-size", "4"], "--block-size is an option of --method d/dv (block diffusion)"),
    (["--method", "ar-nocache", "--unmask", "entropy"], "--unmask is an option of --method d/dv"),
    (["--method", "d", "--unmask", "entropy", "--alpha", "0.5"],
     "--alpha is an option of --unmask confidence; --unmask entropy does not read it"),
    (["--method", "dv", "--gamma", "2"], "--gamma is an option of --unmask entropy; --unmask confidence does not"),
    (["--method", "d", "--unmask", "one_step", "--alpha", "0.5"], "--unmask one_step does not read it"),
    (["--top-p", "0.9"], "--top-p: only sampling reads it, but --temperature is 0"),
    (["--temperature", "0", "--top-k", "5", "--top-p", "0.9"], "--top-k and --top-p: only sampling reads them, but"),
])
@pytest.mark.parametrize("command", [["generate", "abc"], ["eval", "--task", "continuation"]])
def test_generation_options_the_settings_do_not_read_are_refused(command, given, named, capsys):
    """A probe: `blt generate --method ar --draft-len 4 --alpha 0.1` (and `--top-p 0.9` at temperature 0) ran
    and exited 0 as if they did something. Refused in one line, before the model loads (no run here)."""
    assert main([command[0], "--checkpoint", "no-such-run", *command[1:], *given]) == 2
    err = capsys.readouterr().err
    assert err == f"blt {command[0]}: error: " + err.split(": error: ", 1)[1] and err.count("\n") == 1, err
    assert named in err, err


@pytest.mark.parametrize("given", [["--method", "s", "--draft-len", "4"],
                                   ["--method", "d", "--unmask", "entropy", "--gamma", "2", "--block-size", "4"],
                                   ["--method", "dv", "--alpha", "0.5", "--unmask", "confidence"],
                                   ["--temperature", "0.8", "--top-k", "5", "--top-p", "0.9"]])
def test_generation_options_the_settings_read_are_taken(given):
    args = cli.build_parser().parse_args(["generate", "--checkpoint", "run", *given])
    cli._refuse_unread_generation_options(args)  # noqa: SLF001
    kwargs = cli._generation_kwargs(args)  # noqa: SLF001
    assert kwargs["method"] == args.method and kwargs["draft_len"] == (args.draft_len or 8)
    assert kwargs["sampling"].top_p == (args.top_p or 1.0) and kwargs["unmask"].rule == (args.unmask or "confidence")


def test_records_and_requests_keep_the_options_they_may_read(capsys):
    """A record (`--input`) or a request (`blt serve`) may set its own temperature, and a request its method:
    there --top-p at temperature 0 and --draft-len with --method ar are their defaults, not ignored; the
    unmasking rule is the server's alone, so its options are checked."""
    args = cli.build_parser().parse_args(["generate", "--checkpoint", "run", "--input", "x.jsonl", "--top-p", "0.9"])
    cli._refuse_unread_generation_options(args, sampling_fixed=False)  # noqa: SLF001
    args = cli.build_parser().parse_args(["serve", "--checkpoint", "run", "--draft-len", "4", "--top-k", "3"])
    cli._refuse_unread_generation_options(args, method_fixed=False, sampling_fixed=False)  # noqa: SLF001
    assert main(["serve", "--checkpoint", "no-such-run", "--unmask", "entropy", "--alpha", "0.5"]) == 2
    assert "--alpha is an option of --unmask confidence" in capsys.readouterr().err


def test_humaneval_refuses_several_greedy_samples(capsys):
    """A probe: `--task humaneval --samples 3` at the default temperature 0 made three identical completions
    per problem, so pass@k scored one sample. Refused before the model loads."""
    assert main(["eval", "--checkpoint", "no-such-run", "--task", "humaneval", "--samples", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blt eval: error: --samples 3: at --temperature 0") and err.count("\n") == 1, err
    assert "set --temperature" in err
    assert main(["eval", "--checkpoint", "no-such-run", "--task", "humaneval", "--samples", "3",
                 "--temperature", "0.8"]) == 2
    assert "--samples" not in capsys.readouterr().err  # sampled: past the check (then: no such run)


def test_aot_refuses_an_option_of_the_other_target(capsys):
    """A probe: `blt aot --num-slices 4` without --topology compiled for the local devices and said nothing;
    --local-cpu-devices with --topology was as silently ignored."""
    assert main(["aot", "--preset", "tiny", "--num-slices", "4"]) == 2
    err = capsys.readouterr().err
    assert err == "blt aot: error: --num-slices: only with --topology (TPU slices); the local devices are one slice\n"
    # a fresh process: --local-cpu-devices is set before jax starts its backends
    proc = subprocess.run([sys.executable, "-m", "blt_jax", "aot", "--preset", "tiny", "--topology", "v5p-8",
                           "--local-cpu-devices", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("blt aot: error: --local-cpu-devices: compiles for "
                                                           "local CPU devices, --topology for a TPU slice"), proc.stderr
    assert proc.stderr.count("\n") == 1


def test_a_data_path_that_is_no_file_nor_folder_is_named_as_such(tmp_path, capsys):
    """A probe: `blt prepare --data /dev/null` said the path does not exist."""
    assert main(["prepare", "--data", "/dev/null", "--store", str(tmp_path / "store"), "--no-progress"]) == 2
    assert capsys.readouterr().err == "blt prepare: error: data path is not a regular file or folder: /dev/null\n"
    assert not (tmp_path / "store").exists()


def test_bpb_names_a_path_that_is_no_file_nor_folder(tiny_runs, capsys):
    assert main(["eval", "--checkpoint", str(tiny_runs[3]), "--task", "bpb", "--files", "/dev/null"]) == 2
    err = capsys.readouterr().err
    assert "/dev/null" in err and "not a regular file or folder" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv", [*(["eval", "--checkpoint", "run", "--task", task] for task in cli.EVAL_TASKS),
                                  ["generate", "--checkpoint", "run"], ["serve", "--checkpoint", "run"],
                                  ["train", "--run", "run"], ["params"]])
def test_out_of_memory_advice_names_only_options_the_command_has(argv, monkeypatch, capsys):
    """The one out-of-memory line advised --max-positions and --max-new-bytes for every command (`blt eval` and
    `blt train` have no --max-positions; scoring caught the error itself to name bpb's options). One table in
    the CLI now: each command's advice, and `blt eval`'s per task, names options its task takes."""
    def out_of_memory(args):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1234 bytes.\nthe rest of XLA's report")

    monkeypatch.setattr(cli, f"cmd_{argv[0]}", out_of_memory)
    assert main(argv) == exit_codes.ERROR
    err = capsys.readouterr().err
    head = f"blt {argv[0]}: error: out of memory (RESOURCE_EXHAUSTED: Out of memory allocating 1234 bytes.); "
    assert err.startswith(head) and err.count("\n") == 1, err
    named = set(re.findall(r"--[a-z][a-z-]*", err[len(head):]))
    assert named and named <= set(_options(argv[0])), named
    if argv[0] == "eval":  # and only the options of its task (--task itself aside)
        assert named <= {"--task", *map(cli._option, cli.EVAL_OPTIONS[argv[-1]])}, named  # noqa: SLF001


def test_generation_defaults_are_the_dataclasses_and_the_parser_loads_no_jax():
    """GENERATION_DEFAULTS repeated the defaults of SamplingConfig, UnmaskConfig and MethodConfig: both now read
    plain constants from a module without JAX. Building the parser, as `blt --help` does, loaded JAX (8.7 s
    of a 2-core machine's `blt --help`): argparse lists an option's choices as it adds it, so the deferred
    choices were read at once."""
    def default(cls, name):
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)

    generate = inspect.signature(api.generate).parameters
    assert cli.GENERATION_DEFAULTS == {
        "draft_len": default(MethodConfig, "draft_len"), "unmask": default(api.UnmaskConfig, "rule"),
        "alpha": default(api.UnmaskConfig, "alpha"), "gamma": default(api.UnmaskConfig, "gamma"),
        "temperature": default(api.SamplingConfig, "temperature"), "top_k": default(api.SamplingConfig, "top_k"),
        "top_p": default(api.SamplingConfig, "top_p"), "seed": generate["seed"].default}
    assert generate["draft_len"].default == cli.GENERATION_DEFAULTS["draft_len"]
    probe = ("import sys\nfrom blt_jax import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted({'jax', 'numpy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]", out


def test_window_help_names_the_longest_window():
    assert f"{scoring.MAX_WINDOW:,}" in _options("eval")["--window"].help


def test_a_seed_at_temperature_0_is_refused_where_only_sampling_reads_it(tiny_runs, capsys):
    """A probe: `blt generate --seed 3` at temperature 0 (greedy: nothing random is drawn) ran and exited 0 as
    if the seed did something. Refused like --top-k/--top-p, in one line."""
    assert main(["generate", "--checkpoint", str(tiny_runs[3]), "--max-new-bytes", "2", "--seed", "3", "ab"]) == 2
    assert capsys.readouterr().err == ("blt generate: error: --seed: only sampling reads it, but --temperature is 0 "
                                       "(greedy: the likeliest byte, always); set --temperature > 0 or drop it\n")
    assert main(["eval", "--checkpoint", "no-such-run", "--task", "humaneval", "--seed", "0", "--top-k", "4"]) == 2
    assert "error: --top-k and --seed: only sampling reads them" in capsys.readouterr().err
    # kept where a record may set its own temperature, where sampling is on, and where a task draws its items
    for given in (["generate", "--input", "x.jsonl"], ["generate", "--temperature", "0.8", "ab"],
                  ["eval", "--task", "humaneval", "--temperature", "0.8"], ["eval", "--task", "continuation"],
                  ["eval", "--task", "translate"], ["eval", "--task", "mc-next-line"]):
        assert main([given[0], "--checkpoint", "no-such-run", *given[1:], "--seed", "3"]) == 2  # no such run
        assert "--seed" not in capsys.readouterr().err
