"""The training loop shared by the entropy model and BLT: data -> jitted donated step -> metrics, periodic
async checkpoints, held-out evaluation, automatic resume, and a clean save on SIGINT/SIGTERM.

`train` runs in named parts: plan the state's placement; check what a resume may change (before anything is
written); restore the newest intact checkpoint (or initialise); only then record the run (run.json with its
history, the metrics log cut back to the restored step, the frozen entropy model); run the steps; evaluate.
The step loop never waits on the device for logging: step n - 1's metrics are read after step n is
dispatched (as nanodo does). A non-finite loss or gradient stops the run before that state can be saved, and
a failed save stops it at once; both leave the newest good checkpoint in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from blt_jax import flops, model as model_lib, sharding
from blt_jax.config import ConfigError, RunConfig, choices
from blt_jax.data import pipeline, store
from blt_jax.objectives import LN2
from blt_jax.train import checkpoint as ckpt, resume
from blt_jax.train.checkpoint import load_trained_params
from blt_jax.train.metrics import MetricsWriter, logged
from blt_jax.train.step import (Placement, StepFns, TrainState, create_train_state, make_optimizer, make_step_fns,
                                plan_train_state)

Kind = Literal["entropy", "blt"]
KINDS = choices(Kind)


class NonFiniteLoss(FloatingPointError):
    """Training diverged: a step's loss or gradient norm is NaN or Inf (that state is never saved)."""


@dataclasses.dataclass(frozen=True)
class Task:
    """What a run trains and how its batches are made."""

    kind: str
    cfg: RunConfig
    fields: tuple[str, ...]
    train_transform: Any
    eval_transform: Any
    eval_max_patches: Optional[int]

    @property
    def model_cfg(self):
        return self.cfg.model.entropy_model if self.kind == "entropy" else self.cfg.model

    @property
    def train_cfg(self):
        return self.cfg.entropy_train if self.kind == "entropy" else self.cfg.train


def check_overrides(kind: str, overrides: Sequence[str]) -> None:
    """`blt train --set`, before it is applied: the entropy model trains with `entropy_train.*`, so a `train.*`
    override would be checked and recorded in run.json but never used (a probe: `--set train.steps=10` trained
    the preset's entropy_train.steps). It is refused, naming the field to set; `--what blt` is unchanged."""
    if kind != "entropy":
        return
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip()
        if key == "train" or key.startswith("train."):
            raise ConfigError(f"{key}: the entropy model trains with entropy_train.*, not train.*; use "
                              f"--set entropy_{key}={value}")


def absolute_store(cfg: RunConfig) -> RunConfig:
    """The config with a local data store path made absolute (URLs stay), so the run can be evaluated and
    resumed from any working directory."""
    path = cfg.data.path
    if "://" in path or os.path.isabs(path):
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(Path(path).absolute())))


def resolve_task(kind: str, cfg: RunConfig) -> Task:
    """Fix everything the data store decides (the calibrated threshold) and build the transforms."""
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {KINDS}, got {kind!r}")
    if kind == "entropy":
        return Task(kind, cfg, ("tokens",), pipeline.LMWindows(), pipeline.LMWindows(), None)
    patching = cfg.model.patching
    if patching.mode == "entropy" and patching.threshold is None:
        manifest = store.read_manifest(cfg.data.path)
        if manifest.get("patching_threshold") is None:
            raise ConfigError("model.patching.threshold: not set and the data store has no calibrated threshold; "
                              "run `blt prepare --entropy-run ...` (which calibrates) or set it")
        patching = dataclasses.replace(patching, threshold=float(manifest["patching_threshold"]))
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, patching=patching))
    fields = ("tokens", "entropies") if patching.mode == "entropy" else ("tokens",)
    eval_patching = dataclasses.replace(patching, max_patches=cfg.data.seq_len + 1)
    return Task(kind, cfg, fields, pipeline.PatchedWindows(patching, patching.threshold),
                pipeline.PatchedWindows(eval_patching, patching.threshold), cfg.data.seq_len + 1)


def sync_processes(name: str) -> None:
    """Barrier across processes (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def to_device(batch: dict, placement: Optional[Placement] = None, process_local: bool = True) -> dict:
    """Host batch -> device arrays. With a placement, a global batch split over the batch axes: built from
    each process's own rows (`process_local`, training) or from a full copy every process holds (eval)."""
    if placement is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    rows = placement.batch_rows
    out = {}
    for k, v in batch.items():
        if process_local:
            shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
            out[k] = jax.make_array_from_process_local_data(rows, v, shape)
        else:
            out[k] = jax.make_array_from_callback(v.shape, rows, lambda index, v=v: v[index])
    return out


def evaluate(step_fns, params, batches: list[dict], placement: Optional[Placement] = None) -> dict[str, float]:
    """Held-out bits per byte over fixed batches (exact: summed NLL / summed bytes)."""
    nll = count = patches = 0.0
    for b in batches:
        stats = jax.device_get(step_fns.eval_step(params, to_device(b, placement, process_local=False)))
        nll += float(stats["nll_sum"])
        count += float(stats["bytes"])
        patches += float(stats.get("patches", 0.0))
    out = {"loss": nll / max(count, 1.0), "bits_per_byte": nll / max(count, 1.0) / LN2, "bytes": count}
    if patches:
        out["mean_patch_length"] = count / patches
    return out


class _StopFlag:
    """SIGINT/SIGTERM request a checkpoint and a clean exit instead of killing the step mid-way."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---- the parts of `train` ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Plan:
    """Where the run's state lives and the jitted functions that move it."""

    mesh: jax.sharding.Mesh
    placement: Placement
    step_fns: StepFns
    tx: Any


def _plan(task: Task) -> _Plan:
    cfg, tc = task.cfg, task.train_cfg
    mesh = sharding.make_mesh(cfg.mesh)
    tx = make_optimizer(tc)
    graphdef, placement = plan_train_state(task.model_cfg, tx, mesh, cfg.mesh.rules, cfg.mesh.min_sharded_param_bytes)
    placement.check_batch(cfg.data.batch_size)
    step_fns = make_step_fns(task.kind, graphdef, tx, tc, eval_max_patches=task.eval_max_patches, placement=placement)
    return _Plan(mesh, placement, step_fns, tx)


def _check_resume(run_dir: Path, task: Task, latest: Optional[int]) -> tuple[dict[str, list], list[dict]]:
    """(the config changes this resume makes, the run's history so far); refuses a different model or a
    change that cannot be right, before anything is written."""
    ckpt.check_compatible(run_dir, task.kind, task.cfg)
    _, saved, meta = ckpt.load_run_config(run_dir)
    changes = resume.check_resume(absolute_store(saved), task.cfg, task.kind, latest or 0)
    return changes, list(meta.get("history", []))


def _entropy_params(run_dir: Path, task: Task, entropy_run: Optional[str], mesh, own_copy: bool):
    """A BLT's frozen entropy model: the run's own copy when it has one, else the entropy run's."""
    on_mesh = sharding.replicated(mesh)  # small and frozen: a copy on every device
    em_cfg = task.cfg.model.entropy_model
    if own_copy:
        return ckpt.load_params(run_dir / "entropy_model", model_lib.abstract_state(em_cfg)[1], on_mesh)
    return load_trained_params(entropy_run, expect_kind="entropy", model_cfg=em_cfg, sharding=on_mesh)


def _restore_or_init(run_dir: Path, task: Task, plan: _Plan, mngr) -> tuple[int, TrainState, Any]:
    """The newest intact checkpoint's (step, state, data iterator), or a fresh start; damaged newer steps are
    set aside with a warning. Writes nothing unless a restore succeeded."""
    cfg = task.cfg

    def data_iterator(start_step: int = 0):
        return pipeline.make_train_iterator(cfg.data, "train", task.train_transform, task.fields,
                                            seed=cfg.data.seed, start_step=start_step)

    def restore_into(step: int):
        # written by another number of processes, a step's iterator states do not apply; global batches then
        # depend on the step alone, so a fresh iterator starts there (None: restore the state only)
        return data_iterator() if ckpt.saved_process_count(mngr, step) in (None, jax.process_count()) else None

    found = ckpt.restore_newest_intact(mngr, plan.placement.abstract, restore_into)
    if found is None:
        return 0, create_train_state(task.model_cfg, plan.tx, task.train_cfg.seed, plan.placement), data_iterator()
    step, state, data_iter, damaged = found
    if data_iter is None:
        data_iter = data_iterator(start_step=step)
    if damaged:
        moved = ckpt.set_aside(run_dir, damaged)
        sync_processes("blt_jax: damaged checkpoints set aside")
        mngr.reload()
        warnings.warn(f"damaged checkpoint step(s) {damaged} moved to {run_dir / ckpt.DAMAGED_DIR} (kept for "
                      f"inspection: {', '.join(p.name for p in moved)})", ckpt.DamagedCheckpointWarning, stacklevel=3)
    return step, state, data_iter


class _StepLog:
    """Reads each step's metrics one step late (the device is busy with the next step meanwhile), stops the
    run on a non-finite loss or gradient, and writes every `log_every`-th row to the sinks and progress bar."""

    def __init__(self, task: Task, writer: MetricsWriter, bar: tqdm, start: int, end: int, mngr):
        self.task, self.writer, self.bar, self.end, self.mngr = task, writer, bar, end, mngr
        cfg = task.cfg
        self.window_bytes = cfg.data.batch_size * cfg.data.seq_len
        self.peak = flops.peak_flops_per_device(jax.devices()[0].device_kind)
        self.pending: Optional[tuple[int, dict]] = None
        self.first = start + 1  # its time includes compilation: rates are timed from its end
        self.last_time: Optional[float] = None
        self.last_step = start
        self.last_row: Optional[dict] = None

    def dispatched(self, step: int, metrics: dict) -> None:
        """Step `step` was dispatched: read the previous step's metrics now."""
        self.flush()
        self.pending = (step, metrics)

    def flush(self) -> None:
        """Read the pending step's metrics (waits for that step to finish)."""
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        m = jax.device_get(metrics)
        loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            saved = self.mngr.latest_step()
            kept = f"step {saved}, the newest checkpoint, is the last good one" if saved is not None else \
                "no checkpoint was saved"
            raise NonFiniteLoss(f"step {step}: the loss is {loss} (gradient norm {grad_norm}), so training stopped "
                                f"without saving this state; {kept}. Lower the learning rate (or lengthen the "
                                f"warm-up) and run the same command to resume")
        now = time.time()
        if step == self.first:
            self.last_time, self.last_step = now, step
        if step % self.task.train_cfg.log_every == 0 or step == self.end:
            self._write(step, m, now)

    def _write(self, step: int, m: dict, now: float) -> None:
        row = {"loss": m["loss"], "bits_per_byte": m["bits_per_byte"], "grad_norm": m["grad_norm"],
               "learning_rate": m["learning_rate"]}
        # objective-specific terms (e.g. BLT-D's masked-diffusion loss) travel as `log_<name>`
        row.update({k[4:]: m[k] for k in m if k.startswith("log_")})
        patch_len = 1.0
        if "patches" in m:
            patch_len = float(m["bytes"]) / max(float(m["patches"]), 1.0)
            row["mean_patch_length"] = patch_len
            row["dropped_byte_fraction"] = float(m["dropped_bytes"]) / self.window_bytes
        if self.last_time is not None and step > self.last_step:
            bps = self.window_bytes * (step - self.last_step) / max(now - self.last_time, 1e-9)
            row["bytes_per_second"] = bps
            row["model_flops_per_second"] = bps * flops.train_flops_per_byte(
                self.task.model_cfg, self.task.cfg.data.seq_len, patch_len)
            if self.peak is not None:  # model FLOPs utilisation of all devices
                row["mfu"] = row["model_flops_per_second"] / (self.peak * jax.device_count())
            self.last_time, self.last_step = now, step
        self.writer.write(step, row)
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", bpb=f"{row['bits_per_byte']:.3f}",
                             **({"B/s": f"{row['bytes_per_second']:.0f}"} if "bytes_per_second" in row else {}))
        self.last_row = row


def _run_steps(task: Task, plan: _Plan, mngr, state: TrainState, data_iter, start: int, end: int,
               eval_batches: list[dict], writer: MetricsWriter, log: _StepLog,
               stop: _StopFlag) -> tuple[TrainState, int]:
    """Steps start+1 .. end (or until a stop is requested), with periodic evaluation and checkpoints."""
    tc = task.train_cfg
    step, saving = start, None  # saving: the step whose asynchronous save is in flight
    while step < end and not stop.requested:
        batch = to_device(next(data_iter), plan.placement)
        state, metrics = plan.step_fns.train_step(state, batch)
        step += 1
        log.bar.update(1)
        log.dispatched(step, metrics)
        if tc.eval_every and step % tc.eval_every == 0 and step < end:
            writer.write(step, evaluate(plan.step_fns, state.params, eval_batches, plan.placement), prefix="heldout")
        if jax.process_count() > 1 and step % tc.log_every == 0:  # stop together, or the save would hang
            stop.requested = bool(multihost_utils.process_allgather(np.array(stop.requested)).any())
        if step % tc.checkpoint_every == 0 or step == end or stop.requested:
            log.flush()  # this step's loss is finite: its state may be saved
            if saving is not None:  # the previous save must have succeeded (orbax would wait for it anyway)
                ckpt.confirm_saved(mngr, saving)
            ckpt.save(mngr, step, state, data_iter)
            saving = step
        # a finished save is checked at once (one process: processes could see it finish at different steps,
        # and must stop together, so they check before the next save and at the end)
        if saving is not None and jax.process_count() == 1 and not mngr.is_saving_in_progress():
            ckpt.confirm_saved(mngr, saving)
            saving = None
    log.flush()
    if saving is not None:
        ckpt.confirm_saved(mngr, saving)
    return state, step


def train(kind: str, cfg: RunConfig, run_dir: str | Path, *, entropy_run: Optional[str] = None,
          progress: bool = True, stop_after: Optional[int] = None) -> dict[str, Any]:
    """Train (or resume) a run. `stop_after` ends the process early at that step, as a crash would
    (tests use it to prove resumption); the schedule still targets `steps`. The summary's `stopped_by` says
    why a run ended before `steps`: "signal" (SIGINT/SIGTERM) or "stop_after". A run another job is
    training is refused (`checkpoint.RunInUse`), and so is a run inside its data store (`prepare
    --overwrite` would then refuse the store for the run's files, and the run's files would be in the store's)."""
    _check_run_folder(cfg.data.path, run_dir)
    task = resolve_task(kind, absolute_store(cfg))  # a bad store is refused before the run folder is made
    store.check_tokens(task.cfg.data.path)
    new = "://" not in str(run_dir) and not Path(run_dir).exists()
    try:
        with ckpt.exclusive(run_dir):
            return _train(task, Path(run_dir), entropy_run, progress, stop_after)
    except BaseException:
        # a new run that failed before its first checkpoint (a data check, another entropy model) holds nothing
        # to resume: leave no folder that `eval` and a rerun would take for a run
        if new and jax.process_index() == 0 and ckpt.latest_step(run_dir) is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _check_run_folder(store_path: str, run_dir: str | Path) -> None:
    if "://" in str(run_dir):
        return
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise ConfigError(f"--run {run_dir}: is a file; give a new folder, or a run to resume")
    if "://" not in store_path and Path(run_dir).resolve().is_relative_to(Path(store_path).resolve()):
        raise ConfigError(f"--run {run_dir}: lies inside the data store {store_path}; nothing was written: keep runs "
                          "and stores in separate folders")


