"""The incremental generation engine: one state of fixed-size buffers per batch and a few primitives from
which every cached method (BLT, BLT-S, BLT-D, BLT-DV) is composed.

Why exact caching works (design-notes.md §1): every rule is causal — entropy at t sees bytes <= t, a byte
starts a patch from the entropy before it, a patch's latent is final once the patch closes, and the decoder
at t reads the latent of patch p(t+1) - 1, known at t. So each network keeps a KV cache whose slot index is
the position (bytes) or patch index (global), and *validity is defined by lengths*: slots past `length` (or
past `num_closed`) are never read by any mask, so rolling back a speculative draft is lowering a length.

Primitives (all pure functions of (ModelSpec static, params pytrees, EngineState)):
- `extend`: commit a chunk of bytes per row: entropy model -> patch starts -> encoder -> pool + global step
  for patches that closed (optionally also the still-open last patch, "provisionally") -> decoder; optionally
  the decoder pass also carries a block of diffusion cells placed after the chunk (BLT-D).
- `refresh_latent`: the provisional latent of the open last patch (the latest latent drafts condition on).
- `draft_step`: one byte past the committed text with encoder + decoder only, against the latest latent.
- `denoise`: one decoder pass over a block of diffusion cells against the latest latent.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from blt_jax import sharding
from blt_jax.generation.model import ModelSpec
from blt_jax.model.entropy_model import entropies
from blt_jax.model.layers import init_caches
from blt_jax.patching import start_flags

COUNTERS = ("decoder_calls", "encoder_calls", "global_calls", "entropy_calls", "drafted", "accepted")


@flax.struct.dataclass
class EngineState:
    tokens: jax.Array  # (B, S) committed bytes (and scratch past `length`)
    entropy: jax.Array  # (B, S) the entropy model's entropy at each committed position
    enc_h: jax.Array  # (B, S, De) encoder byte states (the decoder's input and the pooling source)
    length: jax.Array  # (B,) committed bytes
    num_closed: jax.Array  # (B,) patches whose latents are final
    next_logits: jax.Array  # (B, V) the model's prediction for the byte at `length`
    entropy_kv: list
    encoder_kv: list
    decoder_kv: list
    global_kv: list  # slot = patch index; the last slot is scratch
    cross_kv: list  # per decoder cross-attention layer: (k, v), each (B, P, k, KV, hd), slot = patch index
    counters: dict  # name -> (B,) int32, see COUNTERS

    @property
    def buffer(self) -> int:
        return self.tokens.shape[1]


def patch_slots(buffer: int) -> int:
    """Global-cache slots: every byte may start a patch, plus the trailing empty one and a spare. A chunk of
    T bytes at length L writes slots from at most L up to L + T, so buffers are sized with L + T <= S."""
    return buffer + 2


def init_state(spec: ModelSpec, batch: int, buffer: int, dtype=jnp.float32) -> EngineState:
    """Empty buffers and caches, split over the batch axes when the model lives on a mesh."""
    cfg = spec.cfg
    P = patch_slots(buffer)
    dec = cfg.decoder
    n_cross = dec.n_layers if cfg.decoder_cross_attn_all_layers else 1
    cross_shape = (batch, P, cfg.cross_attn_k, dec.kv_heads, dec.head_dim)
    zeros_b = jnp.zeros((batch,), jnp.int32)
    return sharding.constrain_batch(EngineState(
        tokens=jnp.zeros((batch, buffer), jnp.int32), entropy=jnp.zeros((batch, buffer), jnp.float32),
        enc_h=jnp.zeros((batch, buffer, cfg.encoder.dim), dtype), length=zeros_b, num_closed=zeros_b,
        next_logits=jnp.zeros((batch, cfg.vocab_size), jnp.float32),
        entropy_kv=init_caches(cfg.entropy_model.stack, batch, buffer, dtype) if spec.entropy_graphdef else [],
        encoder_kv=init_caches(cfg.encoder, batch, buffer, dtype),
        decoder_kv=init_caches(dec, batch, buffer, dtype),
        global_kv=init_caches(cfg.global_model, batch, P, dtype),
        cross_kv=[(jnp.zeros(cross_shape, dtype), jnp.zeros(cross_shape, dtype)) for _ in range(n_cross)],
        counters={name: zeros_b for name in COUNTERS},
    ))


# ---- small helpers ----------------------------------------------------------------------------------------

def _write_rows(buf: jax.Array, rows: jax.Array, offset: jax.Array) -> jax.Array:
    """buf (B, N, ...) <- rows (B, T, ...) at per-row offsets (B,)."""
    upd = lambda b, r, o: jax.lax.dynamic_update_slice(b, r.astype(b.dtype), (o,) + (0,) * (b.ndim - 1))  # noqa: E731
    return jax.vmap(upd)(buf, rows, offset)


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x (B, N, ...) at per-row indices idx (B,) or (B, T)."""
    squeeze = idx.ndim == 1
    idx2 = idx[:, None] if squeeze else idx
    out = jnp.take_along_axis(x, idx2.reshape(idx2.shape + (1,) * (x.ndim - 2)), axis=1)
    return out[:, 0] if squeeze else out


