"""The Byte Latent Transformer: hash n-gram byte embeddings -> local encoder -> patch pooling ->
global transformer over patches -> local decoder cross-attending patch latents -> next-byte logits.

Module tree and parameter shapes mirror transformers' `BltForCausalLM` (names map one to one; kernels are
stored (in, out)). The network is exposed in pieces so that training, the no-cache oracle and the cached
samplers compose the same code:

    byte_embeddings -> encode -> pool_patches -> global_latents -> decoder_cross_kv -> decode

`encode`, `global_latents` and `decode` take optional KV caches with a `CachedMask` (a chunk of positions
against the cache: prefill chunks, one-byte steps, speculative chunks, diffusion blocks), and `decode` takes
per-position latent indices, so bytes can be decoded against any latent.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from blt_jax.config import BLTConfig
from blt_jax.model.hashing import PRIMES, ngram_hash_ids
from blt_jax.model.attention import CachedMask, self_attention_mask
from blt_jax.model.layers import Block, CrossAttention, Embed, Linear, RMSNorm, rope_tables, run_block, run_layers
from blt_jax.patching import PatchIds, patch_ids
from blt_jax.tokenizer import BOS_ID

Array = jax.Array


class WindowContext(NamedTuple):
    """The decoder's inputs for one window: byte states, latent keys/values and the bookkeeping around them."""

    h: Array  # (B, S, De) encoder byte states: the decoder's input
    cross_kv: list  # per decoder cross-attention layer, latent keys/values (see `BLT.decoder_cross_kv`)
    ids: PatchIds
    positions: Array  # (B, S)
    segments: Optional[Array]  # (B, S) document ids, or None without document masking
    contiguous: bool  # positions are 0..S-1


class LocalEncoder(nnx.Module):
    def __init__(self, cfg: BLTConfig, rngs: nnx.Rngs):
        s = cfg.encoder
        self.embed_tokens = Embed(cfg.vocab_size, s.dim, ("vocab", "embed"), rngs)
        self.layers = nnx.List([Block(s, rngs) for _ in range(s.n_layers)])
        self.patch_embedding_projection = Linear(s.dim, s.dim * cfg.cross_attn_k, ("embed", "latent"), rngs)
        n_cross = s.n_layers if cfg.encoder_cross_attn_all_layers else 1
        self.cross_attn_layers = nnx.List([CrossAttention(s, rngs) for _ in range(n_cross)])


class GlobalTransformer(nnx.Module):
    def __init__(self, cfg: BLTConfig, rngs: nnx.Rngs):
        s = cfg.global_model
        self.token_embedding_projection = (
            Linear(cfg.global_input_dim, s.dim, ("latent", "embed"), rngs) if cfg.has_global_projection else None)
        self.layers = nnx.List([Block(s, rngs) for _ in range(s.n_layers)])


class LocalDecoder(nnx.Module):
    def __init__(self, cfg: BLTConfig, rngs: nnx.Rngs):
        s = cfg.decoder
        self.patch_embedding_projection = Linear(cfg.global_model.dim, s.dim * cfg.cross_attn_k,
                                                 ("embed", "latent"), rngs)
        n_cross = s.n_layers if cfg.decoder_cross_attn_all_layers else 1
        self.cross_attn_layers = nnx.List([CrossAttention(s, rngs) for _ in range(n_cross)])
        self.layers = nnx.List([Block(s, rngs) for _ in range(s.n_layers)])
        self.norm = RMSNorm(s.dim, s.norm_eps)