def _train(task: Task, run_dir: Path, entropy_run: Optional[str], progress: bool,
           stop_after: Optional[int]) -> dict[str, Any]:
    kind, cfg, tc = task.kind, task.cfg, task.train_cfg
    plan = _plan(task)
    # every process must see the run directory as it was before any of them writes to it
    resuming = (run_dir / ckpt.RUN_META).exists()
    has_entropy_copy = (run_dir / "entropy_model").exists()
    sync_processes("blt_jax: run directory inspected")

    changes, history = _check_resume(run_dir, task, ckpt.latest_step(run_dir)) if resuming else ({}, [])
    extra: dict[str, Any] = {"data": cfg.data.path}
    entropy_params = None
    if kind == "blt" and cfg.model.patching.mode == "entropy":
        entropy_run = entropy_run or store.read_manifest(cfg.data.path).get("entropy_run")
        if entropy_run is None:
            raise ValueError("entropy_run: a BLT with entropy patching needs the entropy model's run directory")
        extra["entropy_run"] = str(Path(entropy_run).absolute()) if "://" not in str(entropy_run) else entropy_run
        entropy_params = _entropy_params(run_dir, task, entropy_run, plan.mesh, resuming and has_entropy_copy)
        from blt_jax import prepare  # noqa: PLC0415 (the data-preparation side of the same check)

        # the store's entropies place the training patches: they must be this entropy model's, and complete
        prepare.check_entropy_run(cfg.data.path, entropy_run, entropy_params)

    mngr = ckpt.open_manager(run_dir, keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
    try:
        start, state, data_iter = _restore_or_init(run_dir, task, plan, mngr)
    except BaseException:
        mngr.close()
        raise
    # restored (or started): only now does anything in the run directory change
    if changes:
        history.append(resume.history_entry(start, changes))
    ckpt.write_run_meta(run_dir, kind, cfg, **extra, history=history)
    if entropy_params is not None and not has_entropy_copy:
        ckpt.save_params(run_dir / "entropy_model", entropy_params)
    writer = MetricsWriter(run_dir, keep_through_step=start)  # replayed steps are logged once
    eval_batches = pipeline.make_eval_batches(cfg.data, "heldout", task.eval_transform, task.fields,
                                              num_batches=tc.eval_batches)

    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    bar = tqdm(total=tc.steps, initial=start, desc=f"train {kind}", disable=not progress or jax.process_index() != 0,
               dynamic_ncols=True)
    log = _StepLog(task, writer, bar, start, end, mngr)
    t_begin = time.time()
    try:
        with _StopFlag() as stop, jax.set_mesh(plan.mesh):
            state, step = _run_steps(task, plan, mngr, state, data_iter, start, end, eval_batches, writer, log, stop)
        interrupted = step < tc.steps
        summary: dict[str, Any] = {
            "kind": kind, "run_dir": str(run_dir), "resumed_from": start, "step": step, "interrupted": interrupted,
            "stopped_by": ("signal" if stop.requested else "stop_after") if interrupted else None}
        if log.last_row is not None:
            summary["last_train"] = log.last_row
        # a rerun of a finished run trains nothing: its held-out row is in the log already (logged once);
        # evaluating is a collective, so every process goes by process 0's log
        earlier = logged(run_dir, step, "heldout") if step == start else None
        logged_before = earlier is not None
        if jax.process_count() > 1:
            logged_before = bool(multihost_utils.broadcast_one_to_all(np.array(logged_before)))
        if not interrupted and logged_before:
            summary["heldout"] = earlier
        elif not interrupted:
            with jax.set_mesh(plan.mesh):
                summary["heldout"] = evaluate(plan.step_fns, state.params, eval_batches, plan.placement)
            writer.write(step, summary["heldout"], prefix="heldout")
    finally:  # on an error too: the newest good checkpoint is left complete on disk
        bar.close()
        with contextlib.suppress(Exception):
            mngr.wait_until_finished()
        if hasattr(data_iter, "close"):  # stops grain worker processes
            data_iter.close()
        writer.close()
        mngr.close()
    summary["wall_seconds"] = time.time() - t_begin
    return summary
