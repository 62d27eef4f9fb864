"""What the experiment scripts share: the experiment data store (embedded corpus + entropy model, prepared
once), run bookkeeping, and writing results (markdown table + JSON + PNG) under experiments/results/."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax

from blt_jax.config import ConfigError, RunConfig
from blt_jax.data import store

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_WORKDIR = "runs/experiments"
EXPERIMENT_TRAIN_BYTES = None  # the embedded corpus's whole training split (the quickstart caps it at 3 MB)


def enable_compilation_cache(workdir: str | Path = DEFAULT_WORKDIR) -> None:
    """Keep compiled programs on disk: each sampler setting compiles once for every script that runs it
    (a generation sampler takes 10-30 s to compile on a 2-core CPU)."""
    jax.config.update("jax_compilation_cache_dir", str(Path(workdir) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def environment() -> dict:
    """The machine and the code a result came from (it goes into every JSON)."""
    return {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "devices": jax.device_count(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "blt_jax": library_version()}


def library_version() -> str:
    """The commit of the blt_jax that runs: a snapshot's COMMIT file (see experiments/README.md: long runs
    import a snapshot, so edits in the working tree cannot change them midway), else the checkout's HEAD,
    marked `+modified` when blt_jax/ differs from it."""
    import subprocess  # noqa: PLC0415

    import blt_jax  # noqa: PLC0415

    package = Path(blt_jax.__file__).resolve().parent
    if (package / "COMMIT").exists():
        return (package / "COMMIT").read_text().strip() + " (snapshot)"
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=package, capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout.strip()
        return git("rev-parse", "--short", "HEAD") + ("+modified" if git("status", "--porcelain", ".") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_dir(workdir: str | Path, size: str, variant: str) -> Path:
    """Where experiments/scaling.py keeps a variant's run; the later experiments load their models from it."""
    return Path(workdir) / size / variant / "run"


def median_train_rate(run: Path) -> float | None:
    """The median training bytes/s over every logged interval of every session of a run. A resumed run's
    result holds its last session's wall time only, and wall time counts compiles and pauses; the rate of
    the logged intervals counts neither (nor does one slow last interval, as the last record's rate would)."""
    path = Path(run) / "metrics.jsonl"
    rates = [] if not path.exists() else [
        rec["bytes_per_second"] for rec in map(json.loads, path.read_text().splitlines())
        if rec.get("split") == "train" and "bytes_per_second" in rec]
    return statistics.median(rates) if rates else None


def load_run(workdir: str | Path, size: str, variant: str):
    from blt_jax.generation import api  # noqa: PLC0415

    return api.load(str(run_dir(workdir, size, variant)))


def with_store(cfg: RunConfig, root: str) -> RunConfig:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=root))


def ensure_store(cfg: RunConfig, workdir: str | Path, store_root: Optional[str] = None) -> tuple[str, str]:
    """(store root, entropy run): a given store is used as it is (it must hold calibrated entropies);
    otherwise `<workdir>/data` is prepared from the embedded corpus, `cfg`'s entropy model trained into
    `<workdir>/entropy`, and the threshold calibrated for `cfg`'s windows. Idempotent: finished stages are
    skipped, so a rerun (or a crash) redoes nothing."""
    from blt_jax import prepare  # noqa: PLC0415
    from blt_jax.train.loop import train  # noqa: PLC0415

    if store_root is not None:
        manifest = store.read_manifest(store_root)
        if manifest.get("patching_threshold") is None or manifest.get("entropy_run") is None:
            raise ConfigError(f"--store {store_root}: needs entropies and a calibrated threshold "
                              "(`blt prepare --store ROOT --entropy-run RUN`)")
        return store_root, manifest["entropy_run"]
    workdir = Path(workdir)
    root, entropy_run = str(workdir / "data"), workdir / "entropy"
    try:
        manifest = store.read_manifest(root)
    except FileNotFoundError:
        manifest = prepare.prepare_corpus(root, max_train_bytes=EXPERIMENT_TRAIN_BYTES)
    if not (entropy_run / "done.json").exists():
        summary = train("entropy", with_store(cfg, root), entropy_run, progress=False)
        if summary["interrupted"]:  # saved at a checkpoint: a rerun resumes it (never taken for finished)
            raise SystemExit(f"{entropy_run}: interrupted at step {summary['step']}; rerun to resume")
        (entropy_run / "done.json").write_text(json.dumps(summary, indent=2, default=float))
    manifest = store.read_manifest(root)
    if manifest.get("entropy_run") != str(entropy_run.absolute()) or manifest.get("patching_threshold") is None:
        prepare.add_entropies(root, entropy_run, progress=False)
        prepare.calibrate(root, cfg.model.patching, cfg.data.seq_len)
    return root, str(entropy_run)


def cached_run(run_dir: Path, cfg: RunConfig, fn: Callable[[], dict]) -> dict:
    """`fn()`'s result, saved as `<run_dir>/result.json` next to the config it came from; a rerun with the
    same config reads it back instead of training again, and one with another config is refused."""
    path = run_dir / "result.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["config"] != json.loads(cfg.to_json()):
            raise ConfigError(f"{run_dir}: holds a finished run of another configuration; delete it or pick "
                              "another --workdir")
        return saved["result"]
    result = fn()
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": json.loads(cfg.to_json()), "result": result}, indent=2, default=float))
    return result


def write_results(name: str, markdown: str, data: dict, figure: Any = None, out_dir: Path = RESULTS) -> Path:
    """experiments/results/<name>.{md,json,png}; returns the markdown's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(markdown.rstrip() + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=2, default=float) + "\n")
    if figure is not None:
        figure.savefig(out_dir / f"{name}.png", dpi=120, bbox_inches="tight")
    return out_dir / f"{name}.md"


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; floats to 3 significant decimals, None as '-'."""
    def cell(x):
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:.3f}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def figure():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt
