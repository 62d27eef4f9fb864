"""Reliability (issue 13): never lose a run, never load garbage silently, refuse what cannot be right.

Each test reproduces a defect a probe found (it failed before the fix). The data store's cases (prepare
refusing to replace a store, interrupted entropy passes, the store's entropy model) live in their own file.
Runs are copies of the session's tiny trained run (`tiny_runs`), damaged or resumed in the ways users meet.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from blt_jax import cli, exit_codes
from blt_jax.cli import build_parser, main
from blt_jax.config import ConfigError, apply_overrides, get_preset
from blt_jax.generation import api
from blt_jax.train import checkpoint as ckpt
from blt_jax.train.loop import NonFiniteLoss, train
from blt_jax.train.metrics import read_metrics


# ---- helpers -----------------------------------------------------------------------------------------------

def copy_run(tiny_runs, tmp_path, name: str = "run") -> Path:
    """A private copy of the session's trained BLT run (checkpoints at steps 50 and 100)."""
    dst = tmp_path / name
    shutil.copytree(tiny_runs[3], dst)
    return dst


def run_config(run: Path, **train_changes):
    """The run's own config (threshold included), with `train` fields changed."""
    cfg = ckpt.load_run_config(run)[1]
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_changes))


def cli_overrides(cfg) -> list[str]:
    """`--set` arguments that turn the tiny preset into `cfg` (how a user repeats a run's command line)."""
    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    base = dict(flat(get_preset("tiny").to_dict()))
    out = []
    for key, value in flat(cfg.to_dict()):
        if key != "name" and base.get(key) != value:
            out += ["--set", f"{key}={json.dumps(value)}"]
    return out


def state_files(run: Path, step: int) -> list[Path]:
    """The data files of a checkpoint's train state, largest first."""
    files = [p for p in (run / "checkpoints" / str(step) / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return sorted(files, key=lambda p: -p.stat().st_size)


def scribble(path: Path, seed: int = 0) -> None:
    """Random bytes over a stretch in the middle of a file (its size unchanged): bit rot, a bad disk."""
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    data[start:start + 4096] = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def params_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def blt_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "blt_jax", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# ---- data loss ---------------------------------------------------------------------------------------------

def test_convert_never_replaces_an_existing_run(tiny_runs, tmp_path, capsys):
    """Item 1: `convert --from-hf/--params-only/--to-hf` into a non-empty folder is refused; `--overwrite`
    replaces it whole; a truncated safetensors file is a one-line error that leaves nothing behind."""
    run = str(tiny_runs[3])
    existing = copy_run(tiny_runs, tmp_path, "existing")
    before = (existing / "run.json").read_bytes()
    hf = tmp_path / "hf"
    assert main(["convert", "--to-hf", run, str(hf)]) == 0
    for args in (["--params-only", run], ["--from-hf", str(hf)], ["--to-hf", run]):
        capsys.readouterr()
        assert main(["convert", *args, str(existing)]) == exit_codes.ERROR, args
        err = capsys.readouterr().err
        assert "--overwrite" in err and str(existing) in err and len(err.strip().splitlines()) == 1, err
        assert (existing / "run.json").read_bytes() == before
    assert main(["convert", "--params-only", run, str(existing), "--overwrite"]) == 0
    assert not (existing / "checkpoints").exists()  # replaced whole: no stale checkpoints beside new metadata
    assert params_equal(api.load(str(existing)).params, api.load(run).params)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left

    truncate(hf / "model.safetensors")
    capsys.readouterr()
    assert main(["convert", "--from-hf", str(hf), str(tmp_path / "imported")]) == exit_codes.ERROR
    err = capsys.readouterr().err
    assert "model.safetensors" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "imported").exists()


def test_convert_overwrite_replaces_a_model_folder_only(tiny_runs, tmp_path, capsys):
    """A probe: `convert --to-hf RUN corpus --overwrite` replaced a folder of the user's texts (and a data
    store, and a file) with a converted model. --overwrite now replaces a run or an earlier convert's output
    only; anything else is refused in one line and left as it was."""
    run = str(tiny_runs[3])
    corpus, store, afile = tmp_path / "corpus", tmp_path / "store", tmp_path / "afile.txt"
    corpus.mkdir()
    (corpus / "notes.txt").write_text("mine")
    store.mkdir()
    (store / "manifest.json").write_text("{}")
    (store / "train").mkdir()
    afile.write_text("mine")
    before = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else b"") for p in tmp_path.rglob("*"))
    for dst in (corpus, store, afile):
        for kind in ("--params-only", "--to-hf"):
            capsys.readouterr()
            assert main(["convert", kind, run, str(dst), "--overwrite"]) == exit_codes.ERROR
            err = capsys.readouterr().err
            assert "not a model folder" in err and len(err.strip().splitlines()) == 1, err
    assert sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else b"")
                  for p in tmp_path.rglob("*")) == before
    hf = tmp_path / "hf"
    assert main(["convert", "--to-hf", run, str(hf)]) == 0
    assert main(["convert", "--to-hf", run, str(hf), "--overwrite"]) == 0  # an earlier convert's output


def test_a_run_of_the_entropy_model_is_refused_by_what_it_is_not_by_generation(tiny_runs, tmp_path, capsys):
    """A probe: `blt convert --to-hf <entropy run>` said "generation needs a BLT run" although nothing was
    generating. Every command that loads a model names what the run is and which run it takes, in one line."""
    entropy_run = str(tiny_runs[2])
    for args in (["convert", "--to-hf", entropy_run, str(tmp_path / "hf")],
                 ["convert", "--params-only", entropy_run, str(tmp_path / "params")],
                 ["generate", "--checkpoint", entropy_run, "def", "--max-new-bytes", "4"]):
        capsys.readouterr()
        assert main(args) == exit_codes.ERROR, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "generation" not in err, err
        assert "'entropy' run" in err and "--what blt" in err, err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "params").exists()


def test_ctrl_c_where_nothing_resumes_is_one_line_and_status_130(monkeypatch, capsys):
    """A probe: Ctrl-C in `blt eval`, a single `blt generate` or `blt convert` printed a KeyboardInterrupt
    traceback of 40-50 lines (and often a segfault). Commands with work to resume catch it themselves (75)."""
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_params", interrupted)
    try:
        code = main(["params", "--preset", "tiny"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left the command as a traceback")
    assert code == 130
    assert capsys.readouterr().err == "blt params: stopped (Ctrl-C)\n"


def test_a_humaneval_timeout_of_zero_is_refused_before_any_work(capsys):
    """A probe: `--timeout 0` was accepted, and refused only after every completion had been generated."""
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit) as e:
            main(["eval", "--checkpoint", "nowhere", "--task", "humaneval", "--timeout", bad])
        assert e.value.code == exit_codes.ERROR
        assert "--timeout: must be > 0" in capsys.readouterr().err


def test_convert_into_its_own_source_is_refused_even_with_overwrite(tiny_runs, tmp_path, capsys):
    """A probe: `convert --params-only RUN RUN --overwrite` replaced the run with its parameters, deleting its
    checkpoints, optimizer state and metrics (and a folder above the source went the same way)."""
    run = copy_run(tiny_runs, tmp_path, "runs/a")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for dst in (run, run.parent, tmp_path / "runs" / ".." / "runs" / "a"):
        for kind in ("--params-only", "--to-hf"):
            capsys.readouterr()
            assert main(["convert", kind, str(run), str(dst), "--overwrite"]) == exit_codes.ERROR
            err = capsys.readouterr().err
            assert "holds the source" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    empty_file = tmp_path / "afile"
    empty_file.touch()
    assert main(["convert", "--params-only", str(run), str(empty_file)]) == exit_codes.ERROR
    assert "is a file" in capsys.readouterr().err


def test_resume_refuses_what_changes_the_data_and_records_what_it_accepts(tiny_runs, tmp_path):
    """Item 3: a different batch size, sequence length, data seed or worker count would change what the
    saved data-iterator position means: refused, naming the field, with nothing written. A longer schedule
    and a new learning rate are accepted and recorded with the step they start at."""
    run = copy_run(tiny_runs, tmp_path)
    before = (run / "run.json").read_bytes()
    cfg = run_config(run)
    for section, field, value in (("data", "batch_size", 8), ("data", "seq_len", 32), ("data", "seed", 1),
                                  ("data", "worker_count", 2)):
        changed = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{field: value})})
        with pytest.raises(ValueError, match=rf"^{section}\.{field}: ") as e:
            train("blt", changed, run, progress=False, stop_after=100)
        assert "new run directory" in str(e.value) and "\n" not in str(e.value)
        assert (run / "run.json").read_bytes() == before
    with pytest.raises(ValueError, match="train.steps: .*step 100"):
        train("blt", run_config(run, steps=60, warmup_steps=5), run, progress=False)

    longer = run_config(run, steps=150, learning_rate=1e-3)
    summary = train("blt", longer, run, progress=False, stop_after=100)
    assert summary["resumed_from"] == 100 and summary["step"] == 100
    kind, saved, meta = ckpt.load_run_config(run)
    assert saved.train.steps == 150 and saved.train.learning_rate == 1e-3
    assert meta["history"] == [{"step": 100, "time": meta["history"][0]["time"],
                                "changes": {"train.learning_rate": [cfg.train.learning_rate, 1e-3],
                                            "train.steps": [100, 150]}}]
    train("blt", longer, run, progress=False, stop_after=100)  # the same config again: nothing new to record
    assert len(ckpt.load_run_config(run)[2]["history"]) == 1


