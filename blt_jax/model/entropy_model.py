"""The entropy model: a small causal byte LM whose next-byte entropy decides patch boundaries."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from blt_jax.config import EntropyModelConfig
from blt_jax.model.attention import CachedMask, self_attention_mask
from blt_jax.model.layers import Block, Embed, Linear, RMSNorm, run_layers
from blt_jax.tokenizer import BOS_ID


class EntropyModel(nnx.Module):
    """transformers' `BltPatcher` layout: embed_tokens -> layers -> norm -> lm_head."""

    def __init__(self, cfg: EntropyModelConfig, rngs: nnx.Rngs):
        s = cfg.stack
        self.cfg = cfg
        self.embed_tokens = Embed(cfg.vocab_size, s.dim, ("vocab", "embed"), rngs)
        self.layers = nnx.List([Block(s, rngs) for _ in range(s.n_layers)])
        self.norm = RMSNorm(s.dim, s.norm_eps)
        self.lm_head = Linear(s.dim, cfg.vocab_size, ("embed", "vocab"), rngs)

    def __call__(self, tokens: jax.Array, positions: Optional[jax.Array] = None, caches: Optional[list] = None,
                 mask: Optional[CachedMask] = None, document_masking: bool = True, remat: bool = False,
                 dtype=jnp.float32):
        """Logits (B, T, V) in float32. Without caches: a full causal pass over `tokens` (documents never
        attend each other). With caches: `tokens` is a chunk at `positions` meeting them under `mask`."""
        B, T = tokens.shape
        contiguous = positions is None
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T)[None, :], (B, T))
        window = self.cfg.stack.window
        if caches is None:
            seg = jnp.cumsum(tokens == BOS_ID, axis=1) if document_masking else None
            mask = self_attention_mask(positions, window, seg, contiguous=contiguous)
        h = self.embed_tokens(tokens, dtype)
        h, caches = run_layers(self.layers, self.cfg.stack, h, positions, mask, caches, remat)
        logits = self.lm_head(self.norm(h)).astype(jnp.float32)
        return logits, caches


def entropies(logits: jax.Array) -> jax.Array:
    """Natural-log entropy of each predicted next-byte distribution (B, T)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
