"""Run directories and orbax checkpoints.

A run directory holds:
    run.json          what was trained ("blt" or "entropy"), the full resolved RunConfig, provenance
    checkpoints/      orbax CheckpointManager: per step, the train state and the grain data-iterator state
    entropy_model/    (BLT runs) the frozen entropy model's parameters, so the run is self-contained
    metrics.jsonl, tb/  logs

Saves are asynchronous and atomic (orbax writes to a temporary folder and renames), so a crash never
leaves a half-written latest checkpoint; resuming restores the model, optimiser and data iterator exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from blt_jax import model as model_lib
from blt_jax.config import RunConfig
from blt_jax.train.step import init_train_state, make_optimizer

RUN_META = "run.json"
FORMAT_VERSION = 1


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the requested model; the message names the first differing field."""


def first_difference(a: Any, b: Any, prefix: str) -> Optional[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{prefix}.{key}"
            diff = first_difference(a[key], b[key], f"{prefix}.{key}")
            if diff:
                return diff
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return None if list(a) == list(b) else prefix
    return None if a == b else prefix


def _lookup(d: dict, dotted: str) -> Any:
    node: Any = d
    for part in dotted.split(".")[1:]:
        node = node.get(part, "<absent>") if isinstance(node, dict) else "<absent>"
    return node


def write_run_meta(run_dir: str | Path, kind: str, cfg: RunConfig, **extra: Any) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "kind": kind, "config": cfg.to_dict(), **extra}
    if jax.process_index() == 0:
        tmp = Path(run_dir) / (RUN_META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp, Path(run_dir) / RUN_META)


def read_run_meta(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_META
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: not a blt_jax run directory (no {RUN_META})")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatch(f"{path}: format version {meta.get('format_version')} is not supported "
                                 f"(this blt_jax reads version {FORMAT_VERSION})")
    return meta


def load_run_config(run_dir: str | Path) -> tuple[str, RunConfig, dict]:
    meta = read_run_meta(run_dir)
    return meta["kind"], RunConfig.from_dict(meta["config"]), meta


def check_compatible(run_dir: str | Path, kind: str, cfg: RunConfig) -> None:
    """Refuse to resume `run_dir` with a model that differs from the one it holds."""
    meta = read_run_meta(run_dir)
    if meta["kind"] != kind:
        raise CheckpointMismatch(f"{run_dir} holds a {meta['kind']!r} run, not {kind!r}")
    # the entropy model is what an entropy run trains; a BLT run's shapes depend on the whole model section
    section = "model.entropy_model" if kind == "entropy" else "model"
    # parsed, so fields added since the run was written compare at their defaults (how it behaved)
    saved, wanted = RunConfig.from_dict(meta["config"]).to_dict(), cfg.to_dict()
    diff = first_difference(_lookup(saved, f"config.{section}"), _lookup(wanted, f"config.{section}"), section)
    if diff:
        raise CheckpointMismatch(
            f"{run_dir} was written for a different model: {diff} is {_lookup(saved, f'config.{diff}')!r} there "
            f"but {_lookup(wanted, f'config.{diff}')!r} now. Use a new run directory, or the checkpoint's own config.")


def open_manager(run_dir: str | Path, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=opts,
                                 item_names=("state", "data_iter"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any = None, force: bool = False) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        import grain  # noqa: PLC0415 (serving loads parameters without the data pipeline)

        items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    mngr.save(step, args=ocp.args.Composite(**items), force=force)


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, data_iter: Any = None,
            step: Optional[int] = None) -> tuple[int, Any]:
    """Restore the train state (onto the shardings carried by `abstract_state`) and the data iterator."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{mngr.directory}: no checkpoint to restore")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        import grain  # noqa: PLC0415

        items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError) as e:
        raise CheckpointMismatch(f"{mngr.directory} step {step} does not fit this model: {e}") from None
    return step, restored["state"]


def save_params(path: str | Path, params: Any) -> None:
    """A standalone parameter checkpoint (e.g. the frozen entropy model inside a BLT run)."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(path).absolute(), params, force=True)


def on_local_device(abstract: Any, sharding: Optional[jax.sharding.Sharding] = None) -> Any:
    """Abstract leaves without a sharding placed on `sharding` (default: this process's first device): a
    checkpoint written on one platform (CPU) then restores on another (GPU), whose device topology differs.
    Multi-process runs pass a replicated mesh sharding (a host-local array cannot be saved collectively)."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: x if getattr(x, "sharding", None) is not None else
                        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)


def load_params(path: str | Path, abstract_params: Any, sharding: Optional[jax.sharding.Sharding] = None) -> Any:
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return ckptr.restore(Path(path).absolute(), on_local_device(abstract_params, sharding))
        except (ValueError, KeyError) as e:
            raise CheckpointMismatch(f"{path} does not fit this model: {e}") from None


def saved_process_count(mngr: ocp.CheckpointManager, step: int) -> Optional[int]:
    """How many processes wrote a step's data-iterator state (grain writes one `process_i-of-N.json` each);
    None when the step holds none."""
    folder = Path(mngr.directory) / str(step) / "data_iter"
    names = [p.name for p in folder.glob("process_*-of-*.json")] if folder.exists() else []
    counts = {int(n.rsplit("-of-", 1)[1].split(".")[0]) for n in names}
    return counts.pop() if len(counts) == 1 else None


def load_trained_params(run_dir: str | Path, expect_kind: Optional[str] = None, model_cfg=None,
                        step: Optional[int] = None, sharding: Optional[jax.sharding.Sharding] = None) -> Any:
    """The model parameters of a run's latest (or given) checkpoint (on `sharding`, default: one local
    device)."""
    kind, cfg, _ = load_run_config(run_dir)
    if expect_kind is not None and kind != expect_kind:
        raise CheckpointMismatch(f"{run_dir} holds a {kind!r} run, expected {expect_kind!r}")
    own_cfg = cfg.model.entropy_model if kind == "entropy" else cfg.model
    if model_cfg is not None and model_cfg != own_cfg:
        diff = first_difference(dataclasses.asdict(own_cfg), dataclasses.asdict(model_cfg), "model")
        raise CheckpointMismatch(f"{run_dir} holds a model that differs from the configured one at {diff}")
    _, abstract_params = model_lib.abstract_state(own_cfg)
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints").exists() and (run_dir / "params").exists():  # converted: parameters only
        return load_params(run_dir / "params", abstract_params, sharding)
    tc = cfg.entropy_train if kind == "entropy" else cfg.train
    abstract = on_local_device(jax.eval_shape(lambda p: init_train_state(p, make_optimizer(tc)), abstract_params),
                               sharding)
    mngr = open_manager(run_dir, keep=tc.keep_checkpoints, async_save=False)
    try:
        _, state = restore(mngr, abstract, None, step)
    finally:
        mngr.close()
    return state.params