def test_a_run_another_job_is_training_is_refused(tiny_runs, tmp_path):
    """A probe: two `blt train` on one --run both ran to the end, overwriting each other's checkpoints and
    logging every step twice. While one job holds the run, a second is refused with nothing written; once it
    ends (here: the lock is released, as the OS does when a process dies), the run resumes as usual."""
    run = copy_run(tiny_runs, tmp_path)
    cfg = run_config(run, steps=110)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with ckpt.exclusive(run):  # the first job
        with pytest.raises(ckpt.RunInUse, match="another training job is using this run") as e:
            train("blt", cfg, run, progress=False)
        assert "\n" not in str(e.value)
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert train("blt", cfg, run, progress=False, stop_after=105)["step"] == 105


def test_a_run_inside_its_data_store_or_a_file_is_refused(tiny_runs, tmp_path):
    """A probe: `--run` inside the store was accepted, and the store then held files that are not a store's
    (`prepare --overwrite` refused it for them). Refused up front, with nothing written."""
    cfg = run_config(copy_run(tiny_runs, tmp_path))
    store_root = tmp_path / "store"
    shutil.copytree(cfg.data.path, store_root)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(store_root)))
    before = sorted(p for p in store_root.rglob("*"))
    with pytest.raises(ConfigError, match="lies inside the data store .*nothing was written") as e:
        train("blt", cfg, store_root / "runs" / "blt", progress=False)
    assert "\n" not in str(e.value)
    assert sorted(p for p in store_root.rglob("*")) == before
    (tmp_path / "notes.txt").write_text("mine")  # and a --run that is a file: "[Errno 17] File exists" before
    with pytest.raises(ConfigError, match="notes.txt: is a file"):
        train("blt", cfg, tmp_path / "notes.txt", progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ---- silent wrong results ----------------------------------------------------------------------------------

def _float_options():
    parser = build_parser()
    for command, sub in parser._subparsers._group_actions[0].choices.items():  # noqa: SLF001
        for action in sub._actions:  # noqa: SLF001
            if action.option_strings and action.type is not None and getattr(action.type, "__name__", "") in (
                    "float", "finite_float"):
                yield command, action.option_strings[-1]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_option_refuses_non_finite_values(value, capsys):
    """Item 4: `--temperature nan` used to sample twenty id-0 tokens and exit 0."""
    options = list(_float_options())
    assert ("generate", "--temperature") in options and ("eval", "--gamma") in options
    for command, option in options:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([command, f"{option}={value}"])
        assert e.value.code == exit_codes.ERROR
        err = capsys.readouterr().err
        assert option in err and "finite" in err, (command, option, err)


@pytest.mark.parametrize("override", ["train.learning_rate=NaN", "train.weight_decay=Infinity",
                                      "model.patching.target_patch_length=Infinity",
                                      "model.diffusion.weight=-Infinity", "model.patching.threshold=NaN"])
def test_config_floats_must_be_finite(override):
    with pytest.raises(ConfigError, match=rf"^{override.split('=')[0]}: .*finite"):
        apply_overrides(get_preset("tiny"), [override])


@pytest.mark.parametrize("kwargs", [{"temperature": math.nan}, {"temperature": math.inf}, {"top_p": math.nan},
                                    # finite, but inf and 0 in float32 (a probe: empty output, exit 0)
                                    {"temperature": 1e39}, {"top_p": 1e-50}])
def test_sampling_config_refuses_non_finite_values(kwargs):
    with pytest.raises(ValueError, match=f"sampling.{next(iter(kwargs))}"):
        api.SamplingConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"alpha": math.nan}, {"gamma": math.nan}, {"gamma": math.inf}])
