"""Run directories and orbax checkpoints.

A run directory holds:
    run.json          what was trained ("blt" or "entropy"), the full resolved RunConfig, provenance, and the
                      history of config changes accepted on resume (`blt_jax.train.resume`)
    checkpoints/      orbax CheckpointManager: per step, the train state, the grain data-iterator state and
                      the state's checksums
    entropy_model/    (BLT runs) the frozen entropy model's parameters, so the run is self-contained
    damaged_checkpoints/  steps found damaged when training resumed, set aside (never deleted)
    metrics.jsonl, tb/  logs

Saves are asynchronous and atomic (orbax writes to a temporary folder and renames), so a crash never leaves a
half-written latest checkpoint; resuming restores the model, optimiser and data iterator exactly. Files damaged
after they were written (a bad disk, a truncated copy) are caught on load by checksums written with every
checkpoint; loading then falls back to the newest intact step, with a warning naming the damaged one.
Checkpoints written before checksums existed load with a finiteness check of their arrays instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from blt_jax import model as model_lib
from blt_jax.config import ConfigError, RunConfig
from blt_jax.train.step import init_train_state, make_optimizer

RUN_META = "run.json"
FORMAT_VERSION = 1
CHECKSUMS = "checksums"  # the checksum item of every checkpoint step
PARAMS_CHECKSUMS = "checksums.json"  # ... and the file beside a parameters-only checkpoint's arrays
DAMAGED_DIR = "damaged_checkpoints"
CHECKSUM_ALGORITHM = "uint32 sum of word * (2 * index + 1), row-major, per array"


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the requested model; the message names the first differing field."""


class CheckpointDamaged(ValueError):
    """A checkpoint's files cannot be read, or hold other values than were written; the message names it."""


class CheckpointSaveFailed(OSError):
    """Writing a checkpoint failed (a full disk, lost permissions); the message names the step and the cause."""


class DamagedCheckpointWarning(UserWarning):
    """The newest checkpoint was damaged; an older intact one was used instead."""


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


def short_cause(error: BaseException, limit: int = 200) -> str:
    """One line from an exception for a one-line error message (tensorstore's run to many lines of spec)."""
    text = str(error).strip().split("\n")[0] or type(error).__name__
    for noise in (" See full TensorStore details", " [tensorstore_spec"):
        text = text.split(noise)[0]
    if len(text) > limit:  # nested "context: context: cause" chains: the innermost parts say what happened
        text = ": ".join(text.split(": ")[-2:])
    return text[:limit]


# ---- run.json ----------------------------------------------------------------------------------------------

class RunInUse(OSError):
    """Another training job holds the run directory."""


