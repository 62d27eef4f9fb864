"""Attention: masks, the masked softmax, and every way self-attention is computed.

Three families, one module:
- training and scoring windows (no cache): a dense (B, T, S) boolean mask, a `LocalMask` (a sliding causal
  window over a contiguous window, never materialised), or BLT-D's `BlockDiffusionMask` ([clean bytes ; blocks]);
- generation: a chunk of queries against a layer's `KVCache` plus the chunk's own new keys, under a
  `CachedMask` (see `cached_attention`).

Rows with no visible key get a uniform average (as transformers' additive finfo.min masks do); callers never
read such rows.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

CAUSAL_BLOCK = 128  # query block of triangular attention


def masked_softmax(scores: Array, mask: Array, head_dim: int) -> Array:
    scores = scores.astype(jnp.float32) * (head_dim ** -0.5)
    return jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)


def causal_mask(q_pos: Array, k_pos: Array, window: Optional[int], q_seg: Optional[Array] = None,
                k_seg: Optional[Array] = None) -> Array:
    """(B, T, S) mask: key visible iff k <= q, q - k < window, and in the same segment (document)."""
    qp = q_pos[:, :, None]
    kp = k_pos[:, None, :]
    m = kp <= qp
    if window is not None:
        m = m & (qp - kp < window)
    if q_seg is not None:
        m = m & (q_seg[:, :, None] == k_seg[:, None, :])
    return m


# ---- training / scoring windows ------------------------------------------------------------------------------

@flax.struct.dataclass
class LocalMask:
    """A sliding-window causal mask over a contiguous sequence (positions 0..S-1), optionally restricted to
    documents: described, not materialised, so attention can skip the blocks it never needs."""

    segments: Optional[Array]  # (B, S) document ids, or None
    window: int = flax.struct.field(pytree_node=False)

    def dense(self, S: int, batch: int) -> Array:
        pos = jnp.broadcast_to(jnp.arange(S)[None, :], (batch, S))
        return causal_mask(pos, pos, self.window, self.segments, self.segments)


@flax.struct.dataclass
class BlockDiffusionMask:
    """Who attends whom in BLT-D's training layout [N clean bytes ; nb blocks of Bk cells] (Fast BLT §3.2.2;
    docs/fast-blt.md):

    - clean query -> clean keys causally, within the window and the document: exactly plain BLT;
    - a cell of a block starting at s -> clean keys at positions < s (within the window of the cell's own
      position, in the document of byte s - 1) and every cell of its own block, in both directions;
    - nothing else: clean queries never see cells, blocks never see each other.

    A block's prefix ends where its first cell sits, so a cell can never see the clean copy of any cell of
    its block (that would leak its label). Everything depends on bytes < s only.
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


def attention(q: Array, k: Array, v: Array, mask: "Array | LocalMask | BlockDiffusionMask") -> Array:
    """Scaled dot-product attention with GQA over a window's own keys. q (B,T,H,D), k/v (B,S,KV,D).

    The single place uncached self-attention is computed, so a fused kernel can replace it. A LocalMask (a
    sliding causal window over a training window) never materialises what it masks: over several windows,
    block-local attention computes S x 2W scores instead of S x S; otherwise query blocks skip the causal
    upper triangle.
    """
    if isinstance(mask, BlockDiffusionMask):
        return block_diffusion_attention(q, k, v, mask)
    if isinstance(mask, LocalMask):
        S = k.shape[1]
        if S % mask.window == 0 and S >= 2 * mask.window:
            return _block_local_attention(q, k, v, mask)
        if S % CAUSAL_BLOCK == 0 and S >= 2 * CAUSAL_BLOCK:
            return _triangular_attention(q, k, v, mask)
        mask = mask.dense(S, q.shape[0])
    return dense_attention(q, k, v, mask)


