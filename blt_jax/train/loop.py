"""The training loop shared by the entropy model and BLT: data -> jitted donated step -> metrics, periodic
async checkpoints, held-out evaluation, automatic resume, and a clean save on SIGINT/SIGTERM."""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from blt_jax import flops, model as model_lib, sharding
from blt_jax.config import ConfigError, RunConfig
from blt_jax.data import pipeline, store
from blt_jax.objectives import LN2
from blt_jax.train import checkpoint as ckpt
from blt_jax.train.checkpoint import load_trained_params
from blt_jax.train.metrics import MetricsWriter
from blt_jax.train.step import Placement, create_train_state, make_optimizer, make_step_fns, plan_train_state

KINDS = ("entropy", "blt")


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


def resolve_task(kind: str, cfg: RunConfig) -> Task:
    """Fix everything the data store decides (the calibrated threshold) and build the transforms."""
    if kind not in KINDS:
        raise ConfigError(f"kind: must be one of {KINDS}, got {kind!r}")
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


def train(kind: str, cfg: RunConfig, run_dir: str | Path, *, entropy_run: Optional[str] = None,
          progress: bool = True, stop_after: Optional[int] = None) -> dict[str, Any]:
    """Train (or resume) a run. `stop_after` ends the process early at that step, as a crash would
    (tests use it to prove resumption); the schedule still targets `steps`."""
    run_dir = Path(run_dir)
    task = resolve_task(kind, cfg)
    cfg, tc = task.cfg, task.train_cfg
    mesh = sharding.make_mesh(cfg.mesh)
    tx = make_optimizer(tc)
    graphdef, placement = plan_train_state(task.model_cfg, tx, mesh, cfg.mesh.rules, cfg.mesh.min_sharded_param_bytes)
    placement.check_batch(cfg.data.batch_size)
    # every process must see the run directory as it was before any of them writes to it
    resuming = (run_dir / ckpt.RUN_META).exists()
    has_entropy_copy = (run_dir / "entropy_model").exists()
    sync_processes("blt_jax: run directory inspected")

    extra: dict[str, Any] = {"data": cfg.data.path}
    entropy_params = None
    if kind == "blt" and cfg.model.patching.mode == "entropy":
        entropy_run = entropy_run or store.read_manifest(cfg.data.path).get("entropy_run")
        if entropy_run is None:
            raise ConfigError("entropy_run: a BLT with entropy patching needs the entropy model's run directory")
        extra["entropy_run"] = str(entropy_run)
        on_mesh = sharding.replicated(mesh)  # small and frozen: a copy on every device
        if resuming and has_entropy_copy:  # resuming: the run's own frozen copy
            entropy_params = ckpt.load_params(run_dir / "entropy_model",
                                              model_lib.abstract_state(cfg.model.entropy_model)[1], on_mesh)
        else:
            entropy_params = load_trained_params(entropy_run, expect_kind="entropy",
                                                 model_cfg=cfg.model.entropy_model, sharding=on_mesh)

    if resuming:
        ckpt.check_compatible(run_dir, kind, cfg)
    ckpt.write_run_meta(run_dir, kind, cfg, **extra)
    if entropy_params is not None and not has_entropy_copy:
        ckpt.save_params(run_dir / "entropy_model", entropy_params)

    step_fns = make_step_fns(kind, graphdef, tx, tc, eval_max_patches=task.eval_max_patches, placement=placement)
    eval_batches = pipeline.make_eval_batches(cfg.data, "heldout", task.eval_transform, task.fields,
                                              num_batches=tc.eval_batches)
    mngr = ckpt.open_manager(run_dir, keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
    def train_iterator(start_step: int = 0):
        return pipeline.make_train_iterator(cfg.data, "train", task.train_transform, task.fields,
                                            seed=cfg.data.seed, start_step=start_step)

    start, latest = 0, mngr.latest_step()
    if latest is None:
        state = create_train_state(task.model_cfg, tx, tc.seed, placement)
        data_iter = train_iterator()
    elif ckpt.saved_process_count(mngr, latest) in (None, jax.process_count()):
        data_iter = train_iterator()
        start, state = ckpt.restore(mngr, placement.abstract, data_iter)  # the iterators' exact states
    else:  # written by another number of processes: their iterator states do not apply, but global batches
        start, state = ckpt.restore(mngr, placement.abstract)  # depend on the step alone
        data_iter = train_iterator(start_step=start)
    writer = MetricsWriter(run_dir)
    model_cfg = task.model_cfg
    window_bytes = cfg.data.batch_size * cfg.data.seq_len

    summary: dict[str, Any] = {"kind": kind, "run_dir": str(run_dir), "resumed_from": start}
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    bar = tqdm(total=tc.steps, initial=start, desc=f"train {kind}", disable=not progress or jax.process_index() != 0,
               dynamic_ncols=True)
    last_log_time, last_log_step = None, start
    t_begin = time.time()
    step = start
    peak = flops.peak_flops_per_device(jax.devices()[0].device_kind)
    with _StopFlag() as stop, jax.set_mesh(mesh):
        while step < end and not stop.requested:
            batch = to_device(next(data_iter), placement)
            state, metrics = step_fns.train_step(state, batch)
            step += 1
            bar.update(1)
            if step == start + 1:  # first step includes compilation: time from its end
                jax.block_until_ready(metrics["loss"])
                last_log_time, last_log_step = time.time(), step
            if step % tc.log_every == 0 or step == end:
                m = jax.device_get(metrics)
                now = time.time()
                elapsed = max(now - last_log_time, 1e-9) if step > last_log_step else None
                row = {"loss": m["loss"], "bits_per_byte": m["bits_per_byte"], "grad_norm": m["grad_norm"],
                       "learning_rate": m["learning_rate"]}
                # objective-specific terms (e.g. BLT-D's masked-diffusion loss) travel as `log_<name>`
                row.update({k[4:]: m[k] for k in m if k.startswith("log_")})
                patch_len = 1.0
                if "patches" in m:
                    patch_len = float(m["bytes"]) / max(float(m["patches"]), 1.0)
                    row["mean_patch_length"] = patch_len
                    row["dropped_byte_fraction"] = float(m["dropped_bytes"]) / window_bytes
                if elapsed is not None:
                    bps = window_bytes * (step - last_log_step) / elapsed
                    row["bytes_per_second"] = bps
                    row["model_flops_per_second"] = bps * flops.train_flops_per_byte(
                        model_cfg, cfg.data.seq_len, patch_len)
                    if peak is not None:  # model FLOPs utilisation of all devices
                        row["mfu"] = row["model_flops_per_second"] / (peak * jax.device_count())
                writer.write(step, row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", bpb=f"{row['bits_per_byte']:.3f}",
                                **({"B/s": f"{row['bytes_per_second']:.0f}"} if "bytes_per_second" in row else {}))
                summary["last_train"] = row
                last_log_time, last_log_step = now, step
            if tc.eval_every and step % tc.eval_every == 0 and step < end:
                ev = evaluate(step_fns, state.params, eval_batches, placement)
                writer.write(step, ev, prefix="heldout")
            if jax.process_count() > 1 and step % tc.log_every == 0:  # stop together, or the save would hang
                stop.requested = bool(multihost_utils.process_allgather(np.array(stop.requested)).any())
            if step % tc.checkpoint_every == 0 or step == end or stop.requested:
                ckpt.save(mngr, step, state, data_iter)
    bar.close()
    mngr.wait_until_finished()
    if hasattr(data_iter, "close"):  # stops grain worker processes
        data_iter.close()
    interrupted = step < tc.steps
    summary.update(step=step, interrupted=interrupted, wall_seconds=time.time() - t_begin)
    if not interrupted:
        with jax.set_mesh(mesh):
            ev = evaluate(step_fns, state.params, eval_batches, placement)
        writer.write(step, ev, prefix="heldout")
        summary["heldout"] = ev
    writer.close()
    mngr.close()
    return summary
