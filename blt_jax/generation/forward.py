"""The cache-free forward of a loaded model: patching in-forward, full logits, next-byte logits (the reference
every cached path is tested against)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from blt_jax.generation.loaded import ModelSpec
from blt_jax.model.entropy_model import entropies
from blt_jax.patching import start_flags


def compute_patch_starts(spec: ModelSpec, params: dict, tokens: jax.Array,
                         lengths: Optional[jax.Array] = None) -> jax.Array:
    """Patch starts (B, S + 1) of `tokens` (B, S) as the model patches them (entropy model run in-forward).

    `lengths` (B,): rows are right-padded prefixes of these lengths; only matters for
    `drop_trailing_patch` (transformers' rule), which concerns the byte after each row's last one."""
    patching = spec.cfg.patching
    entropy = None
    if patching.mode == "entropy":
        em = nnx.merge(spec.entropy_graphdef, params["entropy"])
        entropy = entropies(em(tokens, document_masking=spec.cfg.document_masking)[0])
    starts = start_flags(patching, tokens, entropy, spec.threshold)
    if patching.drop_trailing_patch and patching.max_patch_length is not None and lengths is not None:
        starts = starts & (jnp.arange(tokens.shape[1] + 1)[None, :] != lengths[:, None])
    return starts


def forward(spec: ModelSpec, params: dict, tokens: jax.Array, max_patches: Optional[int] = None,
            lengths: Optional[jax.Array] = None):
    """Full forward with in-forward patching: logits (B, S, V), PatchIds. `max_patches` defaults to
    S + 1, enough for any sequence, so no byte is ever dropped."""
    S = tokens.shape[1]
    starts = compute_patch_starts(spec, params, tokens, lengths)
    blt = nnx.merge(spec.graphdef, params["blt"])
    return blt(tokens, starts, max_patches=S + 1 if max_patches is None else max_patches)


def last_logits(spec: ModelSpec, params: dict, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """Next-byte logits (B, V) after each row's prefix tokens[:, :lengths]: one full forward.

    Bytes past a row's end are kept out of new patches, so the patches needed never exceed the prefix's;
    a forward sized for half the buffer's bytes runs whenever every row fits it (the common case), and one
    sized for every byte otherwise, so the result never depends on which one ran."""
    B, S = tokens.shape
    starts = compute_patch_starts(spec, params, tokens, lengths)
    starts = starts & (jnp.arange(S + 1)[None, :] <= lengths[:, None])
    blt = nnx.merge(spec.graphdef, params["blt"])
    small = max(16, (S + 1) // 2)

    def run(num_slots):
        logits, _ = blt(tokens, starts, max_patches=num_slots)
        return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]

    if small >= S + 1:
        return run(S + 1)
    needed = jnp.max(jnp.sum(starts, axis=1))
    return jax.lax.cond(needed <= small, lambda: run(small), lambda: run(S + 1))