def add_counts(state: EngineState, **adds) -> dict:
    return {k: v + adds.get(k, 0).astype(jnp.int32) if k in adds else v for k, v in state.counters.items()}


def patch_index(starts: jax.Array) -> jax.Array:
    """(B, S+1) starts -> inclusive cumulative count; patch holding byte t = csum[t] - 1."""
    return jnp.cumsum(starts.astype(jnp.int32), axis=1)


def current_starts(spec: ModelSpec, tokens: jax.Array, entropy: jax.Array) -> jax.Array:
    """Patch starts of the buffer from the stored entropies: the same rule function as training, run over
    the whole (small) buffer so every rule (monotonic, max_patch_length, documents) is reproduced exactly."""
    if spec.cfg.patching.mode == "entropy":
        return start_flags(spec.cfg.patching, tokens, entropy, spec.threshold)
    return start_flags(spec.cfg.patching, tokens)


def _hash_context(blt, tokens: jax.Array, offset: jax.Array) -> jax.Array:
    c = blt.hash_context
    padded = jnp.pad(tokens, ((0, 0), (c, 0)))  # zeros before the sequence start, as the reference pads
    return jax.vmap(lambda t, o: jax.lax.dynamic_slice(t, (o,), (c,)))(padded, offset)


def block_embeddings(blt, cells: jax.Array, dtype) -> jax.Array:
    """Diffusion cells enter the decoder as the encoder's byte embedding of their token ([MASK] or a byte):
    the BLT-D training layout's choice (blt_jax.diffusion)."""
    return blt.local_encoder.embed_tokens(cells, dtype)


# ---- primitives -------------------------------------------------------------------------------------------

def _latents_for(spec: ModelSpec, blt, state: EngineState, starts, csum, lo, hi, slots: int, active):
    """Pool + global step for patches [lo, hi) (per row, hi - lo <= slots), written into the global and
    cross caches at their patch slots; rows with nothing to do write into the scratch slot."""
    B, S = state.tokens.shape
    enc_ids = csum[:, :S] - 1
    rel = enc_ids - lo[:, None]
    member = (jnp.arange(S)[None, :] < state.length[:, None]) & (rel >= 0) & (enc_ids < hi[:, None])
    do = active & (hi > lo)
    offset = jnp.where(do, lo, state.num_closed)  # idle rows write past their final latents: never read
    positions = offset[:, None] + jnp.arange(slots)[None, :]

    def run(_):  # pooling reads the whole byte buffer: only when some patch closes
        pe = blt.pool_patches(state.enc_h, jnp.where(member, rel, slots), slots)
        latents, gkv = blt.global_latents(pe, positions, caches=state.global_kv, offset=offset)
        new_cross = blt.decoder_cross_kv(latents)
        cross = [(_write_rows(k, nk, offset), _write_rows(v, nv, offset))
                 for (k, v), (nk, nv) in zip(state.cross_kv, new_cross)]
        return gkv, cross

    gkv, cross = jax.lax.cond(jnp.any(do), run, lambda _: (state.global_kv, state.cross_kv), None)
    return state.replace(global_kv=gkv, cross_kv=cross), do