@contextlib.contextmanager
def exclusive(run_dir: str | Path) -> Iterator[None]:
    """Hold a run directory for one training job: two trainers on one run (a command started twice, a cron
    job overlapping the last) would overwrite each other's checkpoints and log every step twice. An advisory
    lock (flock) on a file in the run, one per process index, so each process of a multi-process job holds its
    own and a second job's process i meets the first job's. The OS drops it when the process ends, so a crash
    leaves nothing to clean up. Run directories behind a URL are not locked (no shared lock there)."""
    if "://" in str(run_dir):
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f".train-{jax.process_index()}.lock"
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInUse(f"{run_dir}: another training job is using this run (it holds {path.name}); wait for it "
                           f"to end, or train into another --run") from None
        yield


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
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointDamaged(f"{path}: not valid JSON ({e}); restore it from a copy, or start a new run "
                                f"directory") from None
    if not isinstance(meta, dict):
        raise CheckpointDamaged(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatch(f"{path}: format version {meta.get('format_version')} is not supported "
                                 f"(this blt_jax reads version {FORMAT_VERSION})")
    if meta.get("kind") not in ("blt", "entropy") or not isinstance(meta.get("config"), dict):
        raise CheckpointDamaged(f"{path}: needs a 'kind' (blt or entropy) and a 'config' object")
    return meta


def load_run_config(run_dir: str | Path) -> tuple[str, RunConfig, dict]:
    meta = read_run_meta(run_dir)
    try:
        cfg = RunConfig.from_dict(meta["config"])
    except ConfigError as e:
        raise ConfigError(f"{Path(run_dir) / RUN_META}: {e}") from None
    return meta["kind"], cfg, meta


def check_compatible(run_dir: str | Path, kind: str, cfg: RunConfig) -> None:
    """Refuse to resume `run_dir` with a model that differs from the one it holds."""
    meta = read_run_meta(run_dir)
    if meta["kind"] != kind:
        raise CheckpointMismatch(f"{run_dir} holds a {meta['kind']!r} run, not {kind!r}")
    # the entropy model is what an entropy run trains; a BLT run's shapes depend on the whole model section
    section = "model.entropy_model" if kind == "entropy" else "model"
    # parsed, so fields added since the run was written compare at their defaults (how it behaved)
    saved, wanted = load_run_config(run_dir)[1].to_dict(), cfg.to_dict()
    diff = first_difference(_lookup(saved, f"config.{section}"), _lookup(wanted, f"config.{section}"), section)
    if diff:
        raise CheckpointMismatch(
            f"{run_dir} was written for a different model: {diff} is {_lookup(saved, f'config.{diff}')!r} there "
            f"but {_lookup(wanted, f'config.{diff}')!r} now. Use a new run directory, or the checkpoint's own config.")


# ---- checksums ---------------------------------------------------------------------------------------------

def _words(x: jax.Array) -> jax.Array:
    """The bits of an array as uint32 words (same shape; an 8-byte type gains a trailing axis of 2)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size < 4:
        return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    """sum_i word_i * (2 i + 1) mod 2**32 over the array's words in row-major order. Integer sums are exact in
    any order, so the value does not depend on the sharding; an odd weight is invertible mod 2**32, so any
    single changed word changes it (and moved words almost surely do)."""
    words = _words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):  # the row-major index, built without reshaping a sharded array
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)


_checksums_on_device = jax.jit(lambda tree: jax.tree.map(_checksum, tree))
_finite_on_device = jax.jit(lambda tree: jax.tree.map(
    lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True), tree))


def _by_path(tree: Any) -> dict[str, Any]:
    """Leaves keyed by their path, read to the host (a replicated scalar: any local copy will do)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x).item()
            for path, x in leaves}


def checksums(tree: Any) -> dict:
    """The checksum record of a pytree of arrays, as saved beside it (JSON)."""
    return {"algorithm": CHECKSUM_ALGORITHM, "arrays": _by_path(_checksums_on_device(tree))}


def verify(tree: Any, record: Optional[dict], where: str) -> None:
    """Raise CheckpointDamaged unless `tree` matches the checksums written with it; without a record (written
    before checksums existed) every floating-point value must at least be finite."""
    if record is None:
        bad = [path for path, ok in _by_path(_finite_on_device(tree)).items() if not ok]
        if bad:
            raise CheckpointDamaged(f"{where}: {len(bad)} arrays hold NaN or Inf values (first: {bad[0]}); "
                                    f"the files are damaged or the run had diverged")
        return
    actual, expected = _by_path(_checksums_on_device(tree)), record.get("arrays", {})
    bad = sorted(set(actual) ^ set(expected)) or [p for p in actual if actual[p] != expected[p]]
    if bad:
        raise CheckpointDamaged(f"{where}: {len(bad)} arrays differ from the checksums written with them (first: "
                                f"{bad[0]}); the files were changed after the checkpoint was saved")


# ---- checkpoint steps --------------------------------------------------------------------------------------

def _drop_late_write_callbacks() -> None:
    """The array writes still in flight when a save fails finish after orbax closed their event loop:
    tensorstore's callback into that loop raises, and Python reports each as an unraisable error, one bare
    traceback apiece (hundreds for one full disk, interleaved with whatever the program prints next, until it
    exits). The save's failure is reported once, as CheckpointSaveFailed; exactly these late callbacks are
    dropped and every other unraisable error reaches the previous hook. Installed once per process."""
    if getattr(sys.unraisablehook, "_blt_drops_late_write_callbacks", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        late = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
        if not late:
            previous(unraisable)

    hook._blt_drops_late_write_callbacks = True
    sys.unraisablehook = hook


def open_manager(run_dir: str | Path, keep: int = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """The run's checkpoint manager. `read_only` (generation, evaluation): nothing is created (and nothing is
    saved, so nothing is deleted; orbax's own read_only mode would log a warning on every load)."""
    if read_only:
        opts = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    else:
        _drop_late_write_callbacks()
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=opts,
                                 item_names=("state", "data_iter", CHECKSUMS))


def latest_step(run_dir: str | Path) -> Optional[int]:
    """The newest checkpoint step of a run (None: none yet), read without creating anything."""
    if not (Path(run_dir) / "checkpoints").is_dir():
        return None
    mngr = open_manager(run_dir, read_only=True)
    try:
        return mngr.latest_step()
    finally:
        mngr.close()


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any = None, force: bool = False) -> None:
    """Start saving `state` (and the data iterator's position) with its checksums. The write finishes in the
    background: `confirm_saved` says whether it succeeded."""
    items = {"state": ocp.args.StandardSave(state), CHECKSUMS: ocp.args.JsonSave(checksums(state))}
    if data_iter is not None:
        import grain  # noqa: PLC0415 (serving loads parameters without the data pipeline)

        items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    try:
        mngr.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # a synchronous save failed, or the previous asynchronous one did
        raise _save_failed(mngr, step, e) from None


