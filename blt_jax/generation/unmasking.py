"""BLT-D unmasking rules (Fast BLT §3.1.2): which masked cells of a block to commit after a decoder pass.

Both rules commit at least one cell per pass, so a block of B cells takes at most B passes.
- confidence (Ghazvininejad et al. 2019): commit every masked cell whose top probability exceeds alpha; if
  none does, the single most confident one.
- entropy-bounded (Ben-Hamu et al. 2025): sort masked cells by predictive entropy, commit the longest prefix
  whose cumulative entropy is <= gamma (the paper's wording; the original EB paper bounds sum - max), and
  at least the lowest-entropy cell.
- one-step: commit every cell in one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp

from blt_jax.config import ConfigError
from blt_jax.generation import constants

Rule = Literal["confidence", "entropy", "one_step"]


@dataclass(frozen=True)
class UnmaskConfig:
    rule: Rule = constants.UNMASK_RULE
    alpha: float = constants.ALPHA
    gamma: float = constants.GAMMA

    def __post_init__(self):
        if self.rule not in ("confidence", "entropy", "one_step"):
            raise ConfigError(f"unmask.rule: must be 'confidence', 'entropy' or 'one_step', got {self.rule!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"unmask.alpha: must lie in [0, 1], got {self.alpha}")
        if not (math.isfinite(self.gamma) and self.gamma >= 0.0):
            raise ConfigError(f"unmask.gamma: must be a finite number >= 0, got {self.gamma}")


def cells_to_commit(logits: jax.Array, masked: jax.Array, cfg: UnmaskConfig) -> jax.Array:
    """logits (B, Bk, V), masked (B, Bk) bool -> commit (B, Bk) bool, a subset of `masked`, non-empty on
    every row that has a masked cell."""
    if cfg.rule == "one_step":
        return masked
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if cfg.rule == "confidence":
        score = jnp.max(jnp.exp(logp), axis=-1)  # higher is better
        chosen = masked & (score > cfg.alpha)
    else:
        ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        score = -ent
        order = jnp.argsort(jnp.where(masked, ent, jnp.inf), axis=-1)  # ascending entropy, masked first
        sorted_ent = jnp.take_along_axis(jnp.where(masked, ent, 0.0), order, axis=-1)
        keep_sorted = (jnp.cumsum(sorted_ent, axis=-1) <= cfg.gamma) & jnp.take_along_axis(masked, order, axis=-1)
        chosen = jnp.zeros_like(masked).at[jnp.arange(masked.shape[0])[:, None], order].set(keep_sorted)
    best = jnp.argmax(jnp.where(masked, score, -jnp.inf), axis=-1)
    fallback = jax.nn.one_hot(best, masked.shape[1], dtype=bool) & masked
    return jnp.where(jnp.any(chosen, axis=-1, keepdims=True), chosen, fallback)
