"""Model construction: concrete or abstract (shape-only) NNX modules, split once into (graphdef, state)."""

from __future__ import annotations

import functools
from typing import Any

import jax
from flax import nnx

from blt_jax.config import BLTConfig, EntropyModelConfig
from blt_jax.model.blt import BLT
from blt_jax.model.entropy_model import EntropyModel, entropies

__all__ = ["BLT", "EntropyModel", "entropies", "build", "abstract_state", "param_counts"]


def _construct(cfg: BLTConfig | EntropyModelConfig, seed: int):
    # Parameters carry logical axis names as metadata; placement on a mesh is done by `blt_jax.sharding`
    # through jit out_shardings, never eagerly at construction.
    with nnx.use_eager_sharding(False):
        cls = BLT if isinstance(cfg, BLTConfig) else EntropyModel
        return cls(cfg, nnx.Rngs(params=seed))


def build(cfg: BLTConfig | EntropyModelConfig, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """Initialise a model and split it once: (graphdef, params)."""
    return nnx.split(_construct(cfg, seed))


def abstract_state(cfg: BLTConfig | EntropyModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params as ShapeDtypeStructs): no memory is allocated, any size works."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: _construct(cfg, 0))
    return nnx.split(model)


def _count(state: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(state)))


def param_counts(cfg: BLTConfig | EntropyModelConfig) -> dict[str, int]:
    """Parameters per component (see `_param_counts`); cached per config, as tracing the model takes ~1 s."""
    return dict(_param_counts(cfg))


@functools.lru_cache(maxsize=64)
def _param_counts(cfg: BLTConfig | EntropyModelConfig) -> tuple[tuple[str, int], ...]:
    """Parameters per component, counted as the Fast BLT paper counts them: the encoder includes its byte
    embedding but not the hash n-gram tables (reported apart); the decoder includes the LM head; the
    global input projection, when present, belongs to the encoder side (it maps pooled patches in)."""
    _, state = abstract_state(cfg)
    if isinstance(cfg, EntropyModelConfig):
        return (("entropy_model", _count(state)),)
    flat = nnx.to_flat_state(state)
    counts = {"encoder": 0, "hash_embeddings": 0, "global": 0, "decoder": 0}
    for path, var in flat:
        top = str(path[0])
        size = int(var.size)
        if top == "local_encoder" or (top == "global_transformer" and str(path[1]) == "token_embedding_projection"):
            counts["encoder"] += size
        elif top == "encoder_hash_tok_embedding":
            counts["hash_embeddings"] += size
        elif top == "global_transformer":
            counts["global"] += size
        else:  # local_decoder, lm_head
            counts["decoder"] += size
    counts["entropy_model"] = _count(abstract_state(cfg.entropy_model)[1])
    counts["total_blt"] = counts["encoder"] + counts["hash_embeddings"] + counts["global"] + counts["decoder"]
    return tuple(counts.items())
