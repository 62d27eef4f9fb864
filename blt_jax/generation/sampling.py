"""Choosing the next byte from logits: greedy, or temperature / top-k / top-p sampling, with settings per row
(so rows of one batch may sample differently) and randomness keyed by position."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from blt_jax.config import ConfigError
from blt_jax.generation import constants
from blt_jax.tokenizer import BOE_ID, BOS_ID, BPE_ID


# sampling runs in float32: a temperature above its range would become inf and a top_p below its smallest
# normal number 0, and either samples from garbage
_F32_MAX, _F32_TINY = float(np.finfo(np.float32).max), float(np.finfo(np.float32).tiny)


TEMPERATURE_RULE = f"must be a finite number >= 0 (and <= {_F32_MAX:.3g}, float32's largest)"
TOP_P_RULE = f"must lie in (0, 1] (and be >= {_F32_TINY:.3g}, float32's smallest normal number)"


def temperature_ok(t: float) -> bool:
    return math.isfinite(t) and 0 <= t <= _F32_MAX


def top_p_ok(p: float) -> bool:
    return math.isfinite(p) and _F32_TINY <= p <= 1.0


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = constants.TEMPERATURE  # 0: greedy
    top_k: int = constants.TOP_K  # 0: off
    top_p: float = constants.TOP_P  # 1: off
    allow_specials: bool = False  # False: never emit BOE/BOS/[MASK] (EOS stays allowed)

    def __post_init__(self):
        if not temperature_ok(self.temperature):
            raise ConfigError(f"sampling.temperature: {TEMPERATURE_RULE}, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k: must be >= 0, got {self.top_k}")
        if not top_p_ok(self.top_p):
            raise ConfigError(f"sampling.top_p: {TOP_P_RULE}, got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@flax.struct.dataclass
class SamplingRows:
    """Per-row sampling settings as arrays (B,): traced, so rows with different settings share one compile.
    A row with temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def of(cls, configs: Sequence[SamplingConfig]) -> "SamplingRows":
        return cls(np.asarray([c.temperature for c in configs], np.float32),
                   np.asarray([c.top_k for c in configs], np.int32),
                   np.asarray([c.top_p for c in configs], np.float32))


def rows_for(configs: Sequence[SamplingConfig]) -> Optional[SamplingRows]:
    """The traced per-row settings of a batch; None when every row is greedy (the sampler then compiles to a
    plain argmax). Rows must agree on `allow_specials` (a static choice)."""
    if len({c.allow_specials for c in configs}) > 1:
        raise ConfigError("sampling.allow_specials: must be the same for every row of a batch")
    if all(c.greedy for c in configs):
        return None
    return SamplingRows.of(configs)


def restrict(logits: jax.Array, allow_specials: bool) -> jax.Array:
    if allow_specials:
        return logits
    banned = jnp.zeros(logits.shape[-1], bool).at[jnp.array([BOE_ID, BOS_ID, BPE_ID])].set(True)
    return jnp.where(banned, -jnp.inf, logits)


def _per_position(x: jax.Array, lead: tuple) -> jax.Array:
    """A per-row setting (B,) broadcast over the extra leading dims of (B, ...) logits, flattened."""
    return jnp.broadcast_to(x.reshape(x.shape + (1,) * (len(lead) - 1)), lead).reshape(-1)


def _filter(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k, then top-p (the smallest set of highest-probability ids whose mass reaches top_p, at least one),
    per row; off where top_k == 0 / top_p >= 1."""
    V = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    kth = jnp.take_along_axis(sorted_logits, jnp.clip(top_k - 1, 0, V - 1)[:, None], axis=-1)
    keep_sorted = (top_k[:, None] == 0) | (sorted_logits >= kth)
    sorted_logits = jnp.where(keep_sorted, sorted_logits, -jnp.inf)
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = keep_sorted & ((top_p[:, None] >= 1.0) | (mass_before < top_p[:, None]))
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def choose(logits: jax.Array, keys: jax.Array, rows: Optional[SamplingRows], allow_specials: bool = False
           ) -> jax.Array:
    """logits (B, ..., V) float32, keys (B, ..., 2), per-row settings (B,) or None (all greedy) -> ids (B, ...)."""
    lead = logits.shape[:-1]
    flat = restrict(logits.reshape(-1, logits.shape[-1]).astype(jnp.float32), allow_specials)
    greedy = jnp.argmax(flat, axis=-1).astype(jnp.int32)
    if rows is None:
        return greedy.reshape(lead)
    temperature = _per_position(rows.temperature, lead)
    scaled = flat / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    filtered = _filter(scaled, _per_position(rows.top_k, lead), _per_position(rows.top_p, lead))
    sampled = jax.vmap(jax.random.categorical)(keys.reshape(-1, keys.shape[-1]), filtered).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy).reshape(lead)


def position_keys(row_keys: jax.Array, positions: jax.Array) -> jax.Array:
    """Keys (..., 2) for choosing the byte at `positions` (B, ...) of each row, from the row's key data (B, 2).

    Keyed by position, not by step: every method (no-cache, cached, speculative, diffusion-verified) draws
    the byte at a position with the same noise, so under sampling they produce identical text whenever they
    see identical logits, and a row's randomness never depends on the other rows of its batch."""
    flat = positions.reshape(positions.shape[0], -1)
    keys = jax.vmap(lambda k, ps: jax.vmap(lambda p: jax.random.fold_in(k, p))(ps))(row_keys, flat)
    return keys.reshape(positions.shape + keys.shape[-1:])


def row_keys(seed: int, rows: int, first_row: int = 0) -> np.ndarray:
    """(rows, 2) uint32 key data: row i of a request gets fold_in(key(seed), first_row + i)."""
    base = jax.random.key_data(jax.random.key(seed))
    return np.asarray(jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(first_row, first_row + rows)))
