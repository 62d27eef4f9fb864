"""Placing a loaded model's parameters on a device mesh, and how many devices a generation batch splits over."""

from __future__ import annotations

import dataclasses

import jax

from blt_jax import sharding
from blt_jax.config import MeshConfig
from blt_jax.generation.loaded import LoadedModel


def on_mesh(model: LoadedModel, mesh: jax.sharding.Mesh, mesh_cfg: MeshConfig = MeshConfig()) -> LoadedModel:
    """The model with its parameters split over `mesh` by their logical axes; generation then splits prompt
    batches (and with them every cache) over the batch axes."""
    rules = mesh_cfg.rules

    def place(params):
        return None if params is None else jax.device_put(params, sharding.tree_shardings(params, mesh, rules))

    spec = dataclasses.replace(model.spec, sharding_rules=tuple(mesh_cfg.logical_axis_rules))
    return LoadedModel(spec, place(model.params), place(model.entropy_params), mesh)


def batch_devices(model: LoadedModel) -> int:
    """Devices a generation batch is split over (1 without a mesh)."""
    if model.mesh is None:
        return 1
    return sharding.batch_devices(model.mesh, dict(model.spec.sharding_rules))
