"""Ahead-of-time compilation of the train step for a target topology, from any machine.

The train step is lowered with abstract, sharded inputs (nothing is allocated) and compiled for either a TPU
topology (through libtpu's topology description: `pip install "jax[tpu]"`, no TPU needed) or N local CPU
devices. XLA's memory analysis then says, per device, what the state, the batch and the temporaries take:
whether a config fits before any hardware is rented.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np

from blt_jax import sharding
from blt_jax.config import ConfigError, RunConfig
from blt_jax.data.pipeline import PatchedWindows
from blt_jax.train.step import make_optimizer, make_step_fns, plan_train_state

# chips -> physical shape. v4 / v5p chips form 3-D tori (one jax device per chip, "megacore"); v5e / v6e 2-D.
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# accelerator type prefix -> (topology prefix, chip config, TensorCores per chip counted in the type's size)
_GENERATIONS = {"v4": ("v4", "megacore", 2), "v5p": ("v5", "megacore", 2), "v5e": ("v5e", "default", 1),
                "v5litepod": ("v5e", "default", 1), "v6e": ("v6e", "default", 1)}


def tpu_topology_args(accelerator: str) -> dict[str, Any]:
    """`get_topology_desc` arguments for a Cloud TPU accelerator type such as "v5p-256" or "v6e-256"."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", accelerator)
    if not m:
        raise ConfigError(f"--topology: {accelerator!r} is not an accelerator type like v5p-256, v6e-256, v4-128")
    prefix, chip_config, cores_per_chip = _GENERATIONS[m.group(1)]
    chips = int(m.group(2)) // cores_per_chip
    shapes = _SHAPES_3D if cores_per_chip == 2 else _SHAPES_2D
    if chips not in shapes:
        raise ConfigError(f"--topology: no {m.group(1)} slice has {chips} chips; sizes: "
                          f"{sorted(n * cores_per_chip for n in shapes)}")
    dims = [int(d) for d in shapes[chips].split("x")]
    wrap = tuple(d >= (4 if len(dims) == 3 else 16) for d in dims) + ((False,) if len(dims) == 2 else ())
    return dict(topology_name=f"{prefix}:{shapes[chips]}", chip_config_name=chip_config,
                chips_per_host_bounds=(2, 2, 1), wrap=wrap[:3])


def tpu_devices(accelerator: str, num_slices: int = 1) -> list:
    try:
        from jax.experimental.topologies import get_topology_desc  # noqa: PLC0415

        topology = get_topology_desc(platform="tpu", num_slices=num_slices, **tpu_topology_args(accelerator))
    except (RuntimeError, ValueError) as e:  # no libtpu: jax cannot describe TPU topologies
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"--topology {accelerator}: jax could not describe this TPU topology ({e}). AOT "
                          f"compilation for TPUs needs libtpu: pip install \"jax[tpu]=={jax.__version__}\"") from None
    return list(topology.devices)


def abstract_batch(cfg: RunConfig, batch_rows: jax.sharding.Sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of one global training batch, as the data pipeline makes it."""
    patching = cfg.model.patching
    if patching.mode == "entropy" and patching.threshold is None:  # shapes do not depend on the threshold
        patching = dataclasses.replace(patching, threshold=0.0)
    S = cfg.data.seq_len
    example = PatchedWindows(patching).map({"tokens": np.zeros(S + 1, np.int32),
                                            "entropies": np.zeros(S + 1, np.float32)})
    return {k: jax.ShapeDtypeStruct((cfg.data.batch_size,) + np.shape(v), np.asarray(v).dtype, sharding=batch_rows)
            for k, v in example.items()}


def compile_train_step(cfg: RunConfig, devices: Sequence[Any]) -> dict[str, Any]:
    """Lower and compile the BLT train step of `cfg` for `devices`; returns the per-device memory report."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    tx = make_optimizer(cfg.train)
    graphdef, placement = plan_train_state(cfg.model, tx, mesh, cfg.mesh.rules, cfg.mesh.min_sharded_param_bytes)
    placement.check_batch(cfg.data.batch_size)
    fns = make_step_fns("blt", graphdef, tx, cfg.train, placement=placement)
    batch = abstract_batch(cfg, placement.batch_rows)
    t0 = time.time()
    with jax.set_mesh(mesh):
        lowered = fns.train_step.lower(placement.abstract, batch)
    t1 = time.time()
    compiled = lowered.compile()
    t2 = time.time()
    mem = compiled.memory_analysis()
    report = sharding.sharding_report(placement.abstract.params, placement.params, cfg.mesh.min_sharded_param_bytes)
    state_bytes = sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                      for x, s in zip(jax.tree.leaves(placement.abstract),
                                      jax.tree.leaves(placement.state, is_leaf=lambda s: isinstance(
                                          s, jax.sharding.Sharding)), strict=True))
    gib = 2.0 ** 30
    out = {
        "preset": cfg.name, "devices": len(devices), "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape), "global_batch": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
        "compute_dtype": cfg.train.compute_dtype, "remat": cfg.train.remat,
        "params_total_gib": report.total_bytes / gib, "params_per_device_gib": report.per_device_bytes / gib,
        "train_state_per_device_gib": state_bytes / gib,
        "lower_seconds": t1 - t0, "compile_seconds": t2 - t1,
    }
    if mem is not None:
        fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                  "generated_code_size_in_bytes")
        out.update({f.replace("_size_in_bytes", "_gib"): getattr(mem, f) / gib for f in fields})
        # donated state aliases its output: live memory = arguments + outputs - aliased + temporaries
        out["peak_per_device_gib"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                      - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / gib
    return out


def run_aot(cfg: RunConfig, topology: Optional[str] = None, num_slices: Optional[int] = None,
            cpu_devices: Optional[int] = None) -> dict[str, Any]:
    """`topology` (a TPU accelerator type, in `num_slices` slices, default 1) or the local devices (CPU: as
    many as `cpu_devices` asked for). Each target's setting given with the other is refused, not ignored."""
    if topology is None and num_slices is not None:
        raise ConfigError("--num-slices: only with --topology (TPU slices); the local devices are one slice")
    if topology is not None and cpu_devices is not None:
        raise ConfigError("--local-cpu-devices: compiles for local CPU devices, --topology for a TPU slice; "
                          "give one of them")
    if topology is not None:
        devices = tpu_devices(topology, num_slices or 1)
    else:
        devices = jax.devices()
        if cpu_devices is not None and len(devices) != cpu_devices:
            raise ConfigError(f"--local-cpu-devices {cpu_devices}: this process has {len(devices)} devices (the "
                              "count is fixed when jax starts; pass --local-cpu-devices on the command line)")
    report = compile_train_step(cfg, devices)
    report["topology"] = topology or f"{len(devices)}x{devices[0].platform}"
    return report