def test_unmask_config_refuses_non_finite_values(kwargs):
    with pytest.raises(ValueError, match=f"unmask.{next(iter(kwargs))}"):
        api.UnmaskConfig(**kwargs)


def test_dv_on_a_plain_blt_is_refused_like_d(tiny_runs, capsys):
    """Item 8: BLT-DV drafts with the BLT-D decoder; a plain BLT has none."""
    assert main(["generate", "--checkpoint", str(tiny_runs[3]), "--method", "dv", "abc"]) == exit_codes.ERROR
    assert "diffusion" in capsys.readouterr().err


def test_damaged_checkpoint_data_is_detected_and_the_newest_intact_one_loads(tiny_runs, tmp_path, capsys):
    """Items 5 and 9: random bytes in the latest checkpoint's data used to load as garbage with exit 0, and a
    truncated file printed a 149-line orbax traceback. Now: a warning naming the damaged step, and the
    newest intact checkpoint; an explicitly requested damaged step is an error naming it."""
    good = ckpt.load_trained_params(tiny_runs[3], step=50)
    for damage in (scribble, truncate):
        run = copy_run(tiny_runs, tmp_path, damage.__name__)
        damage(state_files(run, 100)[0])
        with pytest.warns(ckpt.DamagedCheckpointWarning, match="step 100"):
            params = ckpt.load_trained_params(run)
        assert params_equal(params, good)
        with pytest.raises(ckpt.CheckpointDamaged, match="step 100"):
            ckpt.load_trained_params(run, step=100)
    # the command line says so in one line (here exporting step 50's parameters)
    capsys.readouterr()
    assert main(["convert", "--params-only", str(run), str(tmp_path / "export")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("blt convert: warning: ") and "step 100" in err and len(err.splitlines()) == 1, err
    assert params_equal(api.load(str(tmp_path / "export")).params, good)


def test_checkpoints_written_before_checksums_existed_still_load(tiny_runs, tmp_path):
    run = copy_run(tiny_runs, tmp_path)
    written = list(run.rglob("*checksums*"))
    assert written  # every checkpoint of the run carries them now
    for extra in written:
        shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    assert params_equal(ckpt.load_trained_params(run), ckpt.load_trained_params(tiny_runs[3]))
    api.load(str(run))  # with the run's entropy model


def test_a_damaged_parameters_only_export_names_the_damage(tiny_runs, tmp_path, capsys):
    """Item 10: an emptied _METADATA used to report that the checkpoint "does not fit this model"."""
    export = tmp_path / "export"
    assert main(["convert", "--params-only", str(tiny_runs[3]), str(export)]) == 0
    (export / "params" / "_METADATA").write_text("")
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(export), "abc"]) == exit_codes.ERROR
    err = capsys.readouterr().err
    assert "damaged" in err and "params" in err and "does not fit" not in err and len(err.splitlines()) == 1, err


def test_a_malformed_run_json_names_the_file(tmp_path, capsys):
    (tmp_path / "run.json").write_text('{"format_version": 1, "kind": ')
    assert main(["generate", "--checkpoint", str(tmp_path), "abc"]) == exit_codes.ERROR
    err = capsys.readouterr().err
    assert str(tmp_path / "run.json") in err and "JSON" in err and len(err.splitlines()) == 1, err


# ---- crashes instead of errors -----------------------------------------------------------------------------

def test_training_falls_back_to_the_newest_intact_checkpoint(tiny_runs, tmp_path):
    """Item 9: resuming from a truncated latest checkpoint printed 2,884 lines after rewriting run.json.
    Now: a warning naming the step, the damaged step moved aside (never deleted), the metrics log cut back to
    the restored step (no replayed steps twice), and run.json untouched until the restore succeeded."""
    run = copy_run(tiny_runs, tmp_path)
    truncate(state_files(run, 100)[0])
    scribble(state_files(run, 50)[0])
    before = {name: (run / name).read_bytes() for name in ("run.json", "metrics.jsonl")}
    with pytest.raises(ckpt.CheckpointDamaged, match=r"step 100.*step 50|step 50.*step 100"):
        train("blt", run_config(run), run, progress=False)
    assert {name: (run / name).read_bytes() for name in before} == before  # nothing changed

    run = copy_run(tiny_runs, tmp_path, "one_damaged")
    truncate(state_files(run, 100)[0])
    assert max(r["step"] for r in read_metrics(run)) == 100
    with pytest.warns(ckpt.DamagedCheckpointWarning, match="step 100"):
        summary = train("blt", run_config(run), run, progress=False, stop_after=50)
    assert summary["resumed_from"] == 50
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["50"]
    assert (run / "damaged_checkpoints" / "100" / "state").is_dir()
    assert max(r["step"] for r in read_metrics(run)) == 50


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_runs, tmp_path):
    """Issue 16 item 7: a learning rate of 1e30 blows the parameters up after one step; the run stops at the
    first non-finite loss, naming the step, and never saves that state."""

    run = copy_run(tiny_runs, tmp_path)
    cfg = run_config(run, steps=110, learning_rate=1e30, checkpoint_every=1, log_every=1)
    with pytest.raises(NonFiniteLoss, match=r"step 10\d") as e:
        train("blt", cfg, run, progress=False)
    bad = int(str(e.value).split("step ")[1].split()[0].strip(":,"))
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) < bad, (steps, bad)
    params = ckpt.load_trained_params(run)
    assert all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(params))