def extend(spec: ModelSpec, params: dict, state: EngineState, chunk: jax.Array, n: jax.Array,
           provisional: bool = False, block: Optional[jax.Array] = None):
    """Commit chunk[:, :n] (B, T) at each row's `length`. Returns (state, chunk logits (B, T, V), block
    logits (B, Bk, V) or None). `provisional`: also compute the latent of the still-open last patch (the
    latest latent, which drafts condition on). `block` (B, Bk): diffusion cells placed right after the chunk
    (requires n == T on active rows), decoded in the same decoder pass."""
    cfg = spec.cfg
    blt = nnx.merge(spec.graphdef, params["blt"])
    dtype = state.enc_h.dtype
    B, T = chunk.shape
    S = state.buffer
    L = state.length
    active = n > 0
    pos = L[:, None] + jnp.arange(T)[None, :]
    tokens = _write_rows(state.tokens, chunk, L)

    entropy, ent_kv = state.entropy, state.entropy_kv
    if spec.entropy_graphdef is not None:
        em = nnx.merge(spec.entropy_graphdef, params["entropy"])
        logits_e, ent_kv = em(chunk, pos, ent_kv, L, dtype=dtype)
        entropy = _write_rows(entropy, entropies(logits_e), L)
    starts = current_starts(spec, tokens, entropy)
    csum = patch_index(starts)
    Lp = L + n

    emb = blt.byte_embeddings(chunk, _hash_context(blt, tokens, L), dtype)
    h, enc_kv = blt.encode(emb, pos, caches=state.encoder_kv, offset=L)
    enc_h = _write_rows(state.enc_h, h, L)
    closed = _take(csum, Lp) - 1
    last_patch = _take(csum, jnp.maximum(Lp - 1, 0)) - 1
    state = state.replace(tokens=tokens, entropy=entropy, enc_h=enc_h, entropy_kv=ent_kv, encoder_kv=enc_kv,
                          length=Lp)
    hi = jnp.maximum(closed, last_patch + 1) if provisional else closed
    state, global_ran = _latents_for(spec, blt, state, starts, csum, state.num_closed, hi, T + 1, active)

    cross_ids = _take(csum, jnp.minimum(pos + 1, S)) - 2  # decoder reads p(t + 1) - 1
    dec_in, dec_pos, ids = h, pos, cross_ids
    mask = None
    if block is not None:
        Bk = block.shape[1]
        bpos = Lp[:, None] + jnp.arange(Bk)[None, :]
        dec_in = jnp.concatenate([h, block_embeddings(blt, block, dtype)], axis=1)
        dec_pos = jnp.concatenate([pos, bpos], axis=1)
        ids = jnp.concatenate([cross_ids, jnp.broadcast_to(last_patch[:, None], (B, Bk))], axis=1)
        mask = _block_mask(cfg.decoder.window, dec_pos, Lp, Bk, S, T)
    logits, dec_kv = blt.decode(dec_in, dec_pos, state.cross_kv, ids, mask=mask, caches=state.decoder_kv,
                                offset=L)
    next_logits = jnp.where(active[:, None], _take(logits[:, :T], jnp.maximum(n - 1, 0)), state.next_logits)
    one = active.astype(jnp.int32)
    state = state.replace(decoder_kv=dec_kv, num_closed=jnp.where(active, closed, state.num_closed),
                          next_logits=next_logits,
                          counters=add_counts(state, decoder_calls=one, encoder_calls=one, global_calls=global_ran,
                                          entropy_calls=one if spec.entropy_graphdef is not None else 0 * one))
    return state, logits[:, :T], (logits[:, T:] if block is not None else None)


def _block_mask(window: Optional[int], q_pos: jax.Array, prefix_len: jax.Array, Bk: int, S: int, T: int):
    """(B, T + Bk, S) decoder mask over the cache: chunk queries are causal; block cells see every committed
    byte before the block (within the local window) and their whole block, bidirectionally."""
    slots = jnp.arange(S)[None, None, :]
    qp = q_pos[:, :, None]
    in_window = True if window is None else (qp - slots < window)
    causal = (slots <= qp) & in_window
    is_block = (jnp.arange(q_pos.shape[1]) >= T)[None, :, None]
    start = prefix_len[:, None, None]
    block_vis = ((slots < start) & in_window) | ((slots >= start) & (slots < start + Bk))
    return jnp.where(is_block, block_vis, causal)


