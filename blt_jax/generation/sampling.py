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
    """logits (B, V) float32, keys (B, 2) -> ids (B,) int32."""
    logits = restrict(logits.astype(jnp.float32), cfg)
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        logits = top_p_filter(logits, cfg.top_p)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def row_keys(rngs: jax.Array, step: jax.Array) -> jax.Array:
    """Per-row keys (B, 2) for one step, from each row's own base key: a row's randomness depends on its
    seed and step only, never on the other rows of the batch."""
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(rngs)