# `python -m blt_jax ...` in a process that cannot write files above 300 KB: like a full disk, every write of a
# checkpoint's data fails (SIGXFSZ ignored: a failed write, not a killed process)
SMALL_FILES_ONLY = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                    "hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]; "
                    "resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, hard)); "
                    "sys.argv[0] = 'blt'; runpy.run_module('blt_jax', run_name='__main__')")


def test_a_failed_save_stops_training_with_one_error(tiny_runs, tmp_path):
    """Item 11: disk full during a checkpoint logged 325 lines of tracebacks and trained on until the next
    save. Now the run stops once the save is known to have failed, with one error naming that step and the
    cause; the previous checkpoint is intact."""
    run = copy_run(tiny_runs, tmp_path)
    cfg = run_config(run, steps=130, checkpoint_every=5, log_every=1)
    proc = subprocess.run([sys.executable, "-c", SMALL_FILES_ONLY, "train", "--preset", "tiny", "--run", str(run),
                           "--no-progress", *cli_overrides(cfg)], capture_output=True, text=True, timeout=600)
    err = proc.stderr
    assert proc.returncode == exit_codes.ERROR, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("blt train: error: ")]
    assert len(errors) == 1 and "step 105" in errors[0] and "File too large" in errors[0], err[-3000:]
    # orbax and tensorstore still log the failed writes, one line each, but no traceback: neither theirs
    # (hundreds of lines, which also split the error line when they interleaved with it) nor blt_jax's
    assert "Traceback" not in err and "blt_jax/" not in err and "deprecated" not in err, err[-3000:]
    assert max(r["step"] for r in read_metrics(run)) <= 110  # stopped by the next checkpoint at the latest
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["100", "50"]
    ckpt.load_trained_params(run)  # the previous checkpoint is intact