def refresh_latent(spec: ModelSpec, params: dict, state: EngineState, active: jax.Array) -> EngineState:
    """Compute the latent of the patch holding the last committed byte if it is still open (provisional:
    recomputed when the patch really closes). A closed patch's final latent is left untouched."""
    blt = nnx.merge(spec.graphdef, params["blt"])
    starts = current_starts(spec, state.tokens, state.entropy)
    csum = patch_index(starts)
    last_patch = _take(csum, jnp.maximum(state.length - 1, 0)) - 1
    is_open = ~_take(starts, state.length)
    lo = jnp.where(is_open, last_patch, state.num_closed)
    state, ran = _latents_for(spec, blt, state, starts, csum, lo, lo + is_open.astype(jnp.int32), 1,
                              active & is_open)
    return state.replace(counters=add_counts(state, global_calls=ran))


def latest_latent(spec: ModelSpec, state: EngineState) -> jax.Array:
    """(B,) the patch slot holding the latest latent: the patch of the last committed byte."""
    csum = patch_index(current_starts(spec, state.tokens, state.entropy))
    return _take(csum, jnp.maximum(state.length - 1, 0)) - 1


def draft_step(spec: ModelSpec, params: dict, state: EngineState, token: jax.Array, position: jax.Array,
               latent: jax.Array, active: jax.Array):
    """Encode `token` (B,) at `position` (B,) and decode it against patch slot `latent` (B,): the logits for
    the byte after it. Writes scratch cache entries past `length`, which the verification pass overwrites."""
    blt = nnx.merge(spec.graphdef, params["blt"])
    dtype = state.enc_h.dtype
    tokens = _write_rows(state.tokens, token[:, None], position)
    emb = blt.byte_embeddings(token[:, None], _hash_context(blt, tokens, position), dtype)
    pos = position[:, None]
    h, enc_kv = blt.encode(emb, pos, caches=state.encoder_kv, offset=position)
    logits, dec_kv = blt.decode(h, pos, state.cross_kv, latent[:, None], caches=state.decoder_kv, offset=position)
    one = active.astype(jnp.int32)
    state = state.replace(tokens=tokens, encoder_kv=enc_kv, decoder_kv=dec_kv,
                          counters=add_counts(state, decoder_calls=one, encoder_calls=one))
    return state, logits[:, 0]


def denoise(spec: ModelSpec, params: dict, state: EngineState, cells: jax.Array, latent: jax.Array,
            active: jax.Array):
    """One decoder pass over diffusion cells (B, Bk) at positions length .. length + Bk - 1, all reading patch
    slot `latent`, attending the committed bytes and the whole block: logits (B, Bk, V)."""
    blt = nnx.merge(spec.graphdef, params["blt"])
    dtype = state.enc_h.dtype
    B, Bk = cells.shape
    pos = state.length[:, None] + jnp.arange(Bk)[None, :]
    mask = _block_mask(spec.cfg.decoder.window, pos, state.length, Bk, state.buffer, 0)
    logits, dec_kv = blt.decode(block_embeddings(blt, cells, dtype), pos, state.cross_kv,
                                jnp.broadcast_to(latent[:, None], (B, Bk)), mask=mask, caches=state.decoder_kv,
                                offset=state.length)
    one = active.astype(jnp.int32)
    return state.replace(decoder_kv=dec_kv, counters=add_counts(state, decoder_calls=one)), logits


def rollback(spec: ModelSpec, state: EngineState, length: jax.Array, next_logits: jax.Array) -> EngineState:
    """Keep only the first `length` bytes (B,): lower the lengths; patches closed past them reopen."""
    csum = patch_index(current_starts(spec, state.tokens, state.entropy))
    return state.replace(length=length, num_closed=_take(csum, length) - 1, next_logits=next_logits)
