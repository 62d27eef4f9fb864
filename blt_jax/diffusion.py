"""BLT-D training (Fast BLT §3.2; docs/fast-blt.md §1): the block layout, its corruption, the decoder pass
over [clean bytes ; blocks] and the masked-diffusion loss term, plus an inference-layout evaluator that
decodes every block the way generation does, to catch label leaks. Pure functions with static shapes.

Layout. Every patch i >= 1 (patch 0 is the BOS byte) owns a block of B cells at the original positions
s_i .. s_i + B - 1 (s_i: the patch's first byte), whose targets are the clean bytes there; cells past the
window, past the last kept patch, or of patch slots that don't exist are [PAD] (no target). Cells of the
block of patch i cross-attend latent i - 1, the last one the global model built from bytes < s_i.

Decisions the paper leaves open (docs/fast-blt.md §4):
- A cell enters the decoder as the local encoder's byte embedding (`local_encoder.embed_tokens`) of its
  token ([MASK], the visible byte, or [PAD]): no hash n-grams and no encoder layers, because the encoder and
  the global model see only the clean window. Generation embeds its [MASK]/committed cells the same way.
- t ~ U(t_min, 1) per example (not fed to the network). Clipping at t_min bounds the 1/t weight.
- The masked term is normalised per cell, LLaDA/Dream style: sum over examples of (1/t) x the masked
  cells' cross entropy, divided by the batch's non-[PAD] cells. Its expectation over the masking is the
  mean cross entropy of a cell given a uniformly random corruption, on the same per-byte scale as L_clean.
- A block sees the clean bytes of the document of byte s_i - 1 (the prefix's document), so what a block
  attends depends on bytes < s_i only; a block may run on into the next document.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from blt_jax.model.blt import BLT, WindowContext
from blt_jax.model.attention import BlockDiffusionMask, causal_mask
from blt_jax.tokenizer import BLOCK_PAD_ID, BOE_ID, MASK_ID

Array = jax.Array


@flax.struct.dataclass
class BlockLayout:
    """Static-shaped blocks of one batch: nb = max_patches - 1 block slots of B cells; slot j is patch j + 1."""

    starts: Array  # (B, nb) s_i; N for a slot with no block (no such patch, or the trailing empty patch)
    positions: Array  # (B, nb, Bk) s_i + k: the cells' RoPE positions
    targets: Array  # (B, nb, Bk) the clean byte at each cell; BLOCK_PAD_ID where there is none
    live: Array  # (B, nb, Bk) the cell has a target (is not [PAD])

    @property
    def cross_ids(self) -> Array:
        """(B, nb, Bk) latent read by each cell: i - 1 for the block of patch i, i.e. the slot index."""
        B, nb, Bk = self.live.shape
        return jnp.broadcast_to(jnp.arange(nb)[None, :, None], (B, nb, Bk))


def block_layout(tokens: Array, patch_starts: Array, valid: Array, block_size: int, max_patches: int) -> BlockLayout:
    """Blocks of a window: tokens (B, N); patch_starts (B, N + 1); valid (B, N): byte in a kept patch."""
    B, N = tokens.shape
    first = jax.vmap(lambda s: jnp.nonzero(s, size=max_patches, fill_value=N)[0])(patch_starts[:, :N])
    starts = first[:, 1:].astype(jnp.int32)  # kept patches only: the first max_patches starts
    positions = starts[:, :, None] + jnp.arange(block_size, dtype=jnp.int32)[None, None, :]
    flat = jnp.minimum(positions, N - 1).reshape(B, -1)
    live = (positions < N) & jnp.take_along_axis(valid, flat, axis=1).reshape(positions.shape)
    targets = jnp.where(live, jnp.take_along_axis(tokens, flat, axis=1).reshape(positions.shape), BLOCK_PAD_ID)
    return BlockLayout(starts=starts, positions=positions, targets=targets, live=live)


def sample_t(rng: Array, batch: int, t_min: float) -> Array:
    """Per-example masking rate t ~ U(t_min, 1)."""
    return jax.random.uniform(rng, (batch,), minval=t_min, maxval=1.0)


def corrupt(layout: BlockLayout, rng: Array, t: Array) -> tuple[Array, Array]:
    """Mask each non-[PAD] cell independently with probability t (B,): (cell tokens, masked) (B, nb, Bk)."""
    masked = layout.live & (jax.random.uniform(rng, layout.live.shape) < t[:, None, None])
    return jnp.where(masked, MASK_ID, layout.targets), masked


def block_mask(layout: BlockLayout, segments: Optional[Array], window: Optional[int]) -> BlockDiffusionMask:
    """The decoder's self-attention spec for [clean ; blocks] (rules in `BlockDiffusionMask`)."""
    return BlockDiffusionMask(positions=layout.positions, segments=segments, window=window)