def _save_failed(mngr: ocp.CheckpointManager, step: int, cause: Any) -> CheckpointSaveFailed:
    mngr.reload()  # the steps on disk, not the manager's cached list (which may hold the failed step)
    steps = [s for s in mngr.all_steps() if s < step]
    kept = f"step {max(steps)} is the newest complete checkpoint" if steps else "no earlier checkpoint exists"
    reason = short_cause(cause) if isinstance(cause, BaseException) else cause
    return CheckpointSaveFailed(f"step {step}: the checkpoint could not be written ({reason}), so training stopped; "
                                f"{kept}. Fix the cause (disk space, permissions) and run the same command to resume")


def confirm_saved(mngr: ocp.CheckpointManager, step: int) -> None:
    """Wait for the save of `step` to finish; raise CheckpointSaveFailed if it did not complete."""
    try:
        mngr.wait_until_finished()
    except Exception as e:
        raise _save_failed(mngr, step, e) from None
    if not (Path(mngr.directory) / str(step)).is_dir():  # the run directory is shared by every process
        raise _save_failed(mngr, step, "the step was never committed")


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, data_iter: Any = None,
            step: Optional[int] = None) -> tuple[int, Any]:
    """Restore one step's train state (onto the shardings carried by `abstract_state`) and data iterator,
    checked against its checksums; CheckpointDamaged names the step when it cannot be trusted."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{mngr.directory}: no checkpoint to restore")
    folder = Path(mngr.directory) / str(step)
    if not folder.is_dir():
        raise FileNotFoundError(f"{mngr.directory}: no checkpoint of step {step} (steps: {list(mngr.all_steps())})")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if (folder / CHECKSUMS).exists():
        items[CHECKSUMS] = ocp.args.JsonRestore()
    if data_iter is not None:
        import grain  # noqa: PLC0415

        items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax, tensorstore and JSON errors alike: unreadable or not for this model
        raise CheckpointDamaged(f"step {step} cannot be read ({short_cause(e)}): its files are damaged or were "
                                f"not written for this model") from None
    verify(restored["state"], restored.get(CHECKSUMS) if CHECKSUMS in items else None, f"step {step}")
    return step, restored["state"]


def restore_newest_intact(mngr: ocp.CheckpointManager, abstract_state: Any,
                          make_data_iter: Optional[Callable[[int], Any]] = None
                          ) -> Optional[tuple[int, Any, Any, list[int]]]:
    """(step, state, data iterator, damaged steps) of the newest checkpoint that restores and verifies, with a
    DamagedCheckpointWarning naming every newer one skipped; None when there is no checkpoint.
    `make_data_iter(step)`: a fresh iterator to restore into (None: the state alone)."""
    damaged: list[tuple[int, str]] = []
    for step in sorted(mngr.all_steps(), reverse=True):
        data_iter = make_data_iter(step) if make_data_iter is not None else None
        try:
            _, state = restore(mngr, abstract_state, data_iter, step)
        except CheckpointDamaged as e:
            damaged.append((step, str(e)))
            if hasattr(data_iter, "close"):
                data_iter.close()
            continue
        if damaged:
            warnings.warn(f"{mngr.directory}: " + "; ".join(reason for _, reason in damaged) +
                          f"; using step {step}, the newest intact checkpoint", DamagedCheckpointWarning, stacklevel=2)
        return step, state, data_iter, [s for s, _ in damaged]
    if damaged:
        raise CheckpointDamaged(f"{mngr.directory}: no intact checkpoint: " + "; ".join(r for _, r in damaged))
    return None


def set_aside(run_dir: str | Path, steps: list[int]) -> list[Path]:
    """Move damaged checkpoint steps out of `checkpoints/` into `damaged_checkpoints/` (kept for inspection;
    the manager would otherwise count them, and a new save of the same step would collide)."""
    moved = []
    if jax.process_index() == 0:
        for step in steps:
            target = Path(run_dir) / DAMAGED_DIR / str(step)
            n = 0
            while target.exists():
                n += 1
                target = Path(run_dir) / DAMAGED_DIR / f"{step}.{n}"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(run_dir) / "checkpoints" / str(step), target)
            moved.append(target)
    return moved


# ---- parameters-only checkpoints ---------------------------------------------------------------------------

def save_params(path: str | Path, params: Any) -> None:
    """A standalone parameter checkpoint (e.g. the frozen entropy model inside a BLT run), with checksums."""
    record = checksums(params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(path).absolute(), params, force=True)
    if jax.process_index() == 0:
        (Path(path) / PARAMS_CHECKSUMS).write_text(json.dumps(record, indent=1))


def on_local_device(abstract: Any, sharding: Optional[jax.sharding.Sharding] = None) -> Any:
    """Abstract leaves without a sharding placed on `sharding` (default: this process's first device): a
    checkpoint written on one platform (CPU) then restores on another (GPU), whose device topology differs.
    Multi-process runs pass a replicated mesh sharding (a host-local array cannot be saved collectively)."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: x if getattr(x, "sharding", None) is not None else
                        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)


