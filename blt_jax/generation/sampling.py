"""Choosing the next byte from logits: greedy, or temperature / top-k / top-p sampling with per-row keys."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from blt_jax.config import ConfigError
from blt_jax.tokenizer import BOE_ID, BOS_ID, BPE_ID


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    allow_specials: bool = False  # False: never emit BOE/BOS/[MASK] (EOS stays allowed)

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature: must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k: must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p: must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def restrict(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    if cfg.allow_specials:
        return logits
    banned = jnp.zeros(logits.shape[-1], bool).at[jnp.array([BOE_ID, BOS_ID, BPE_ID])].set(True)
    return jnp.where(banned, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Keep the smallest set of highest-probability ids whose mass reaches top_p (at least one)."""
    probs = jax.nn.softmax(logits, axis=-1)
    order = jnp.argsort(-probs, axis=-1)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def choose(logits: jax.Array, keys: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """logits (..., V) float32, keys (..., 2) -> ids (...) int32."""
    lead = logits.shape[:-1]
    logits = restrict(logits.reshape(-1, logits.shape[-1]).astype(jnp.float32), cfg)
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32).reshape(lead)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        logits = top_p_filter(logits, cfg.top_p)
    ids = jax.vmap(jax.random.categorical)(keys.reshape(-1, keys.shape[-1]), logits)
    return ids.astype(jnp.int32).reshape(lead)


def position_keys(rngs: jax.Array, positions: jax.Array) -> jax.Array:
    """Keys (..., 2) for choosing the byte at `positions` (B, ...) of each row, from the row's base key (B, 2).

    Keyed by position, not by step: every method (no-cache, cached, speculative, diffusion-verified) draws
    the byte at a position with the same noise, so under sampling they produce identical text whenever they
    see identical logits, and a row's randomness never depends on the other rows of its batch."""
    flat = positions.reshape(positions.shape[0], -1)
    keys = jax.vmap(lambda k, ps: jax.vmap(lambda p: jax.random.fold_in(k, p))(ps))(rngs, flat)
    return keys.reshape(positions.shape + keys.shape[-1:])