def decode_blocks(model: BLT, ctx: WindowContext, layout: BlockLayout, cell_tokens: Array,
                  remat: bool = False) -> Array:
    """One decoder pass over [N clean byte states ; nb * Bk cells]: logits (B, N + nb * Bk, V).

    The first N logits equal plain BLT's (clean queries never see cells)."""
    B, nb, Bk = cell_tokens.shape
    cells = model.local_encoder.embed_tokens(cell_tokens.reshape(B, nb * Bk), ctx.h.dtype)
    h = jnp.concatenate([ctx.h, cells], axis=1)
    positions = jnp.concatenate([ctx.positions, layout.positions.reshape(B, -1)], axis=1)
    cross_ids = jnp.concatenate([ctx.ids.decoder_ids, layout.cross_ids.reshape(B, -1)], axis=1)
    mask = block_mask(layout, ctx.segments, model.cfg.decoder.window)
    logits, _ = model.decode(h, positions, ctx.cross_kv, cross_ids, mask=mask, remat=remat)
    return logits


def masked_accuracy(cell_logits: Array, layout: BlockLayout, masked: Array) -> tuple[Array, Array]:
    """(argmax-correct masked cells, masked cells); cell_logits (B, nb, Bk, V)."""
    correct = (jnp.argmax(cell_logits, axis=-1) == layout.targets) & masked
    return jnp.sum(correct), jnp.sum(masked)


def masked_diffusion_loss(cell_logits: Array, layout: BlockLayout, masked: Array, t: Array) -> tuple[Array, dict]:
    """L_mask = sum_e (1 / t_e) sum_{masked cells of e} CE / (non-[PAD] cells in the batch), and its statistics.

    cell_logits (B, nb, Bk, V); masked (B, nb, Bk); t (B,)."""
    logp = jax.nn.log_softmax(cell_logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, layout.targets[..., None], axis=-1)[..., 0]
    weighted = jnp.sum(jnp.where(masked, nll, 0.0).sum(axis=(1, 2)) / t)
    cells = jnp.sum(layout.live).astype(jnp.float32)
    loss = weighted / jnp.maximum(cells, 1.0)
    correct, count = masked_accuracy(cell_logits, layout, masked)
    count = count.astype(jnp.float32)
    return loss, {"log_diffusion_loss": loss, "log_masked_accuracy": correct / jnp.maximum(count, 1.0),
                  "log_mask_rate": count / jnp.maximum(cells, 1.0)}


def inference_layout_logits(model: BLT, tokens: Array, patch_starts: Array, layout: BlockLayout,
                            cell_tokens: Array, max_patches: int, dtype=jnp.float32) -> Array:
    """Logits (B, nb, Bk, V) of every block decoded as generation decodes it (Algorithm 1), one block at a time.

    For the block of patch i: the window truncated at s_i (bytes >= s_i erased; the encoder and global model
    are causal, so that is the truncation with static shapes) is encoded and patched as before; the block's
    cells follow it at positions s_i .., cross-attend latent i - 1 (the last prefix patch), and attend the
    whole prefix (window, document) and the block. Built apart from the training layout (its own dense mask,
    no block gather, no suffix bytes at all), so a label leak there shows as a gap between the two accuracies.
    """
    B, N = tokens.shape
    _, nb, Bk = layout.positions.shape
    W = model.cfg.decoder.window
    pos = jnp.arange(N)

    def block(j):
        s = layout.starts[:, j]  # (B,)
        prefix = pos[None, :] < s[:, None]
        ctx = model.context(jnp.where(prefix, tokens, BOE_ID),
                            patch_starts & (jnp.arange(N + 1)[None, :] <= s[:, None]), max_patches, dtype=dtype)
        cell_pos = s[:, None] + jnp.arange(Bk)[None, :]
        clean = causal_mask(ctx.positions, ctx.positions, W, ctx.segments, ctx.segments)
        sees = jnp.broadcast_to(prefix[:, None, :], (B, Bk, N))
        if W is not None:
            sees = sees & (cell_pos[:, :, None] - pos[None, None, :] < W)
        if ctx.segments is not None:
            doc = jnp.take_along_axis(ctx.segments, jnp.maximum(s - 1, 0)[:, None], axis=1)
            sees = sees & (ctx.segments == doc)[:, None, :]
        mask = jnp.concatenate([jnp.concatenate([clean, jnp.zeros((B, N, Bk), bool)], axis=2),
                                jnp.concatenate([sees, jnp.ones((B, Bk, Bk), bool)], axis=2)], axis=1)
        h = jnp.concatenate([ctx.h, model.local_encoder.embed_tokens(cell_tokens[:, j], dtype)], axis=1)
        logits, _ = model.decode(h, jnp.concatenate([ctx.positions, cell_pos], axis=1), ctx.cross_kv,
                                 jnp.concatenate([ctx.ids.decoder_ids, jnp.full((B, Bk), j)], axis=1), mask=mask)
        return logits[:, N:]

    return jax.lax.map(block, jnp.arange(nb)).transpose(1, 0, 2, 3)