class BLT(nnx.Module):
    def __init__(self, cfg: BLTConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        de = cfg.encoder.dim
        self.local_encoder = LocalEncoder(cfg, rngs)
        n_tables = cfg.hash_functions * len(cfg.hash_ngram_sizes)
        self.encoder_hash_tok_embedding = (
            Embed(n_tables * cfg.hash_vocab, de, ("hash_vocab", "embed"), rngs) if n_tables else None)
        self.global_transformer = GlobalTransformer(cfg, rngs)
        self.local_decoder = LocalDecoder(cfg, rngs)
        self.lm_head = Linear(cfg.decoder.dim, cfg.vocab_size, ("embed", "vocab"), rngs)

    # ---- pieces --------------------------------------------------------------------------------------
    @property
    def hash_context(self) -> int:
        """Previous tokens a chunk needs for its n-gram hashes."""
        return max(self.cfg.hash_ngram_sizes, default=1) - 1

    def byte_embeddings(self, tokens: Array, context: Optional[Array] = None, dtype=jnp.float32) -> Array:
        """Byte embedding + hash n-gram embeddings (summed, unnormalised) for `tokens` (B, T).

        `context` (B, hash_context) holds the tokens just before the chunk (zeros before the sequence
        start, as the reference pads); without it the chunk is taken to start the sequence.
        """
        cfg = self.cfg
        emb = self.local_encoder.embed_tokens(tokens, jnp.float32)
        if self.encoder_hash_tok_embedding is None:
            return emb.astype(dtype)
        full = tokens if context is None else jnp.concatenate([context, tokens], axis=1)
        T = tokens.shape[1]
        table = 0
        for f in range(cfg.hash_functions):
            prime = PRIMES[f % len(PRIMES)]
            for n in cfg.hash_ngram_sizes:
                ids = ngram_hash_ids(full, n, prime, cfg.hash_vocab)[:, -T:] + table * cfg.hash_vocab
                emb = emb + self.encoder_hash_tok_embedding(ids, jnp.float32)
                table += 1
        return emb.astype(dtype)

    def encode(self, emb: Array, positions: Array, segments: Optional[Array] = None, caches=None,
               mask: Optional[CachedMask] = None, remat: bool = False, contiguous: bool = False):
        """Local encoder layers: byte states (B, T, De). `contiguous`: positions are 0..T-1 (no cache). With
        `caches`, `mask` says how the chunk meets them."""
        cfg = self.cfg.encoder
        if caches is None:
            mask = self_attention_mask(positions, cfg.window, segments, contiguous)
        return run_layers(self.local_encoder.layers, cfg, emb, positions, mask, caches, remat)

    def pool_patches(self, h: Array, encoder_ids: Array, num_slots: int) -> Array:
        """Patch embeddings (B, P, k * De): amax-pool each patch's byte states, project into k queries, and
        cross-attend the patch's own bytes (RMSNorm on q and kv; the reference's double residual). Bytes with
        the sentinel id P (truncated) join no patch; empty slots pool to zero."""
        B, S, De = h.shape
        k = self.cfg.cross_attn_k
        seg_max = jax.vmap(lambda x, i: jax.ops.segment_max(x, i, num_segments=num_slots + 1))
        pooled = seg_max(h, encoder_ids)[:, :num_slots]
        pooled = jnp.where(jnp.isneginf(pooled), jnp.zeros_like(pooled), pooled)
        queries = self.local_encoder.patch_embedding_projection(pooled).reshape(B, num_slots, k, De)
        out = self.local_encoder.cross_attn_layers[-1].segmented(queries, h, encoder_ids)  # o + queries
        return (queries + out).reshape(B, num_slots, k * De)

    def global_latents(self, patch_embeds: Array, positions: Array, segments: Optional[Array] = None,
                       caches=None, mask: Optional[CachedMask] = None, remat: bool = False, write: bool = True):
        """Global transformer over patches (no final norm): latents (B, T, Dg). With caches and `write=False`,
        returns the chunk's keys/values per layer instead of updated caches (see `SelfAttention`)."""
        cfg = self.cfg.global_model
        g = self.global_transformer
        x = patch_embeds if g.token_embedding_projection is None else g.token_embedding_projection(patch_embeds)
        if caches is None:
            mask = self_attention_mask(positions, cfg.window, segments)
        return run_layers(g.layers, cfg, x, positions, mask, caches, remat, write)

    def decoder_cross_kv(self, latents: Array) -> list[tuple[Array, Array]]:
        """Per decoder cross-attention layer, keys/values of each latent's k vectors: (B, P, k, KV, hd)."""
        dec = self.local_decoder
        B, P, _ = latents.shape
        proj = dec.patch_embedding_projection(latents).reshape(B, P, self.cfg.cross_attn_k, self.cfg.decoder.dim)
        return [layer.keys_values(proj) for layer in dec.cross_attn_layers]

    def decode(self, h: Array, positions: Array, cross_kv: list, cross_ids: Array, mask=None,
               segments: Optional[Array] = None, caches=None, remat: bool = False, contiguous: bool = False):
        """Local decoder: byte states h (B, T, Dd) -> logits (B, T, V) float32.

        Position t cross-attends the latent `cross_ids[:, t]` (an index into `cross_kv`'s patch axis).
        `mask` overrides the causal self-attention mask (BLT-D layouts); with `caches` it is a `CachedMask`."""
        cfg = self.cfg.decoder
        dec = self.local_decoder
        if mask is None:
            mask = self_attention_mask(positions, cfg.window, segments, contiguous)
        P = cross_kv[0][0].shape[1]
        ids = jnp.clip(cross_ids, 0, P - 1)[:, :, None, None, None]
        gathered = [(jnp.take_along_axis(ck, ids, axis=1), jnp.take_along_axis(cv, ids, axis=1))
                    for ck, cv in cross_kv]
        rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        new_caches = []
        for i, layer in enumerate(dec.layers):
            if i == 0 or self.cfg.decoder_cross_attn_all_layers:
                ck, cv = gathered[i]
                h = h + dec.cross_attn_layers[i].gathered(h, ck.astype(h.dtype), cv.astype(h.dtype))
            h, c = run_block(layer, h, rope, mask, None if caches is None else caches[i], remat)
            new_caches.append(c)
        logits = self.lm_head(dec.norm(h)).astype(jnp.float32)
        return logits, (new_caches if caches is not None else None)

    # ---- the whole model -----------------------------------------------------------------------------
    def context(self, tokens: Array, patch_starts: Array, max_patches: Optional[int] = None,
                positions: Optional[Array] = None, remat: bool = False, dtype=jnp.float32) -> WindowContext:
        """Encoder, patch pooling and global model over a window: everything the decoder reads. Split from
        `__call__` so BLT-D's training layout decodes more than the window's bytes against the same latents."""
        cfg = self.cfg
        B, S = tokens.shape
        P = cfg.patching.max_patches if max_patches is None else max_patches
        contiguous = positions is None
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(S)[None, :], (B, S))
        ids = patch_ids(patch_starts, P)
        seg = jnp.cumsum(tokens == BOS_ID, axis=1) if cfg.document_masking else None

        emb = self.byte_embeddings(tokens, dtype=dtype)
        h, _ = self.encode(emb, positions, seg, remat=remat, contiguous=contiguous)
        patches = self.pool_patches(h, ids.encoder_ids, P)

        patch_pos = jnp.broadcast_to(jnp.arange(P)[None, :], (B, P))
        patch_seg = None
        if seg is not None:  # a patch belongs to the document of its bytes; empty slots inherit the last one
            seg_of = jax.vmap(lambda s, i: jax.ops.segment_max(s, i, num_segments=P + 1))(seg, ids.encoder_ids)
            patch_seg = jax.lax.cummax(jnp.maximum(seg_of[:, :P], 0), axis=1)
        latents, _ = self.global_latents(patches, patch_pos, patch_seg, remat=remat)
        return WindowContext(h, self.decoder_cross_kv(latents), ids, positions, seg, contiguous)

    def __call__(self, tokens: Array, patch_starts: Array, max_patches: Optional[int] = None,
                 positions: Optional[Array] = None, remat: bool = False, dtype=jnp.float32):
        """Teacher-forced forward. tokens (B, S); patch_starts (B, S + 1) bool (see `blt_jax.patching`).

        Returns (logits (B, S, V) float32, PatchIds). Bytes past `max_patches` patches are not pooled and
        marked invalid in the PatchIds (their logits are meaningless)."""
        ctx = self.context(tokens, patch_starts, max_patches, positions, remat, dtype)
        logits, _ = self.decode(ctx.h, ctx.positions, ctx.cross_kv, ctx.ids.decoder_ids, segments=ctx.segments,
                                remat=remat, contiguous=ctx.contiguous)
        return logits, ctx.ids