def dense_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """On GPU `jax.nn.dot_product_attention` (cuDNN where it applies); elsewhere explicit batched matmuls
    (on XLA:CPU 1.3-1.6x faster than the library's generic path)."""
    if jax.default_backend() == "gpu":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :])
    B, T, H, D = q.shape
    KV = k.shape[2]
    qt = q.reshape(B, T, KV, H // KV, D).transpose(0, 2, 3, 1, 4)  # (B, KV, g, T, D)
    kt = k.transpose(0, 2, 1, 3)[:, :, None]  # (B, KV, 1, S, D)
    vt = v.transpose(0, 2, 1, 3)[:, :, None]
    probs = masked_softmax(jnp.matmul(qt, kt.swapaxes(-1, -2)), mask[:, None, None], D).astype(v.dtype)
    return jnp.matmul(probs, vt).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def _triangular_attention(q: Array, k: Array, v: Array, mask: LocalMask) -> Array:
    """Causal attention by query blocks: block i reads only the keys its window can reach, up to its end."""
    B, S = q.shape[:2]
    pos = jnp.arange(S)
    outs = []
    for q0 in range(0, S, CAUSAL_BLOCK):
        q1 = q0 + CAUSAL_BLOCK
        lo = max(0, q0 - mask.window + 1) // CAUSAL_BLOCK * CAUSAL_BLOCK
        qp, kp = pos[q0:q1, None], pos[None, lo:q1]
        m = jnp.broadcast_to((kp <= qp) & (qp - kp < mask.window), (B, q1 - q0, q1 - lo))
        if mask.segments is not None:
            m = m & (mask.segments[:, q0:q1, None] == mask.segments[:, None, lo:q1])
        outs.append(dense_attention(q[:, q0:q1], k[:, lo:q1], v[:, lo:q1], m))
    return jnp.concatenate(outs, axis=1)


def _block_local_attention(q: Array, k: Array, v: Array, mask: LocalMask) -> Array:
    """Queries in blocks of W attend their own block and the previous one (all a window-W query can see)."""
    B, S, H, D = q.shape
    KV, W = k.shape[2], mask.window
    nb, g = S // W, H // KV

    def with_previous(x, fill):  # (B, nb, W, ...) -> (B, nb, 2W, ...): [block i-1, block i]
        prev = jnp.concatenate([jnp.full_like(x[:, :1], fill), x[:, :-1]], axis=1)
        return jnp.concatenate([prev, x], axis=2)

    qb = q.reshape(B, nb, W, KV, g, D).transpose(0, 1, 3, 4, 2, 5)  # (B, nb, KV, g, W, D)
    kb = with_previous(k.reshape(B, nb, W, KV, D), 0).transpose(0, 1, 3, 2, 4)[:, :, :, None]  # (B,nb,KV,1,2W,D)
    vb = with_previous(v.reshape(B, nb, W, KV, D), 0).transpose(0, 1, 3, 2, 4)[:, :, :, None]
    qi = jnp.arange(W)[:, None] + W  # query j of a block sits at index W + j of its key span
    ki = jnp.arange(2 * W)[None, :]
    allowed = (ki <= qi) & (qi - ki < W)  # (W, 2W)
    allowed = allowed[None, None] & ((jnp.arange(nb) > 0)[:, None, None] | (ki >= W)[None])[None]  # no block -1
    if mask.segments is not None:
        seg = mask.segments.reshape(B, nb, W)
        allowed = allowed & (seg[..., :, None] == with_previous(seg, -1)[..., None, :])
    probs = masked_softmax(jnp.matmul(qb, kb.swapaxes(-1, -2)), allowed[:, :, None, None], D).astype(v.dtype)
    out = jnp.matmul(probs, vb)  # (B, nb, KV, g, W, D)
    return out.transpose(0, 1, 4, 2, 3, 5).reshape(B, S, H, D)


def block_diffusion_attention(q: Array, k: Array, v: Array, mask: BlockDiffusionMask) -> Array:
    """Equal to dense attention under `mask.dense(N)`, without the (N + nb Bk)^2 mask: clean queries take plain
    BLT's path over the N clean keys, and each block's queries take one joint softmax over the clean keys
    they may see and the block's own Bk keys. A window W < N limits a block's clean keys to the W positions
    before its start, gathered per block: the cost is nb Bk (W + Bk) scores, not (nb Bk) x N."""
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
    probs = masked_softmax(scores, visible[:, :, None, None], D).astype(v.dtype)  # (B, nb, KV, g, Bk, L + Bk)
    out = (jnp.matmul(probs[..., :L], vc[:, :, :, None]) + jnp.matmul(probs[..., L:], vb[:, :, :, None]))
    blocks = out.transpose(0, 1, 4, 2, 3, 5).reshape(B, nb * Bk, H, D)
    return jnp.concatenate([clean, blocks], axis=1)


def self_attention_mask(positions: Array, window: Optional[int], segments: Optional[Array] = None,
                        contiguous: bool = False) -> "Array | LocalMask":
    """Mask for a window's queries at `positions` (B, T) over the window itself. `contiguous` declares
    positions == 0..T-1 (training windows), which allows block-local attention."""
    if contiguous and window is not None:
        return LocalMask(segments, window)
    return causal_mask(positions, positions, window, segments, segments)


# ---- generation: KV caches ----------------------------------------------------------------------------------
#
# A layer's cache holds keys and values by position, slot = position mod its size R. A windowed layer keeps a
# ring of R = window + slack slots, so a step reads O(window) whatever the context; an unwindowed layer keeps a
# slot for every position it can see (R = the buffer) and reads only the prefix that holds keys
# (`_linear_prefix`). `slack` is the furthest a round may write past the committed text and then roll back
# (speculative drafts): with it, a write never lands on a slot the window of any committed query still needs,
# so rolling back stays "lower a length" (docs/engine.md).

# unwindowed caches longer than this read the smallest power-of-two prefix (from this size) that holds every
# valid key, not all slots: the global model's cache has a slot per byte, its keys one per patch
LINEAR_PREFIX_MIN = 64


class KVCache(NamedTuple):
    """One self-attention layer's cache, in the layouts the two attention matmuls read without a transpose
    (q @ k: k as (D, R); probs @ v: v as (R, D)), so a step never copies the whole cache."""

    k: Array  # (B, KV, D, R)
    v: Array  # (B, KV, R, D)

    @property
    def size(self) -> int:
        return self.v.shape[2]


def cache_size(window: Optional[int], max_positions: int, slack: int) -> int:
    """Slots a layer's cache needs: a ring of window + slack, or every position for an unwindowed layer."""
    return max_positions if window is None or window + slack >= max_positions else window + slack


def init_cache(batch: int, kv_heads: int, head_dim: int, size: int, dtype=jnp.float32) -> KVCache:
    return KVCache(jnp.zeros((batch, kv_heads, head_dim, size), dtype),
                   jnp.zeros((batch, kv_heads, size, head_dim), dtype))


@flax.struct.dataclass
class CachedMask:
    """How a chunk of Tq queries meets a layer's cache: the cache holds positions < `length`; the chunk's own
    Tq keys are attended under `new` (B, Tq, Tq); the first `n_write` of them are then kept in the cache at
    positions length, length + 1, ... Cached keys are visible to a query at position q when q - p < window."""

    q_pos: Array  # (B, Tq) positions of the queries (RoPE and the window)
    new: Array  # (B, Tq, Tq) which of the chunk's own keys each query sees
    length: Array  # (B,)
    n_write: Array  # (B,)
    window: Optional[int] = flax.struct.field(pytree_node=False)
    # (Bq,) the cache rows the queries read when they are a subset of the cache's batch (a compacted step);
    # None: query row i reads cache row i. Each query row reads its row's prefix in place (`cached_attention`).
    rows: Optional[Array] = None

    @classmethod
    def causal(cls, q_pos: Array, length: Array, n_write: Array, window: Optional[int]) -> "CachedMask":
        """A chunk of consecutive positions: causal (and windowed) among themselves."""
        return cls(q_pos, causal_mask(q_pos, q_pos, window), length, n_write, window)


def _cached_visible(q_pos: Array, length: Array, size: int, window: Optional[int]) -> Array:
    """(B, Tq, R): slot j holds the newest position p < length with p = j (mod R); a query at q sees it when
    p >= 0 and q - p < window."""
    last = (length - 1)[:, None]
    p = last - jnp.mod(last - jnp.arange(size)[None, :], size)  # (B, R)
    ok = p[:, None, :] >= 0
    if window is not None:
        ok = ok & (q_pos[:, :, None] - p[:, None, :] < window)
    return jnp.broadcast_to(ok, q_pos.shape + (size,))


def _attend(q: Array, ck: Array, cv: Array, k_new: Array, v_new: Array, mask: CachedMask) -> Array:
    """One softmax over [cache slots ; chunk keys]. q (B,Tq,H,D); ck (B,KV,D,R); cv (B,KV,R,D)."""
    B, T, H, D = q.shape
    KV, R = cv.shape[1], cv.shape[2]
    g = H // KV
    qt = q.reshape(B, T, KV, g, D).transpose(0, 2, 3, 1, 4).reshape(B, KV, g * T, D)
    kn = k_new.transpose(0, 2, 3, 1)  # (B, KV, D, Tn)
    vn = v_new.transpose(0, 2, 1, 3)  # (B, KV, Tn, D)
    s_cache = jnp.matmul(qt, ck.astype(q.dtype)).reshape(B, KV, g, T, R)
    s_new = jnp.matmul(qt, kn.astype(q.dtype)).reshape(B, KV, g, T, -1)
    visible = jnp.concatenate([_cached_visible(mask.q_pos, mask.length, R, mask.window), mask.new], axis=-1)
    probs = masked_softmax(jnp.concatenate([s_cache, s_new], axis=-1), visible[:, None, None], D)
    probs = probs.astype(cv.dtype).reshape(B, KV, g * T, -1)
    out = jnp.matmul(probs[..., :R], cv) + jnp.matmul(probs[..., R:], vn.astype(cv.dtype))
    return out.reshape(B, KV, g, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q.dtype)


def _linear_prefix(cache: KVCache, mask: CachedMask):
    """Sizes a full-length cache may be read at (powers of two from LINEAR_PREFIX_MIN, then all of it), and
    the index of the smallest that holds every valid key of the batch."""
    R = cache.size
    sizes = []
    s = LINEAR_PREFIX_MIN
    while s < R:
        sizes.append(s)
        s *= 2
    sizes.append(R)
    need = jnp.max(mask.length)
    return sizes, jnp.sum(jnp.asarray(sizes[:-1]) < need)


def cached_attention(q: Array, k_new: Array, v_new: Array, cache: KVCache, mask: CachedMask) -> Array:
    """Attention of a chunk's queries q (B, Tq, H, D) over the cache (positions < mask.length) and the chunk's
    own keys k_new / v_new (B, Tq, KV, D), with GQA. A ring (windowed layer) is read whole; an unwindowed
    cache reads the smallest power-of-two prefix holding every valid key, so its cost follows the context,
    not the buffer."""
    def attend(s):  # the first s slots (of the rows the queries read)
        if mask.rows is None:
            return _attend(q, cache.k[..., :s], cache.v[:, :, :s], k_new, v_new, mask)

        # a compacted step: each query row reads its cache row's prefix where it lies (a dynamic slice), one
        # row at a time, instead of first gathering every row's prefix into a copy
        def one_row(x):
            row, per_row = x
            q1, k1, v1, m1 = jax.tree.map(lambda a: a[None], per_row)  # a batch of one
            ck = jax.lax.dynamic_slice_in_dim(cache.k, row, 1)[..., :s]
            cv = jax.lax.dynamic_slice_in_dim(cache.v, row, 1)[:, :, :s]
            return _attend(q1, ck, cv, k1, v1, m1)[0]

        return jax.lax.map(one_row, (mask.rows, (q, k_new, v_new, mask.replace(rows=None))))

    if mask.window is not None or cache.size <= LINEAR_PREFIX_MIN:
        return attend(cache.size)
    sizes, which = _linear_prefix(cache, mask)
    return jax.lax.switch(which, [lambda s=s: attend(s) for s in sizes])


def write_cache(cache: KVCache, k_new: Array, v_new: Array, mask: CachedMask) -> KVCache:
    """Keep the first n_write new keys/values (B, Tq, KV, D) at positions length, length + 1, ... (slot =
    position mod R). Only the last R of them can survive, so earlier ones are not written (a scatter must
    never hold two writes to one slot); the rest of the chunk (padding, a diffusion block) is not kept."""
    R = cache.size
    T = k_new.shape[1]
    i = jnp.arange(T)[None, :]
    keep = (i < mask.n_write[:, None]) & (i >= mask.n_write[:, None] - R)
    slot = jnp.where(keep, (mask.length[:, None] + i) % R, R)  # R: out of range, dropped

    def put(ck, cv, kn, vn, s):
        ck = ck.at[:, :, s].set(kn.transpose(1, 2, 0).astype(ck.dtype), mode="drop")
        cv = cv.at[:, s, :].set(vn.transpose(1, 0, 2).astype(cv.dtype), mode="drop")
        return ck, cv

    return KVCache(*jax.vmap(put)(cache.k, cache.v, k_new, v_new, slot))
