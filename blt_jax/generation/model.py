"""A trained BLT ready for generation: its config, graphdefs and parameters (BLT + entropy model)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from blt_jax import model as model_lib, sharding
from blt_jax.config import BLTConfig, ConfigError, MeshConfig
from blt_jax.model.entropy_model import entropies
from blt_jax.patching import start_flags


@dataclass(frozen=True)
class ModelSpec:
    """The static (hashable) half of a loaded model: passed as a static argument to jitted samplers."""

    cfg: BLTConfig
    graphdef: nnx.GraphDef
    entropy_graphdef: Optional[nnx.GraphDef]
    threshold: Optional[float]
    # logical-axis rules of the mesh the parameters live on (empty: one device); samplers constrain by them
    sharding_rules: tuple = ()


@dataclass
class LoadedModel:
    spec: ModelSpec
    params: Any
    entropy_params: Any  # None unless entropy patching
    mesh: Optional[jax.sharding.Mesh] = None  # set by `on_mesh`: generation splits batches over it

    @property
    def cfg(self) -> BLTConfig:
        return self.spec.cfg

    def pytrees(self) -> dict:
        """The explicit state every jitted sampler takes."""
        return {"blt": self.params, "entropy": self.entropy_params}


def from_params(cfg: BLTConfig, params: Any, entropy_params: Any = None) -> LoadedModel:
    graphdef, _ = model_lib.abstract_state(cfg)
    egd = model_lib.abstract_state(cfg.entropy_model)[0] if cfg.patching.mode == "entropy" else None
    if cfg.patching.mode == "entropy" and (entropy_params is None or cfg.patching.threshold is None):
        raise ConfigError("model.patching: entropy patching needs the entropy model's parameters and a threshold")
    return LoadedModel(ModelSpec(cfg, graphdef, egd, cfg.patching.threshold), params, entropy_params)


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


def load_run(run_dir: str | Path, step: Optional[int] = None) -> LoadedModel:
    """A trained BLT run directory (or a converted checkpoint) -> LoadedModel."""
    from blt_jax.train import checkpoint as ckpt  # noqa: PLC0415

    kind, cfg, _ = ckpt.load_run_config(run_dir)
    if kind != "blt":
        raise ConfigError(f"{run_dir}: holds a {kind!r} run; generation needs a BLT run")
    params = ckpt.load_trained_params(run_dir, expect_kind="blt", step=step)
    entropy_params = None
    if cfg.model.patching.mode == "entropy":
        abstract = model_lib.abstract_state(cfg.model.entropy_model)[1]
        entropy_params = ckpt.load_params(Path(run_dir) / "entropy_model", abstract)
    return from_params(cfg.model, params, entropy_params)


def compute_patch_starts(spec: ModelSpec, pytrees: dict, tokens: jax.Array,
                         lengths: Optional[jax.Array] = None) -> jax.Array:
    """Patch starts (B, S + 1) of `tokens` (B, S) as the model patches them (entropy model run in-forward).

    `lengths` (B,): rows are right-padded prefixes of these lengths; only matters for
    `drop_trailing_patch` (transformers' rule), which concerns the byte after each row's last one."""
    patching = spec.cfg.patching
    entropy = None
    if patching.mode == "entropy":
        em = nnx.merge(spec.entropy_graphdef, pytrees["entropy"])
        entropy = entropies(em(tokens, document_masking=spec.cfg.document_masking)[0])
    starts = start_flags(patching, tokens, entropy, spec.threshold)
    if patching.drop_trailing_patch and patching.max_patch_length is not None and lengths is not None:
        starts = starts & (jnp.arange(tokens.shape[1] + 1)[None, :] != lengths[:, None])
    return starts


def forward(spec: ModelSpec, pytrees: dict, tokens: jax.Array, max_patches: Optional[int] = None,
            lengths: Optional[jax.Array] = None):
    """Full forward with in-forward patching: logits (B, S, V), PatchIds. `max_patches` defaults to
    S + 1, enough for any sequence, so no byte is ever dropped."""
    S = tokens.shape[1]
    starts = compute_patch_starts(spec, pytrees, tokens, lengths)
    blt = nnx.merge(spec.graphdef, pytrees["blt"])
    return blt(tokens, starts, max_patches=S + 1 if max_patches is None else max_patches)


def last_logits(spec: ModelSpec, pytrees: dict, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """Next-byte logits (B, V) after each row's prefix tokens[:, :lengths]: one full forward.

    Bytes past a row's end are kept out of new patches, so the patches needed never exceed the prefix's;
    a forward sized for half the buffer's bytes runs whenever every row fits it (the common case), and one
    sized for every byte otherwise, so the result never depends on which one ran."""
    B, S = tokens.shape
    starts = compute_patch_starts(spec, pytrees, tokens, lengths)
    starts = starts & (jnp.arange(S + 1)[None, :] <= lengths[:, None])
    blt = nnx.merge(spec.graphdef, pytrees["blt"])
    small = max(16, (S + 1) // 2)

    def run(num_slots):
        logits, _ = blt(tokens, starts, max_patches=num_slots)
        return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]

    if small >= S + 1:
        return run(S + 1)
    needed = jnp.max(jnp.sum(starts, axis=1))
    return jax.lax.cond(needed <= small, lambda: run(small), lambda: run(S + 1))
