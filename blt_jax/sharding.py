"""Device meshes and logical-axis sharding.

Parameters carry logical axis names (`out_sharding` metadata, see `blt_jax.model.layers`); activations name
theirs through `constrain`. `MeshConfig.logical_axis_rules` maps each name onto the mesh axes
(data, fsdp, tensor). Meshes use `AxisType.Auto`: parameters and batches are placed by shardings and the
compiler propagates them through the model, with `constrain` pinning activations at layer boundaries.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from blt_jax.config import MESH_AXES, ConfigError, MeshConfig

Rules = dict[str, tuple[str, ...]]


# ---- the mesh ---------------------------------------------------------------------------------------------

def _fill(shape: Sequence[int], total: int, name: str) -> tuple[int, ...]:
    """Resolve one -1 entry so that the product is `total`."""
    known = math.prod(n for n in shape if n != -1)
    if -1 in shape:
        if total % known:
            raise ConfigError(
                f"{name}: {list(shape)} cannot tile {total} devices ({total} is not a multiple of {known})")
        shape = tuple(total // known if n == -1 else n for n in shape)
    if math.prod(shape) != total:
        raise ConfigError(f"{name}: {list(shape)} holds {math.prod(shape)} devices, but there are {total}")
    return tuple(shape)


def num_slices(devices: Sequence[Any]) -> int:
    """TPU slices among `devices` (devices report `slice_index`); elsewhere each process counts as one."""
    if all(getattr(d, "slice_index", None) is not None for d in devices):
        return len({d.slice_index for d in devices})
    return len({d.process_index for d in devices})


def mesh_shape(cfg: MeshConfig, devices: Sequence[Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ici, dcn) shapes with -1 filled in for these devices."""
    slices = math.prod(n for n in cfg.dcn_parallelism if n != -1) if -1 not in cfg.dcn_parallelism else None
    dcn = _fill(cfg.dcn_parallelism, slices or num_slices(devices), "mesh.dcn_parallelism")
    n_slices = math.prod(dcn)
    if len(devices) % n_slices:
        raise ConfigError(f"mesh.dcn_parallelism: {len(devices)} devices do not split into {n_slices} slices")
    ici = _fill(cfg.ici_parallelism, len(devices) // n_slices, "mesh.ici_parallelism")
    return ici, dcn


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    With dcn_parallelism > 1 the outer (slower) network axis is laid over slices: TPU slices, or processes
    on CPU/GPU, so that what crosses the slow links is only what the dcn axes need.
    """
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = mesh_shape(cfg, devices)
    if math.prod(dcn) > 1:
        by_slice = all(getattr(d, "slice_index", None) is not None for d in devices)
        if not by_slice and num_slices(devices) != math.prod(dcn):
            raise ConfigError(f"mesh.dcn_parallelism: {list(dcn)} needs {math.prod(dcn)} slices, but these devices "
                              f"belong to {num_slices(devices)} process(es)")
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not by_slice,
                                                    allow_split_physical_axes=True)
    elif devices[0].platform == "tpu":
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:  # CPU / GPU: process-major device order keeps each process's batch rows contiguous
        grid = np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id)), dtype=object).reshape(ici)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ---- logical names -> partition specs ---------------------------------------------------------------------

def logical_to_spec(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """The PartitionSpec for an array of `shape` whose dimensions carry logical `names`.

    Each dimension takes the mesh axes its name maps to, in order, skipping an axis that an earlier dimension
    already uses, that has size 1, or that would split the dimension unevenly.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    parts = []
    for dim, name in zip(shape, names, strict=True):
        if name is None:
            parts.append(None)
            continue
        if name not in rules:
            raise ConfigError(f"mesh.logical_axis_rules: no rule for the logical axis {name!r}")
        axes: list[str] = []
        for axis in rules[name]:
            size = mesh.shape[axis]
            if axis in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in axes) * size):
                continue
            axes.append(axis)
        used.update(axes)
        parts.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return P(*parts)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple((x.get_value() if _is_variable(x) else x).shape)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a pytree whose nnx Variables (parameters, and the optimiser moments that mirror
    them) carry logical axis names; every other leaf (step counters) is replicated."""

    def one(x):
        names = x.get_metadata().get("out_sharding") if _is_variable(x) else None
        if names is None:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, logical_to_spec(names, _shape(x), mesh, rules))

    return jax.tree.map(one, tree, is_leaf=_is_variable)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (orbax restores onto them, resharding as needed)."""
    leaves, treedef = jax.tree.flatten(abstract)  # one array per nnx Variable, in the same order
    targets = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    if len(leaves) != len(targets):
        raise ValueError(f"{len(targets)} shardings for {len(leaves)} arrays")
    return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                              for x, s in zip(leaves, targets, strict=True)])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh, rules: Rules) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that batch rows are split over."""
    return tuple(a for a in rules.get("batch", ()) if mesh.shape[a] > 1)


def batch_devices(mesh: Mesh, rules: Rules) -> int:
    """How many ways a batch is split: its row count must be a multiple of this."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def batch_sharding(mesh: Mesh, rules: Rules, shape: Optional[Sequence[int]] = None,
                   what: str = "the batch") -> NamedSharding:
    """Rows (dim 0) split over the batch axes. Given a `shape`, one whose rows they do not divide is refused
    (never silently replicated)."""
    n = batch_devices(mesh, rules)
    if shape is not None and shape[0] % n:
        raise ConfigError(f"{what}: {shape[0]} rows cannot be split evenly over the batch mesh axes "
                          f"{rules.get('batch')} ({n} devices); use a multiple of {n}")
    return NamedSharding(mesh, P(batch_axes(mesh, rules) or None))