def load_params(path: str | Path, abstract_params: Any, sharding: Optional[jax.sharding.Sharding] = None) -> Any:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no parameter checkpoint here")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore(path.absolute(), on_local_device(abstract_params, sharding))
        except Exception as e:  # orbax, tensorstore and JSON errors alike
            raise CheckpointDamaged(f"{path} cannot be read ({short_cause(e)}): its files are damaged or were not "
                                    f"written for this model") from None
    sums = path / PARAMS_CHECKSUMS
    try:
        record = json.loads(sums.read_text()) if sums.exists() else None
    except json.JSONDecodeError:
        raise CheckpointDamaged(f"{sums}: not valid JSON") from None
    verify(params, record, str(path))
    return params


def saved_process_count(mngr: ocp.CheckpointManager, step: int) -> Optional[int]:
    """How many processes wrote a step's data-iterator state (grain writes one `process_i-of-N.json` each);
    None when the step holds none."""
    folder = Path(mngr.directory) / str(step) / "data_iter"
    names = [p.name for p in folder.glob("process_*-of-*.json")] if folder.exists() else []
    counts = {int(n.rsplit("-of-", 1)[1].split(".")[0]) for n in names}
    return counts.pop() if len(counts) == 1 else None


def load_trained_params(run_dir: str | Path, expect_kind: Optional[str] = None, model_cfg=None,
                        step: Optional[int] = None, sharding: Optional[jax.sharding.Sharding] = None) -> Any:
    """The model parameters of a run's given step, or of its newest intact checkpoint (a damaged newer one
    is skipped with a DamagedCheckpointWarning), on `sharding` (default: one local device). Reads only."""
    kind, cfg, _ = load_run_config(run_dir)
    if expect_kind is not None and kind != expect_kind:
        raise CheckpointMismatch(f"{run_dir} holds a {kind!r} run, expected {expect_kind!r}")
    own_cfg = cfg.model.entropy_model if kind == "entropy" else cfg.model
    if model_cfg is not None and model_cfg != own_cfg:
        diff = first_difference(dataclasses.asdict(own_cfg), dataclasses.asdict(model_cfg), "model")
        raise CheckpointMismatch(f"{run_dir} holds a model that differs from the configured one at {diff}")
    _, abstract_params = model_lib.abstract_state(own_cfg)
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints").exists():
        if (run_dir / "params").exists():  # converted or exported: parameters only
            return load_params(run_dir / "params", abstract_params, sharding)
        raise FileNotFoundError(f"{run_dir}: no checkpoint yet (the run stopped before its first save)")
    tc = cfg.entropy_train if kind == "entropy" else cfg.train
    abstract = on_local_device(jax.eval_shape(lambda p: init_train_state(p, make_optimizer(tc)), abstract_params),
                               sharding)
    mngr = open_manager(run_dir, read_only=True)
    try:
        if step is not None:
            state = restore(mngr, abstract, None, step)[1]
        else:
            found = restore_newest_intact(mngr, abstract)
            if found is None:
                raise FileNotFoundError(f"{run_dir}: no checkpoint yet (the run stopped before its first save)")
            state = found[1]
    finally:
        mngr.close()
    return state.params
