"""A trained BLT ready for generation: its static spec, its parameters (BLT + entropy model), and loading."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from blt_jax import model as model_lib
from blt_jax.config import BLTConfig, ConfigError


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

    def all_params(self) -> dict:
        """The explicit state every jitted sampler takes."""
        return {"blt": self.params, "entropy": self.entropy_params}

    def astype(self, dtype) -> "LoadedModel":
        """The model with its floating-point weights cast (once) to `dtype`: generation then computes and keeps
        its caches in that dtype (RMSNorm, RoPE, softmax and logits stay float32)."""
        from blt_jax.model.layers import cast_floating  # noqa: PLC0415

        cast = lambda p: None if p is None else cast_floating(p, jnp.dtype(dtype))  # noqa: E731
        return dataclasses.replace(self, params=cast(self.params), entropy_params=cast(self.entropy_params))


def from_params(cfg: BLTConfig, params: Any, entropy_params: Any = None) -> LoadedModel:
    graphdef, _ = model_lib.abstract_state(cfg)
    egd = model_lib.abstract_state(cfg.entropy_model)[0] if cfg.patching.mode == "entropy" else None
    if cfg.patching.mode == "entropy" and (entropy_params is None or cfg.patching.threshold is None):
        raise ConfigError("model.patching: entropy patching needs the entropy model's parameters and a threshold")
    return LoadedModel(ModelSpec(cfg, graphdef, egd, cfg.patching.threshold), params, entropy_params)


def load_run(run_dir: str | Path, step: Optional[int] = None) -> LoadedModel:
    """A trained BLT run directory (or a converted checkpoint) -> LoadedModel."""
    from blt_jax.train import checkpoint as ckpt  # noqa: PLC0415

    kind, cfg, _ = ckpt.load_run_config(run_dir)
    if kind != "blt":
        # load_run serves generate, eval, convert and serve: name what the run is, not one command's need
        raise ConfigError(f"{run_dir}: holds an {kind!r} run, not a BLT run (the one `blt train --what blt` makes)")
    params = ckpt.load_trained_params(run_dir, expect_kind="blt", step=step)
    entropy_params = None
    if cfg.model.patching.mode == "entropy":
        abstract = model_lib.abstract_state(cfg.model.entropy_model)[1]
        entropy_params = ckpt.load_params(Path(run_dir) / "entropy_model", abstract)
    return from_params(cfg.model, params, entropy_params)