# ---- the replicated-parameter check -----------------------------------------------------------------------

@dataclass(frozen=True)
class ShardingReport:
    devices: int
    total_bytes: int
    per_device_bytes: int  # of the largest device shard sum
    replicated: tuple[tuple[str, int], ...]  # large parameters stored whole on every device: (path, bytes)

    def summary(self) -> str:
        return (f"{self.total_bytes / 2**20:.1f} MiB of parameters, {self.per_device_bytes / 2**20:.1f} MiB per "
                f"device on {self.devices} devices")


def sharding_report(abstract_params: Any, shardings: Any, min_bytes: int) -> ShardingReport:
    leaves = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    shard_leaves = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
    total = per_device = 0
    replicated_large = []
    devices = 1
    for (path, leaf), sharding in zip(leaves, shard_leaves, strict=True):
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        shard = sharding.shard_shape(leaf.shape)
        total += nbytes
        per_device += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
        devices = sharding.mesh.size
        if nbytes >= min_bytes and tuple(shard) == tuple(leaf.shape):
            replicated_large.append((jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value"),
                                     nbytes))
    return ShardingReport(devices, total, per_device, tuple(replicated_large))


def check_params_sharded(abstract_params: Any, shardings: Any, min_bytes: int) -> ShardingReport:
    """Fail when a parameter of at least `min_bytes` would be stored whole on every device of a multi-device
    mesh (a rule that does not apply, or a dimension the mesh axis does not divide)."""
    report = sharding_report(abstract_params, shardings, min_bytes)
    if report.devices > 1 and report.replicated:
        listed = ", ".join(f"{p} ({b / 2**20:.1f} MiB)" for p, b in report.replicated[:5])
        more = f" and {len(report.replicated) - 5} more" if len(report.replicated) > 5 else ""
        raise ConfigError(f"mesh.logical_axis_rules: {len(report.replicated)} large parameter(s) would be replicated "
                          f"on all {report.devices} devices: {listed}{more}. Map their axes to a mesh axis that "
                          f"divides them, or raise mesh.min_sharded_param_bytes")
    return report


# ---- activations ------------------------------------------------------------------------------------------

_ACTIVE_RULES: contextvars.ContextVar[Optional[Rules]] = contextvars.ContextVar("blt_sharding_rules", default=None)


@contextlib.contextmanager
def activation_rules(rules: Optional[Rules | Sequence[tuple[str, tuple[str, ...]]]]) -> Iterator[None]:
    """Entered *inside* a traced function (whose jit cache therefore keys on the rules through its closure
    or static arguments): `constrain` maps logical names with `rules` onto the mesh set by `jax.set_mesh`."""
    token = _ACTIVE_RULES.set(dict(rules) if rules else None)
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """Pin an activation's sharding by logical names; a no-op without rules or a multi-device mesh."""
    rules = _ACTIVE_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))


def constrain_batch(tree: Any) -> Any:
    """Split every leaf of `tree` over the batch axes along its leading dimension (generation state, caches)."""
    return jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)) if x.ndim else x, tree)
