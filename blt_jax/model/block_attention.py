"""Decoder self-attention over BLT-D's training layout, [N clean bytes ; nb blocks of B cells], without the
(N + nb B)^2 mask: clean queries take plain BLT's path over the N clean keys, and each block's queries take
one joint softmax over the clean keys they may see and the block's own B keys."""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from blt_jax.model.layers import LocalMask, _masked_softmax, attention, causal_mask

Array = jax.Array


@flax.struct.dataclass
class BlockDiffusionMask:
    """Who attends whom in the training layout (Fast BLT §3.2.2; `paper-digest.md` §1.3.3 and §4):

    - clean query -> clean keys causally, within the window and the document: exactly plain BLT;
    - a cell of a block starting at s -> clean keys at positions < s (within the window of the cell's own
      position, in the document of byte s - 1) and every cell of its own block, in both directions;
    - nothing else: clean queries never see cells, blocks never see each other.

    A block's prefix ends where its first cell sits, so a cell can never see the clean copy of any cell of
    its block (the label leak of `paper-digest.md` §4). Everything depends on bytes < s only.
    """

    positions: Array  # (B, nb, Bk) original positions of the cells: s .. s + Bk - 1
    segments: Optional[Array]  # (B, N) document ids of the clean bytes, or None
    window: Optional[int] = flax.struct.field(pytree_node=False)

    def clean_visible(self, key_pos: Array) -> Array:
        """(B, nb, Bk, L) whether each cell sees the clean keys at `key_pos` (B, nb, L)."""
        start = self.positions[:, :, :1]  # (B, nb, 1)
        ok = jnp.broadcast_to((key_pos < start)[:, :, None, :], self.positions.shape + key_pos.shape[-1:])
        if self.window is not None:
            ok = ok & (self.positions[..., None] - key_pos[:, :, None, :] < self.window)
        if self.segments is not None:
            N = self.segments.shape[1]
            seg_of = lambda p: jnp.take_along_axis(  # noqa: E731
                self.segments, jnp.clip(p, 0, N - 1).reshape(p.shape[0], -1), axis=1).reshape(p.shape)
            ok = ok & (seg_of(key_pos) == seg_of(start - 1))[:, :, None, :]
        return ok

    def dense(self, N: int) -> Array:
        """The (B, T, T) boolean mask, T = N + nb * Bk (the reference; memory grows with T^2)."""
        B, nb, Bk = self.positions.shape
        pos = jnp.broadcast_to(jnp.arange(N)[None], (B, N))
        clean = causal_mask(pos, pos, self.window, self.segments, self.segments)  # (B, N, N)
        to_clean = self.clean_visible(jnp.broadcast_to(pos[:, None], (B, nb, N))).reshape(B, nb * Bk, N)
        block_of = jnp.repeat(jnp.arange(nb), Bk)
        own = jnp.broadcast_to(block_of[:, None] == block_of[None, :], (B, nb * Bk, nb * Bk))
        top = jnp.concatenate([clean, jnp.zeros((B, N, nb * Bk), bool)], axis=2)
        return jnp.concatenate([top, jnp.concatenate([to_clean, own], axis=2)], axis=1)


def block_diffusion_attention(q: Array, k: Array, v: Array, mask: BlockDiffusionMask) -> Array:
    """Equal to dense attention under `mask.dense(N)`. A window W < N limits a block's clean keys to the W
    positions before its start, gathered per block: the cost is nb Bk (W + Bk) scores, not (nb Bk) x N."""
    B, T, H, D = q.shape
    KV = k.shape[2]
    g = H // KV
    _, nb, Bk = mask.positions.shape
    N = T - nb * Bk
    clean = attention(q[:, :N], k[:, :N], v[:, :N], LocalMask(mask.segments, mask.window or N))

    qb = q[:, N:].reshape(B, nb, Bk, KV, g, D).transpose(0, 1, 3, 4, 2, 5)  # (B, nb, KV, g, Bk, D)
    kb = k[:, N:].reshape(B, nb, Bk, KV, D).transpose(0, 1, 3, 2, 4)  # (B, nb, KV, Bk, D)
    vb = v[:, N:].reshape(B, nb, Bk, KV, D).transpose(0, 1, 3, 2, 4)
    L = N if mask.window is None else min(mask.window, N)
    if L == N:  # every clean key may be in reach: no gather
        key_pos = jnp.broadcast_to(jnp.arange(N)[None, None], (B, nb, N))
        kc, vc = (x[:, :N].transpose(0, 2, 1, 3)[:, None] for x in (k, v))  # (B, 1, KV, N, D)
    else:  # the W clean positions before the block's start (clamped into the window)
        lo = jnp.clip(mask.positions[:, :, 0] - L, 0, N - L)
        key_pos = lo[:, :, None] + jnp.arange(L)[None, None]  # (B, nb, L)
        flat = key_pos.reshape(B, nb * L)[:, :, None, None]
        kc, vc = (jnp.take_along_axis(x[:, :N], flat, axis=1).reshape(B, nb, L, KV, D).transpose(0, 1, 3, 2, 4)
                  for x in (k, v))  # (B, nb, KV, L, D)
    scores = jnp.concatenate([jnp.matmul(qb, kc[:, :, :, None].swapaxes(-1, -2)),
                              jnp.matmul(qb, kb[:, :, :, None].swapaxes(-1, -2))], axis=-1)
    visible = jnp.concatenate([mask.clean_visible(key_pos), jnp.ones((B, nb, Bk, Bk), bool)], axis=-1)
    probs = _masked_softmax(scores, visible[:, :, None, None], D).astype(v.dtype)  # (B, nb, KV, g, Bk, L + Bk)
    out = (jnp.matmul(probs[..., :L], vc[:, :, :, None]) + jnp.matmul(probs[..., L:], vb[:, :, :, None]))
    blocks = out.transpose(0, 1, 4, 2, 3, 5).reshape(B, nb * Bk, H, D)
    return jnp.concatenate([clean, blocks], axis=1)