def test_a_writable_manager_drops_only_the_late_callbacks_of_a_failed_save(tmp_path, monkeypatch):
    """Python callers of train() see the failed save's aftermath too (one traceback per write in flight, from
    tensorstore's callbacks into orbax's closed event loop): opening a writable manager installs a hook that
    drops exactly those and passes every other unraisable error on."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    ckpt.open_manager(tmp_path / "run", async_save=False).close()
    ckpt.open_manager(tmp_path / "run", async_save=False).close()  # installed once, not stacked

    def unraisable(exc):
        return SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None, err_msg=None, object=None)

    sys.unraisablehook(unraisable(RuntimeError("Event loop is closed")))
    assert seen == []
    other = unraisable(RuntimeError("something else"))
    sys.unraisablehook(other)
    assert seen == [other]


# ---- smaller things ----------------------------------------------------------------------------------------

def test_sigterm_saves_and_exits_with_the_interrupted_status(tiny_runs, tmp_path):
    """SIGTERM used to exit 0 although the run was cut short: a scheduler could not tell it from a finished
    run. Now it saves and exits with exit_codes.INTERRUPTED; running the same command again resumes."""
    run = copy_run(tiny_runs, tmp_path)
    cfg = run_config(run, steps=100_000, log_every=1)
    proc = blt_cli("train", "--preset", "tiny", "--run", str(run), "--no-progress", *cli_overrides(cfg))
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if read_metrics(run) and max(r["step"] for r in read_metrics(run)) > 101:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = (x.decode() for x in proc.communicate(timeout=300))
    assert proc.returncode == exit_codes.INTERRUPTED, err[-3000:]
    saved = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved > 101 and json.loads(out[out.index("{"):])["step"] == saved


def test_eval_that_cannot_run_exits_non_zero(tiny_runs, capsys):
    assert main(["eval", "--checkpoint", str(tiny_runs[3]), "--task", "translate", "--lang", "xx"]) == \
        exit_codes.ERROR
    assert "no gettext catalogs for 'xx'" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--items", "0"], ["--window", "0"], ["--batches", "0"], ["--items", "-3"],
                                  ["--samples", "0"]])
def test_zero_never_silently_means_the_default(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--checkpoint", "unused", *args])
    assert e.value.code == exit_codes.ERROR and args[0] in capsys.readouterr().err


@pytest.mark.parametrize("args, named", [
    (["--task", "mc-next-line", "--files", "mine.txt"], "--files: --task mc-next-line does not use it (it applies "
                                                        "to --task bpb)"),
    (["--task", "continuation", "--max-new-bytes", "4"], "--max-new-bytes: --task continuation does not use it"),
    (["--batch-size", "4"], "--batch-size: --task heldout does not use it"),
    (["--task", "bpb", "--temperature", "0.8"], "--temperature: --task bpb does not use it")])
def test_eval_refuses_options_its_task_does_not_use(args, named, capsys):
    """A probe: `--task mc-next-line --files mine.txt` scored the embedded text instead, and continuation
    ignored --max-new-bytes, both with exit 0. Refused before anything loads."""
    assert main(["eval", "--checkpoint", "unused", *args]) == exit_codes.ERROR
    assert named in capsys.readouterr().err


def test_running_out_of_memory_is_one_line(monkeypatch, capsys):
    """A probe: `blt generate --input ... --batch-size 100000000` died with jax's RESOURCE_EXHAUSTED traceback
    (exit 1). Any command that runs out of memory says so in one line, with what to lower."""
    import jax.numpy as jnp  # noqa: PLC0415

    monkeypatch.setattr(cli, "cmd_params", lambda args: jnp.zeros((10**13,), jnp.uint8).block_until_ready())
    assert main(["params", "--preset", "tiny"]) == exit_codes.ERROR
    err = capsys.readouterr().err
    assert err.startswith("blt params: error: out of memory (RESOURCE_EXHAUSTED: Out of memory allocating")
    assert err.count("\n") == 1 and "lower the batch size" in err


def test_humaneval_refuses_k_above_the_sample_count(tiny_runs, capsys):
    assert main(["eval", "--checkpoint", str(tiny_runs[3]), "--task", "humaneval", "--samples", "2",
                 "--k", "1,10", "--items", "1", "--max-new-bytes", "4"]) == exit_codes.ERROR
    assert "pass@10" in capsys.readouterr().err


def test_reading_a_run_never_writes_to_it(tiny_runs, tmp_path, capsys):
    """`blt generate` created an empty checkpoints/ folder in a run it read (here: one stopped before its
    first checkpoint)."""
    run = tmp_path / "unsaved"
    run.mkdir()
    shutil.copy(tiny_runs[3] / "run.json", run / "run.json")
    assert main(["generate", "--checkpoint", str(run), "abc"]) == exit_codes.ERROR
    assert "no checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["run.json"]


def test_a_run_records_its_data_store_as_an_absolute_path(tiny_runs, tmp_path, monkeypatch):
    """A relative store path made `blt eval` fail from any other directory."""
    cfg, root = tiny_runs[0], tiny_runs[1]
    monkeypatch.chdir(Path(root).parent)
    relative = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=Path(root).name))
    train("entropy", relative, tmp_path / "fresh", progress=False, stop_after=0)
    meta = ckpt.read_run_meta(tmp_path / "fresh")
    assert meta["config"]["data"]["path"] == str(Path(root).absolute()) == meta["data"]


def test_prompts_that_are_not_utf8_are_generated_from_as_bytes(tiny_runs, monkeypatch, capsys):
    """A byte model takes any bytes: invalid UTF-8 on stdin was refused as "surrogates not allowed"."""
    raw = b"caf\xe9 \xff\xfe ok"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors="surrogateescape"))
    assert main(["generate", "--checkpoint", str(tiny_runs[3]), "--max-new-bytes", "4", "--json", "--stdin"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt"] == raw.decode("utf-8", "replace") and result["cost"]["new_bytes"] >= 1
    # an undecodable command-line argument reaches Python as surrogates (PEP 383); its bytes come back exactly
    args = build_parser().parse_args(["generate", "--checkpoint", "run", os.fsdecode(raw), "plain"])
    assert cli._read_prompts(args) == [raw, b"plain"]  # noqa: SLF001
