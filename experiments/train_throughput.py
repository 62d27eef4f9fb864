"""Training throughput of a preset on this machine: bytes/s, model FLOPs/s and MFU, against the measured
matmul peak of one device (CPU) and, on accelerators, against the chip's peak from `flops.PEAK_FLOPS_PER_DEVICE`.
The train step is the real one: state created sharded on the config's mesh over every local device, batches
split over the batch axes. Synthetic batches (random bytes, entropy patches from random entropies at the
target mean patch length), so it needs no data store.

    python experiments/train_throughput.py --preset quickstart --steps 10
    python experiments/train_throughput.py --preset tiny --set data.batch_size=32 --what entropy
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from blt_jax import flops, sharding
from blt_jax.config import apply_overrides, get_preset
from blt_jax.patching import calibrate_threshold, patch_ids, start_flags
from blt_jax.tokenizer import BOS_ID
from blt_jax.train.loop import to_device
from blt_jax.train.step import create_train_state, make_optimizer, make_step_fns, plan_train_state


def matmul_peak(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of a square matmul: the practical peak MFU is reported against."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def synthetic_batch(cfg, seed: int = 0) -> tuple[dict, float]:
    B, S = cfg.data.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 260, (B, S + 1)).astype(np.int32)
    tokens[:, 0] = BOS_ID
    patching = cfg.model.patching
    H = rng.gamma(2.0, 0.8, (B, S)).astype(np.float32)
    thr = patching.threshold
    if patching.mode == "entropy" and thr is None:
        thr, _ = calibrate_threshold(patching, tokens[:, :S], H)
    starts = start_flags(patching, tokens[:, :S], H, thr)
    ids = patch_ids(starts, patching.max_patches)
    batch = {"tokens": tokens[:, :S], "targets": tokens[:, 1:], "loss_mask": np.asarray(ids.valid, np.float32),
             "patch_starts": starts, "dropped_bytes": np.sum(~np.asarray(ids.valid), axis=1).astype(np.int32)}
    return batch, float(B * S) / float(starts[:, :S].sum())


def measure(cfg, kind: str = "blt", steps: int = 10, peak_n: int = 2048) -> dict:
    """Time `steps` real train steps of `cfg` on synthetic batches after a compiling one; FLOP/s and MFU
    (against an n = `peak_n` matmul timed after each step)."""
    model_cfg = cfg.model.entropy_model if kind == "entropy" else cfg.model
    tc = cfg.entropy_train if kind == "entropy" else cfg.train
    mesh = sharding.make_mesh(cfg.mesh)
    tx = make_optimizer(tc)
    graphdef, placement = plan_train_state(model_cfg, tx, mesh, cfg.mesh.rules, cfg.mesh.min_sharded_param_bytes)
    state = create_train_state(model_cfg, tx, tc.seed, placement)
    fns = make_step_fns(kind, graphdef, tx, tc, placement=placement)
    host_batch, patch_len = synthetic_batch(cfg)
    if kind == "entropy":
        host_batch = {k: host_batch[k] for k in ("tokens", "targets", "loss_mask")}
    batch = to_device(host_batch, placement, process_local=False)
    times = []
    with jax.set_mesh(mesh):
        t = time.perf_counter()
        state, m = fns.train_step(state, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t
        peaks = []  # measured between steps: on a shared machine both see the same neighbours
        for _ in range(steps):
            t = time.perf_counter()
            state, m = fns.train_step(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
            peaks.append(matmul_peak(jnp.bfloat16 if tc.compute_dtype == "bfloat16" else jnp.float32, n=peak_n,
                                     repeats=3))
    step_s = float(np.median(times))
    bytes_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops_per_byte = flops.train_flops_per_byte(model_cfg, cfg.data.seq_len, patch_len)
    peak = max(peaks)  # one device's
    achieved = flops_per_byte * bytes_per_step / step_s
    paired = [flops_per_byte * bytes_per_step / t / p for t, p in zip(times, peaks, strict=True)]
    n = jax.device_count()
    chip_peak = flops.peak_flops_per_device(jax.devices()[0].device_kind)
    return {
        "preset": cfg.name, "what": kind, "device": str(jax.devices()[0].device_kind), "devices": n,
        "mesh": dict(mesh.shape), "compute_dtype": tc.compute_dtype, "batch": cfg.data.batch_size,
        "seq_len": cfg.data.seq_len, "remat": tc.remat, "mean_patch_length": patch_len,
        "compile_seconds": round(compile_s, 2), "step_seconds_median": step_s, "step_seconds_min": min(times),
        "bytes_per_second": bytes_per_step / step_s, "train_flops_per_byte": flops_per_byte,
        "model_flops_per_second": achieved, "matmul_peak_flops_per_second_per_device": peak,
        "mfu_vs_measured_peak": achieved / (peak * n),  # median step time against the best peak seen
        "mfu_paired_median": float(np.median(paired)) / n,  # each step against the peak measured right after it
        "mfu_vs_chip_peak": achieved / (chip_peak * n) if chip_peak else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quickstart")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--what", choices=("blt", "entropy"), default="blt")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    print(json.dumps(measure(apply_overrides(get_preset(args.preset), args.set), args.what, args.steps), indent=2))


if __name__ == "__main__":
    main()
