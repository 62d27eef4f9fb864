"""The incremental generation engine: one state of fixed-size buffers per batch, and the few primitives every
cached method (BLT, BLT-S, BLT-D, BLT-DV) is composed of. docs/engine.md explains the design.

Why caching is exact: every rule is causal (the entropy at t sees bytes <= t; whether a byte starts a patch
depends on the bytes and entropies before it; a patch's latent is final once the patch closes; the decoder at
t reads the latent of patch p(t + 1) - 1, known at t), so every network keeps a KV cache and *validity is
defined by lengths*: entries past `length` (or past `num_closed` patches) are never read, and rolling back a
speculative draft is lowering a length.

Why a step costs what it should: a step touches O(1) of every per-position buffer (the patch rules read the
last two bytes and a carried state), the local layers read their window's ring of cache slots, the decoder
reads the one patch latent each byte attends, pooling reads only the closing patch's bytes, and the global
model runs only when a patch closes. Prefill goes through the same caches in fixed-size chunks.

Primitives (pure functions of (ModelSpec static, params pytrees, EngineState)):
- `extend`: commit a chunk of bytes per row (entropy model -> patch flags -> encoder -> pool + global step for
  patches that closed, optionally also the still-open last patch "provisionally" -> decoder); the decoder
  pass may also carry a block of diffusion cells placed right after the chunk (BLT-D).
- `refresh`: encode the verifier's next byte and compute the provisional latent of the patch holding it (the
  latest latent speculative drafts condition on); nothing is committed.
- `decode_pass`: one decoder pass over byte states or diffusion cells against one latent per query.
- `draft_step`: encoder + decoder for one drafted byte past the committed text.
- `rollback`: keep a shorter prefix (lower the lengths).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from blt_jax import sharding
from blt_jax.generation.loaded import ModelSpec
from blt_jax.model.attention import CachedMask, KVCache, cache_size, causal_mask, write_cache
from blt_jax.model.entropy_model import entropies
from blt_jax.model.layers import cached_chunk_mask, init_stack_caches
from blt_jax.patching import PatchCarry, chunk_start_flags

COUNTERS = ("decoder_calls", "encoder_calls", "global_calls", "entropy_calls", "drafted", "accepted", "rounds",
            "paper_decoder_calls", "paper_global_calls")

# chunks with up to this many patch positions (a round's block or draft, + 1) get the small global buckets
BUCKETED_SLOTS = 32

# bytes a closing patch is assumed to span when the model sets no max_patch_length; a longer one is pooled
# from the whole buffer (a rare fallback)
POOL_BOUND = 32


@dataclass(frozen=True)
class Layout:
    """The static sizes of an engine state.

    buffer: bytes per row (prompt + budget + lookahead); slack: the furthest a round writes past the committed
    text and may roll back (a method's lookahead); max_chunk: the most bytes one `extend` commits (the prefill
    chunk, or a verification chunk)."""

    buffer: int
    slack: int
    max_chunk: int

    @property
    def patch_positions(self) -> int:
        """Every byte may start a patch, plus the trailing empty one and a provisional spare."""
        return self.buffer + 2

    def ring(self, window: Optional[int]) -> int:
        return cache_size(window, self.buffer, self.slack)

    def cross_ring(self) -> int:
        """Patch latents the decoder may read: from the patch before the oldest open one up to the newest a
        chunk can write (num_closed + max_chunk + 1), without two of them sharing a slot."""
        return min(self.patch_positions, self.max_chunk + self.slack + 3)

    def recent(self, max_patch_length: Optional[int], hash_context: int) -> int:
        """Positions whose per-byte state (entropy, patch bookkeeping, encoder states) a step may read: the
        longest chunk plus the longest patch before it (pooling) or the hash n-grams' context, plus the slack
        of a rollback. Every position when patches are unbounded (pooling's fallback reads them all)."""
        if max_patch_length is None:
            return self.buffer
        return min(self.buffer, self.max_chunk + max(max_patch_length, hash_context, 2) + self.slack + 2)


@flax.struct.dataclass
class EngineState:
    # every position (committed bytes, and scratch past `length`): written, never read inside the loop
    tokens: jax.Array  # (B, S)
    # the recent positions a step reads, in rings of Rr slots (slot = position mod Rr)
    recent_tokens: jax.Array  # (B, Rr)
    entropy: jax.Array  # (B, Rr) the entropy model's entropy at each byte
    starts: jax.Array  # (B, Rr) whether byte t starts a patch (t = length: the virtual next byte)
    patch_of: jax.Array  # (B, Rr) the patch holding byte t
    last_natural: jax.Array  # (B, Rr) the patching rules' carried state after byte t (see PatchCarry)
    last_bos: jax.Array  # (B, Rr)
    enc_h: jax.Array  # (B, Rr, De) encoder states (the pooling source)
    # per row
    length: jax.Array  # (B,) committed bytes
    num_closed: jax.Array  # (B,) patches whose latents are final
    next_logits: jax.Array  # (B, V) the model's prediction for the byte at `length`
    # caches
    entropy_kv: list
    encoder_kv: list
    decoder_kv: list
    global_kv: list  # slot = patch index mod its size
    cross_kv: list  # per decoder cross-attention layer (k, v), each (B, Rx, k, KV, hd), slot = patch mod Rx
    counters: dict  # name -> (B,) int32, see COUNTERS

    @property
    def buffer(self) -> int:
        return self.tokens.shape[1]


def init_state(spec: ModelSpec, batch: int, layout: Layout, dtype=jnp.float32) -> EngineState:
    """Empty buffers and caches, split over the batch axes when the model lives on a mesh."""
    cfg = spec.cfg
    S = layout.buffer
    dec = cfg.decoder
    n_cross = dec.n_layers if cfg.decoder_cross_attn_all_layers else 1
    cross_shape = (batch, layout.cross_ring(), cfg.cross_attn_k, dec.kv_heads, dec.head_dim)
    zeros_b = jnp.zeros((batch,), jnp.int32)
    R = layout.recent(cfg.patching.max_patch_length, max(cfg.hash_ngram_sizes, default=1) - 1)
    ints = jnp.zeros((batch, R), jnp.int32)
    em = cfg.entropy_model.stack
    return sharding.constrain_batch(EngineState(
        tokens=jnp.zeros((batch, S), jnp.int32), recent_tokens=ints, entropy=jnp.zeros((batch, R), jnp.float32),
        starts=jnp.zeros((batch, R), bool), patch_of=ints, last_natural=ints, last_bos=ints,
        enc_h=jnp.zeros((batch, R, cfg.encoder.dim), dtype),
        length=zeros_b, num_closed=zeros_b, next_logits=jnp.zeros((batch, cfg.vocab_size), jnp.float32),
        entropy_kv=(init_stack_caches(em, batch, layout.ring(em.window), dtype) if spec.entropy_graphdef else []),
        encoder_kv=init_stack_caches(cfg.encoder, batch, layout.ring(cfg.encoder.window), dtype),
        decoder_kv=init_stack_caches(dec, batch, layout.ring(dec.window), dtype),
        global_kv=init_stack_caches(cfg.global_model, batch,
                                    cache_size(cfg.global_model.window, layout.patch_positions, layout.slack + 2),
                                    dtype),
        cross_kv=[(jnp.zeros(cross_shape, dtype), jnp.zeros(cross_shape, dtype)) for _ in range(n_cross)],
        counters={name: zeros_b for name in COUNTERS},
    ))


# ---- per-row reads and writes: O(chunk), never O(buffer) -----------------------------------------------------

def gather(buf: jax.Array, pos: jax.Array) -> jax.Array:
    """buf (B, N, ...) at per-row positions pos (B,) or (B, T), clamped into range."""
    squeeze = pos.ndim == 1
    idx = jnp.clip(pos[:, None] if squeeze else pos, 0, buf.shape[1] - 1)
    out = jnp.take_along_axis(buf, idx.reshape(idx.shape + (1,) * (buf.ndim - 2)), axis=1)
    return out[:, 0] if squeeze else out


def scatter(buf: jax.Array, pos: jax.Array, values: jax.Array, keep: jax.Array) -> jax.Array:
    """buf (B, N, ...) <- values (B, T, ...) at per-row positions pos (B, T) where keep (B, T); other entries
    (and positions past the buffer) are dropped, so a chunk's padding never overwrites anything."""
    idx = jnp.where(keep & (pos >= 0), pos, buf.shape[1])
    rows = jnp.arange(buf.shape[0])[:, None]
    return buf.at[rows, idx].set(values.astype(buf.dtype), mode="drop")


def recall(ring: jax.Array, pos: jax.Array) -> jax.Array:
    """A ring of recent positions (B, R, ...) at per-row positions pos (B,) or (B, T)."""
    return gather(ring, jnp.mod(pos, ring.shape[1]))


def remember(ring: jax.Array, pos: jax.Array, values: jax.Array, keep: jax.Array) -> jax.Array:
    """Write values (B, T, ...) at positions pos (B, T) of a ring where keep."""
    return scatter(ring, jnp.mod(pos, ring.shape[1]), values, keep & (pos >= 0))


def add_counts(state: EngineState, **adds) -> dict:
    return {k: v + jnp.asarray(adds[k]).astype(jnp.int32) if k in adds else v for k, v in state.counters.items()}


def _carry_at(state: EngineState, last: jax.Array) -> PatchCarry:
    """The patching rules' state after byte `last` (B,) (the initial one before the sequence)."""
    before = last < 0
    return PatchCarry(jnp.where(before, 0, recall(state.last_natural, last)),
                      jnp.where(before, 0, recall(state.last_bos, last)))


def _patch_before(state: EngineState, length: jax.Array) -> jax.Array:
    """The patch holding byte length - 1 (-1 before the sequence)."""
    return jnp.where(length > 0, recall(state.patch_of, length - 1), -1)


def _hash_context(blt, state: EngineState, start: jax.Array) -> jax.Array:
    """The hash n-grams' context: the bytes just before `start`, zeros before the sequence start (as the
    reference pads)."""
    c = blt.hash_context
    pos = start[:, None] - c + jnp.arange(c)[None, :]
    return jnp.where(pos >= 0, recall(state.recent_tokens, pos), 0)


def block_embeddings(blt, cells: jax.Array, dtype) -> jax.Array:
    """Diffusion cells enter the decoder as the encoder's byte embedding of their token ([MASK] or a byte):
    the BLT-D training layout's choice (blt_jax.diffusion)."""
    return blt.local_encoder.embed_tokens(cells, dtype)


def _models(spec: ModelSpec, params: dict):
    blt = nnx.merge(spec.graphdef, params["blt"])
    em = nnx.merge(spec.entropy_graphdef, params["entropy"]) if spec.entropy_graphdef is not None else None
    return blt, em


# ---- patch latents -------------------------------------------------------------------------------------------

def _pool(blt, state: EngineState, lo, hi, end, slots: int, width: int):
    """Patch embeddings (B, slots, k De) of patches [lo, hi) per row, from the encoder states of the `width`
    positions before `end` (which must hold all their bytes)."""
    wpos = end[:, None] - width + jnp.arange(width)[None, :]
    ids = recall(state.patch_of, wpos)
    member = (wpos >= 0) & (ids >= lo[:, None]) & (ids < hi[:, None])
    h = recall(state.enc_h, wpos)
    return blt.pool_patches(h, jnp.where(member, ids - lo[:, None], slots), slots)


def slot_buckets(slots: int) -> tuple[int, ...]:
    """The patch-position counts `_latents` may run the global model on (the smallest that fits is used): a
    round's chunk (at most a block or a draft, + 1) usually closes one or two patches; a prefill chunk of T
    bytes closes about T / (mean patch length) of them, so it gets a quarter and a half of its positions
    (each bucket is one more global model to compile)."""
    if slots > BUCKETED_SLOTS:
        return (slots // 4, slots // 2, slots)
    return tuple(b for b in (1, 2, 4) if b < slots) + (slots,)


def compacted_rows(batch: int) -> int:
    """Rows the byte step's global model runs on when few rows close a patch (see `_latents`)."""
    return batch if batch < 4 else -(-batch // 3)


def _latents(spec: ModelSpec, blt, state: EngineState, lo, hi, end, slots: int, chunk: int, active,
             compact: bool = False):
    """Pool + global step for patches [lo, hi) (per row, hi - lo <= slots, all of them ending before `end`),
    written into the global and cross caches at their patch slots. Runs only when some row has a patch to
    do, and over the fewest patch positions (`slot_buckets`) that hold every row's. Pooling reads the last
    `chunk` + max_patch_length bytes before `end` (an unbounded patch longer than POOL_BOUND falls back to the
    whole buffer).

    `compact` (the one-byte step): rows close patches at different steps, so in a batch some row closes one
    at almost every step; running the global model over every row would multiply its work by the mean patch
    length. When at most `compacted_rows(B)` rows close a patch, the global step runs on those rows only
    (gathered, then spread back; the other rows write nothing), otherwise on all of them."""
    cfg = spec.cfg
    do = active & (hi > lo)
    bound = cfg.patching.max_patch_length or POOL_BOUND
    R = state.enc_h.shape[1]
    width = min(chunk + bound, R)

    positions = lo[:, None] + jnp.arange(slots)[None, :]
    n_new = jnp.where(do, hi - lo, 0)
    mask = cached_chunk_mask(cfg.global_model, positions, lo, n_new)
    B = lo.shape[0]

    def run(size):  # reads the caches; the writes happen below, outside the switch, so they stay in place
        def pool(w):
            return lambda: _pool(blt, state, lo, hi, end, size, w)

        if cfg.patching.max_patch_length is None and width < R:  # unbounded patches: is the window enough?
            first = end - width  # every byte of patch lo must lie at or after it
            spills = do & (first > 0) & (recall(state.patch_of, first - 1) >= lo)
            pe = jax.lax.cond(jnp.any(spills), pool(R), pool(width))
        else:
            pe = pool(width)()
        pos = positions[:, :size]
        size_mask = cached_chunk_mask(cfg.global_model, pos, lo, n_new)

        def global_step(rows):  # rows: indices of the rows to run (None: all)
            take = (lambda x: x) if rows is None else (lambda x: x[rows])
            # the caches stay whole: attention takes the rows from the prefix it reads (CachedMask.rows)
            mask = jax.tree.map(take, size_mask).replace(rows=rows)
            latents, new_kv = blt.global_latents(take(pe), take(pos), caches=state.global_kv, mask=mask,
                                                 write=False)
            out = (new_kv, blt.decoder_cross_kv(latents))
            if rows is None:
                return out
            return jax.tree.map(lambda x: jnp.zeros((B,) + x.shape[1:], x.dtype).at[rows].set(x), out)

        K = compacted_rows(B)
        if not compact or K >= B:
            out = global_step(None)
        else:
            rows = jnp.argsort(jnp.where(do, 0, 1), stable=True)[:K]  # the rows with a patch to do come first
            out = jax.lax.cond(jnp.sum(do) <= K, lambda: global_step(rows), lambda: global_step(None))
        # back to `slots` patch positions (the slots past `size` hold no patch and are never written)
        return jax.tree.map(lambda x: jnp.pad(x, [(0, 0), (0, slots - size)] + [(0, 0)] * (x.ndim - 2)), out)

    g = cfg.global_model
    dec = cfg.decoder
    dtype = state.enc_h.dtype
    kv_shape = (B, slots, g.kv_heads, g.head_dim)
    cross_shape = (B, slots, cfg.cross_attn_k, dec.kv_heads, dec.head_dim)
    nothing = ([KVCache(jnp.zeros(kv_shape, dtype), jnp.zeros(kv_shape, dtype)) for _ in state.global_kv],
               [(jnp.zeros(cross_shape, dtype), jnp.zeros(cross_shape, dtype)) for _ in state.cross_kv])
    # the global model's cost grows with the patch positions it runs (small matmuls on CPU most of all), and
    # a chunk of T bytes usually closes one or two patches: run the smallest bucket that holds every row's new
    # patches
    buckets = slot_buckets(slots)
    most = jnp.max(n_new)
    branch = jnp.where(most == 0, 0, 1 + jnp.sum(jnp.asarray(buckets) < most))
    new_kv, new_cross = jax.lax.switch(branch, [lambda: nothing] + [lambda s=s: run(s) for s in buckets])
    gkv = [write_cache(c, kv.k, kv.v, mask) for c, kv in zip(state.global_kv, new_kv, strict=True)]
    Rx = state.cross_kv[0][0].shape[1]
    keep = jnp.arange(slots)[None, :] < n_new[:, None]
    slot = jnp.mod(positions, Rx)
    cross = [(scatter(k, slot, nk, keep), scatter(v, slot, nv, keep))
             for (k, v), (nk, nv) in zip(state.cross_kv, new_cross, strict=True)]
    return state.replace(global_kv=gkv, cross_kv=cross), do


def latent_slot(state: EngineState, patch: jax.Array) -> jax.Array:
    """Where patch `patch` (any shape (B, ...)) keeps its latent's keys/values in the cross-attention ring."""
    return jnp.mod(patch, state.cross_kv[0][0].shape[1])


def latest_patch(state: EngineState) -> jax.Array:
    """(B,) the patch holding the last committed byte: the latest latent (BLT-D blocks read it)."""
    return _patch_before(state, state.length)


# ---- the decoder -----------------------------------------------------------------------------------------------

def decode_pass(spec: ModelSpec, blt, state: EngineState, h, positions, patches, new_mask, length, n_write):
    """One decoder pass over inputs h (B, T, Dd) at `positions` (B, T), each reading the latent of `patches`
    (B, T), attending the cached bytes before `length` and each other under `new_mask` (B, T, T); the first
    `n_write` keys are kept. Returns (state with the decoder cache, logits (B, T, V))."""
    mask = CachedMask(positions, new_mask, length, n_write, spec.cfg.decoder.window)
    logits, dec_kv = blt.decode(h, positions, state.cross_kv, latent_slot(state, patches), mask=mask,
                                caches=state.decoder_kv)
    return state.replace(decoder_kv=dec_kv), logits


def block_mask(window: Optional[int], chunk_pos, n, block_pos) -> jax.Array:
    """(B, T + Bk, T + Bk) over [chunk ; block]: chunk bytes causal among themselves; block cells see the chunk's
    n real bytes (within the window of the cell's position) and their whole block, in both directions."""
    T, Bk = chunk_pos.shape[1], block_pos.shape[1]
    B = chunk_pos.shape[0]
    chunk = jnp.concatenate([causal_mask(chunk_pos, chunk_pos, window), jnp.zeros((B, T, Bk), bool)], axis=2)
    sees = (jnp.arange(T)[None, None, :] < n[:, None, None])
    if window is not None:
        sees = sees & (block_pos[:, :, None] - chunk_pos[:, None, :] < window)
    cells = jnp.concatenate([sees, jnp.ones((B, Bk, Bk), bool)], axis=2)
    return jnp.concatenate([chunk, cells], axis=1)


# ---- primitives -------------------------------------------------------------------------------------------------

def decoder_reach(spec: ModelSpec, slack: int) -> Optional[int]:
    """How far back from a row's end its bytes still matter to the decoder's caches, or None (no window: all
    the way). Layer l's keys at p need layer l - 1's output at p, which reads keys in (p - W, p]; the ring
    keeps W + slack positions. So n_layers x W + slack bytes bound what the decoder's ring holds."""
    dec = spec.cfg.decoder
    return None if dec.window is None else dec.n_layers * dec.window + slack


def extend(spec: ModelSpec, params: dict, state: EngineState, chunk: jax.Array, n: jax.Array,
           provisional: bool = False, block: Optional[jax.Array] = None, decode: bool = True):
    """Commit chunk[:, :n] (B, T) at each row's `length`. Returns (state, chunk logits (B, T, V), block
    logits (B, Bk, V) or None). `provisional`: also compute the latent of the still-open last patch (the
    latest latent). `block` (B, Bk): diffusion cells placed right after the n committed bytes, decoded in
    the same decoder pass against the latest latent (BLT-D). `decode=False` leaves the decoder out (no
    logits; next_logits unchanged): for prefill chunks beyond every row's `decoder_reach`."""
    cfg = spec.cfg
    blt, em = _models(spec, params)
    dtype = state.enc_h.dtype
    B, T = chunk.shape
    L = state.length
    active = n > 0
    pos = L[:, None] + jnp.arange(T)[None, :]
    real = jnp.arange(T)[None, :] < n[:, None]

    H = jnp.zeros((B, T), jnp.float32)
    ent_kv = state.entropy_kv
    if em is not None:
        logits_e, ent_kv = em(chunk, pos, ent_kv, mask=cached_chunk_mask(cfg.entropy_model.stack, pos, L, n),
                              dtype=dtype)
        H = entropies(logits_e)
    prev = L[:, None] + jnp.arange(-2, 0)[None, :]
    starts, carry = chunk_start_flags(cfg.patching, spec.threshold, recall(state.recent_tokens, prev),
                                      recall(state.entropy, prev), chunk, H, L, n, _carry_at(state, L - 1))
    patch = _patch_before(state, L)[:, None] + jnp.cumsum(starts[:, :T].astype(jnp.int32), axis=1)  # of byte L + i
    last_patch = gather(patch, jnp.maximum(n - 1, 0))  # the patch of the last committed byte
    closed = jnp.where(active, last_patch + gather(starts, n).astype(jnp.int32), state.num_closed)

    emb = blt.byte_embeddings(chunk, _hash_context(blt, state, L), dtype)
    h, enc_kv = blt.encode(emb, pos, caches=state.encoder_kv, mask=cached_chunk_mask(cfg.encoder, pos, L, n))
    flag_pos = L[:, None] + jnp.arange(T + 1)[None, :]
    state = state.replace(
        tokens=scatter(state.tokens, pos, chunk, real), recent_tokens=remember(state.recent_tokens, pos, chunk, real),
        entropy=remember(state.entropy, pos, H, real),
        starts=remember(state.starts, flag_pos, starts, jnp.arange(T + 1)[None, :] <= n[:, None]),
        patch_of=remember(state.patch_of, pos, patch, real),
        last_natural=remember(state.last_natural, pos, carry.last_natural, real),
        last_bos=remember(state.last_bos, pos, carry.last_bos, real),
        enc_h=remember(state.enc_h, pos, h, real), entropy_kv=ent_kv, encoder_kv=enc_kv, length=L + n)
    hi = jnp.maximum(closed, last_patch + 1) if provisional else closed
    state, global_ran = _latents(spec, blt, state, state.num_closed, hi, L + n, T + int(provisional), T, active,
                                 compact=T == 1 and not provisional)

    one = active.astype(jnp.int32)
    calls = dict(encoder_calls=one, global_calls=global_ran, entropy_calls=one if em is not None else 0 * one)
    if not decode:
        return state.replace(num_closed=closed, counters=add_counts(state, **calls)), None, None
    reads = patch + starts[:, 1:].astype(jnp.int32) - 1  # the decoder at t reads p(t + 1) - 1
    dec_h, dec_pos, new_mask = h, pos, causal_mask(pos, pos, cfg.decoder.window)
    if block is not None:
        Bk = block.shape[1]
        bpos = (L + n)[:, None] + jnp.arange(Bk)[None, :]
        dec_h = jnp.concatenate([h, block_embeddings(blt, block, dtype)], axis=1)
        dec_pos = jnp.concatenate([pos, bpos], axis=1)
        reads = jnp.concatenate([reads, jnp.broadcast_to(last_patch[:, None], (B, Bk))], axis=1)
        new_mask = block_mask(cfg.decoder.window, pos, n, bpos)
    state, logits = decode_pass(spec, blt, state, dec_h, dec_pos, reads, new_mask, L, n)
    next_logits = jnp.where(active[:, None], gather(logits[:, :T], jnp.maximum(n - 1, 0)), state.next_logits)
    state = state.replace(num_closed=closed, next_logits=next_logits,
                          counters=add_counts(state, decoder_calls=one, **calls))
    return state, logits[:, :T], (logits[:, T:] if block is not None else None)


def refresh(spec: ModelSpec, params: dict, state: EngineState, token: jax.Array, active: jax.Array):
    """Speculative methods: encode the verifier's next byte `token` (B,) at `length` and compute the
    provisional latent of the patch holding it (patch num_closed: open, since nothing after it is known).
    Drafts condition on it, as the paper's encoder + global pass over the text does. Nothing is committed
    (the verification pass recomputes the byte); returns (state, the byte's encoder state (B, 1, De))."""
    blt, _ = _models(spec, params)
    dtype = state.enc_h.dtype
    L = state.length
    pos = L[:, None]
    write = active[:, None]
    emb = blt.byte_embeddings(token[:, None], _hash_context(blt, state, L), dtype)
    h, enc_kv = blt.encode(emb, pos, caches=state.encoder_kv,
                           mask=cached_chunk_mask(spec.cfg.encoder, pos, L, active.astype(jnp.int32)))
    state = state.replace(recent_tokens=remember(state.recent_tokens, pos, token[:, None], write),
                          encoder_kv=enc_kv, patch_of=remember(state.patch_of, pos, state.num_closed[:, None], write),
                          enc_h=remember(state.enc_h, pos, h, write))
    state, ran = _latents(spec, blt, state, state.num_closed, state.num_closed + 1, L + 1, 1, 1, active)
    return state.replace(counters=add_counts(state, encoder_calls=active, global_calls=ran)), h


def draft_step(spec: ModelSpec, params: dict, state: EngineState, token: jax.Array, position: jax.Array,
               patch: jax.Array, active: jax.Array):
    """Encode a drafted byte `token` (B,) at `position` (B,) and decode it against the latent of `patch`
    (B,): the logits for the byte after it. Writes scratch cache entries past `length`, which the
    verification pass overwrites."""
    blt, _ = _models(spec, params)
    dtype = state.enc_h.dtype
    pos = position[:, None]
    one = active.astype(jnp.int32)
    emb = blt.byte_embeddings(token[:, None], _hash_context(blt, state, position), dtype)
    h, enc_kv = blt.encode(emb, pos, caches=state.encoder_kv,
                           mask=cached_chunk_mask(spec.cfg.encoder, pos, position, one))
    state = state.replace(recent_tokens=remember(state.recent_tokens, pos, token[:, None], active[:, None]),
                          encoder_kv=enc_kv)
    state, logits = decode_pass(spec, blt, state, h, pos, patch[:, None], jnp.ones((pos.shape[0], 1, 1), bool),
                                position, one)
    return state.replace(counters=add_counts(state, decoder_calls=one, encoder_calls=one)), logits[:, 0]


def decode_at(spec: ModelSpec, params: dict, state: EngineState, h: jax.Array, patch: jax.Array,
              active: jax.Array, cells: Optional[jax.Array] = None):
    """The first draft pass after `refresh`: the decoder at the verifier's byte (state h (B, 1, De) at
    `length`) against the latent of `patch` (B,), keeping its (scratch) keys; with `cells` (B, Bk), a
    diffusion block right after it, reading the same latent (BLT-DV), in the same pass. Returns (state,
    logits (B, 1 [+ Bk], V))."""
    blt, _ = _models(spec, params)
    L = state.length
    pos = L[:, None]
    B = pos.shape[0]
    one = active.astype(jnp.int32)
    q, q_pos, new_mask = h, pos, jnp.ones((B, 1, 1), bool)
    if cells is not None:
        Bk = cells.shape[1]
        bpos = L[:, None] + 1 + jnp.arange(Bk)[None, :]
        q = jnp.concatenate([h, block_embeddings(blt, cells, h.dtype)], axis=1)
        q_pos = jnp.concatenate([pos, bpos], axis=1)
        new_mask = block_mask(spec.cfg.decoder.window, pos, one, bpos)
    patches = jnp.broadcast_to(patch[:, None], q_pos.shape)
    state, logits = decode_pass(spec, blt, state, q, q_pos, patches, new_mask, L, one)
    return state.replace(counters=add_counts(state, decoder_calls=one)), logits


def denoise(spec: ModelSpec, params: dict, state: EngineState, cells: jax.Array, prefix_end: jax.Array,
            patch: jax.Array, active: jax.Array):
    """One decoder pass over diffusion cells (B, Bk) at positions prefix_end .. prefix_end + Bk - 1, all
    reading the latent of `patch` (B,), attending the cached bytes before `prefix_end` and the whole block:
    logits (B, Bk, V). Nothing is written to the cache."""
    blt, _ = _models(spec, params)
    B, Bk = cells.shape
    pos = prefix_end[:, None] + jnp.arange(Bk)[None, :]
    state, logits = decode_pass(spec, blt, state, block_embeddings(blt, cells, state.enc_h.dtype), pos,
                                jnp.broadcast_to(patch[:, None], (B, Bk)), jnp.ones((B, Bk, Bk), bool),
                                prefix_end, jnp.zeros((B,), jnp.int32))
    return state.replace(counters=add_counts(state, decoder_calls=active)), logits


def rollback(state: EngineState, length: jax.Array, next_logits: jax.Array) -> EngineState:
    """Keep only the first `length` bytes (B,): lower the lengths; patches closed past them reopen."""
    closed = _patch_before(state, length) + recall(state.starts, length).astype(jnp.int32)
    return state.replace(length=length, num_closed=closed, next_logits=next_logits)
