"""Training objectives as pure functions of (model, batch, rng, ...): next-byte cross entropy for BLT and for
the entropy model, and BLT-D's next-byte + masked-diffusion objective, chosen by name (`training_objective`,
`evaluation_objective`), never by whether a random key was passed. Each returns (the scalar loss to
differentiate, statistics); the statistics always hold `nll_sum` and `bytes` (summed next-byte NLL in nats
and bytes counted), from which bits per byte follow."""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp

from blt_jax import diffusion
from blt_jax.config import choices
from blt_jax.model.blt import BLT
from blt_jax.model.entropy_model import EntropyModel

LN2 = math.log(2.0)


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-byte negative log-likelihood (nats) over `mask`, and the number of counted bytes."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def entropy_model_loss(model: EntropyModel, batch: dict, rng: jax.Array, remat: bool, dtype,
                       max_patches=None) -> tuple[jax.Array, dict]:
    logits, _ = model(batch["tokens"], remat=remat, dtype=dtype)
    nll, count = cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return nll / jnp.maximum(count, 1.0), {"nll_sum": nll, "bytes": count}


def _next_byte(logits: jax.Array, ids, batch: dict) -> tuple[jax.Array, dict]:
    """Mean next-byte NLL over trained bytes (bytes dropped by patch truncation excluded), and statistics."""
    mask = batch["loss_mask"] * ids.valid
    nll, count = cross_entropy(logits, batch["targets"], mask)
    S = batch["tokens"].shape[1]
    nonempty = jnp.sum(batch["patch_starts"][:, :S] & ids.valid)
    return nll / jnp.maximum(count, 1.0), {"nll_sum": nll, "bytes": count, "patches": nonempty.astype(jnp.float32),
                                            "dropped_bytes": jnp.sum(1.0 - ids.valid.astype(jnp.float32))}


def next_byte_loss(model: BLT, batch: dict, rng, remat: bool, dtype, max_patches=None) -> tuple[jax.Array, dict]:
    """Plain BLT: every position of the N-byte window predicts its next byte (N + 1 bytes were read). `rng` is
    unused (the objectives share one signature)."""
    logits, ids = model(batch["tokens"], batch["patch_starts"], max_patches=max_patches, remat=remat, dtype=dtype)
    return _next_byte(logits, ids, batch)


def blt_loss(model: BLT, batch: dict, rng, remat: bool, dtype, max_patches=None,
             objective: BltObjective = "next-byte") -> tuple[jax.Array, dict]:
    """A BLT's loss under an explicit `objective`: "next-byte" (plain BLT; every evaluation, BLT-D's too, so
    held-out bits/byte mean the same for both) or "blt-d" (BLT-D training; needs the step's `rng`)."""
    if objective not in BLT_OBJECTIVES:
        raise ValueError(f"objective: must be one of {BLT_OBJECTIVES}, got {objective!r}")
    return OBJECTIVES[objective](model, batch, rng, remat, dtype, max_patches)


def blt_d_loss(model: BLT, batch: dict, rng: jax.Array, remat: bool, dtype, max_patches=None) -> tuple[jax.Array, dict]:
    """BLT-D: L = L_clean + weight * L_mask from one decoder pass over [clean bytes ; corrupted blocks].

    L_clean is `blt_loss`'s next-byte value (clean queries never see block cells), so `nll_sum`/`bytes`
    keep bits/byte next-byte; L_mask and its statistics come from `blt_jax.diffusion`."""
    dc = model.cfg.diffusion
    if not dc.enabled or rng is None:
        raise ValueError("objective 'blt-d': needs a model with model.diffusion.block_size > 0 and a random key")
    tokens = batch["tokens"]
    B, N = tokens.shape
    P = model.cfg.patching.max_patches if max_patches is None else max_patches
    ctx = model.context(tokens, batch["patch_starts"], P, remat=remat, dtype=dtype)
    layout = diffusion.block_layout(tokens, batch["patch_starts"], ctx.ids.valid, dc.block_size, P)
    t_rng, mask_rng = jax.random.split(rng)
    t = diffusion.sample_t(t_rng, B, dc.t_min)
    cell_tokens, masked = diffusion.corrupt(layout, mask_rng, t)
    logits = diffusion.decode_blocks(model, ctx, layout, cell_tokens, remat)
    clean_loss, stats = _next_byte(logits[:, :N], ctx.ids, batch)
    mask_loss, mask_stats = diffusion.masked_diffusion_loss(logits[:, N:].reshape(cell_tokens.shape + (-1,)),
                                                            layout, masked, t)
    return clean_loss + dc.weight * mask_loss, {**stats, **mask_stats}


Objective = Literal["entropy", "next-byte", "blt-d"]
BltObjective = Literal["next-byte", "blt-d"]
BLT_OBJECTIVES = choices(BltObjective)
OBJECTIVES: dict[str, Any] = {"entropy": entropy_model_loss, "next-byte": next_byte_loss, "blt-d": blt_d_loss}


def training_objective(kind: str, model_cfg) -> Objective:
    """What a run of `kind` trains: the entropy model its next-byte loss; a BLT next-byte prediction, plus
    block diffusion when its config enables BLT-D (`model.diffusion.block_size` > 0)."""
    if kind == "entropy":
        return "entropy"
    return "blt-d" if model_cfg.diffusion.enabled else "next-byte"


def evaluation_objective(kind: str) -> Objective:
    """Held-out evaluation scores next-byte prediction alone, for BLT and BLT-D alike."""
    return "entropy" if kind == "entropy" else "next-byte"
