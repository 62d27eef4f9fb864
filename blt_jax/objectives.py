"""Training objectives as pure functions of (model, batch, rng): next-byte cross entropy for BLT and for
the entropy model. Each returns (the scalar loss to differentiate, statistics); the statistics always hold
`nll_sum` and `bytes` (summed next-byte NLL in nats and bytes counted), from which bits per byte follow."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

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


def blt_loss(model: BLT, batch: dict, rng: jax.Array, remat: bool, dtype, max_patches=None) -> tuple[jax.Array, dict]:
    """Every position of the N-byte window predicts its next byte (N + 1 bytes were read)."""
    logits, ids = model(batch["tokens"], batch["patch_starts"], max_patches=max_patches, remat=remat, dtype=dtype)
    mask = batch["loss_mask"] * ids.valid
    nll, count = cross_entropy(logits, batch["targets"], mask)
    S = batch["tokens"].shape[1]
    nonempty = jnp.sum(batch["patch_starts"][:, :S] & ids.valid)
    return nll / jnp.maximum(count, 1.0), {"nll_sum": nll, "bytes": count, "patches": nonempty.astype(jnp.float32),
                                            "dropped_bytes": jnp.sum(1.0 - ids.valid.astype(jnp.float32))}


LOSSES: dict[str, Any] = {"entropy": entropy_model_loss, "blt": blt_loss}
