"""Model numerics: attention paths agree, the model is causal, cached pieces equal the full forward,
and the paper-size presets have the paper's parameter counts."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from blt_jax import model as model_lib
from blt_jax.config import BLTConfig, get_preset
from blt_jax.generation.forward import compute_patch_starts, forward
from blt_jax.generation.loaded import from_params
from blt_jax.model.attention import CachedMask, KVCache, LocalMask, attention, cached_attention, causal_mask
from blt_jax.model.layers import cached_chunk_mask, cast_floating, init_stack_caches
from blt_jax.objectives import blt_loss
from blt_jax.patching import patch_ids
from blt_jax.tokenizer import BOS_ID


def tiny_cfg(**patching) -> BLTConfig:
    cfg = get_preset("tiny").model
    return dataclasses.replace(cfg, patching=dataclasses.replace(cfg.patching, threshold=4.5, **patching))


def random_tokens(B, S, seed=0):
    t = np.random.default_rng(seed).integers(4, 260, (B, S))
    t[:, 0] = BOS_ID
    return jnp.asarray(t)


def loaded(cfg, seed=0):
    _, params = model_lib.build(cfg, seed)
    _, eparams = model_lib.build(cfg.entropy_model, seed + 1)
    # sharpen the random entropy model so patches get mixed lengths (as the HF test model does)
    eparams["lm_head"]["kernel"].set_value(eparams["lm_head"]["kernel"][...] * 8.0)
    return from_params(cfg, params, eparams)


# ---- attention ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [pytest.param(4, marks=pytest.mark.slow), 1])  # 1: grouped queries too
@pytest.mark.parametrize("with_segments", [False, True])
@pytest.mark.parametrize("S,W", [(64, 16), (512, 512), (512, 200)])  # block-local; triangular (two windows)
def test_windowed_attention_paths_equal_dense(kv_heads, with_segments, S, W):
    B, H, D = 2, 4, 8
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, S, H, D))
    k = jax.random.normal(keys[1], (B, S, kv_heads, D))
    v = jax.random.normal(keys[2], (B, S, kv_heads, D))
    seg = jnp.asarray(np.cumsum(np.random.default_rng(1).random((B, S)) < 0.05, axis=1)) if with_segments else None
    pos = jnp.broadcast_to(jnp.arange(S)[None], (B, S))
    dense = attention(q, k, v, causal_mask(pos, pos, W, seg, seg))
    local = attention(q, k, v, LocalMask(seg, W))
    chex.assert_trees_all_close(local, dense, atol=1e-5)


@pytest.mark.parametrize("lengths", [(10, 40, 3, 60), (10, 150, 3, 290)])  # prefix 64, and the whole cache
def test_cached_attention_of_some_rows_reads_their_prefix_only(lengths):
    """A compacted step's queries (rows [3, 1] of a 4-row cache of 300 unwindowed slots) attend exactly their
    own row's keys before its length and their chunk's own keys, whichever power-of-two prefix is read."""
    B, R, T, H, KV, D = 4, 300, 2, 4, 2, 8
    keys = jax.random.split(jax.random.key(3), 5)
    ck, cv = jax.random.normal(keys[0], (B, R, KV, D)), jax.random.normal(keys[1], (B, R, KV, D))
    rows = jnp.asarray([3, 1])
    q = jax.random.normal(keys[2], (2, T, H, D))
    kn, vn = jax.random.normal(keys[3], (2, T, KV, D)), jax.random.normal(keys[4], (2, T, KV, D))
    length = jnp.asarray(lengths)[rows]
    q_pos = length[:, None] + jnp.arange(T)[None, :]
    mask = CachedMask.causal(q_pos, length, jnp.full((2,), T), None).replace(rows=rows)
    cache = KVCache(ck.transpose(0, 2, 3, 1), cv.transpose(0, 2, 1, 3))
    got = jax.jit(cached_attention)(q, kn, vn, cache, mask)
    for i, r in enumerate(rows.tolist()):
        n = lengths[r]
        k = jnp.concatenate([ck[r, :n], kn[i]])[None]
        v = jnp.concatenate([cv[r, :n], vn[i]])[None]
        pos = jnp.arange(n + T)[None]
        want = attention(q[i:i + 1], k, v, causal_mask(pos[:, n:], pos, None))
        chex.assert_trees_all_close(got[i:i + 1], want, atol=1e-5)


# ---- pooling --------------------------------------------------------------------------------------------------

def test_segmented_pooling_equals_dense_masked_cross_attention():
    """Patch pooling computes scores only for (byte, own patch) pairs; it must equal plain cross-attention
    of every patch query over all bytes with a patch-membership mask (the reference's formulation)."""
    cfg = tiny_cfg()
    model = nnx.merge(*model_lib.build(cfg))
    B, S, P, k, D = 2, 32, 20, cfg.cross_attn_k, cfg.encoder.dim
    h = jax.random.normal(jax.random.key(3), (B, S, D))
    starts = np.zeros((B, S + 1), bool)
    starts[:, [0, 1, 3, 7, 8, 11, 15, 16, 20, 24, 27, 31, 32]] = True  # patches of 1..4 bytes, trailing empty
    starts[1, [5, 26]] = True
    ids = patch_ids(jnp.asarray(starts), P).encoder_ids
    got = model.pool_patches(h, ids, P).reshape(B, P, k, D)

    enc = model.local_encoder
    member = ids[:, None, :] == jnp.arange(P)[None, :, None]  # (B, P, S)
    pooled = jnp.max(jnp.where(member[..., None], h[:, None], -jnp.inf), axis=2)
    pooled = jnp.where(jnp.isneginf(pooled), 0.0, pooled)
    queries = enc.patch_embedding_projection(pooled).reshape(B, P * k, D)
    cross = enc.cross_attn_layers[-1]
    kk, vv = cross.keys_values(h)
    mask = jnp.repeat(member, k, axis=1)  # query (p, j) sees patch p's bytes
    o = attention(cross.queries(queries), kk, vv, mask).reshape(B, P * k, D)
    want = (2 * queries + cross.o_proj(o)).reshape(B, P, k, D)  # the double residual
    n = int(starts[0, :S].sum())  # non-empty patches agree; empty slots are never read
    chex.assert_trees_all_close(got[0, :n], want[0, :n], atol=1e-5)
    chex.assert_trees_all_close(got[1, :n + 2], want[1, :n + 2], atol=1e-5)


# ---- causality ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["entropy", "static", "space"])
def test_changing_a_byte_never_changes_earlier_logits(mode):
    cfg = tiny_cfg(mode=mode, max_patch_length=6)
    m = loaded(cfg)
    S = 48
    tokens = random_tokens(1, S, seed=4)
    starts = compute_patch_starts(m.spec, m.all_params(), tokens)
    n = int(starts[0, :S].sum())
    assert 6 < n < S, "patches should have mixed lengths for this test to mean something"
    fwd = jax.jit(lambda p, t: forward(m.spec, p, t)[0])
    base = fwd(m.all_params(), tokens)
    for t in (5, 20, 33, 47):
        changed = tokens.at[0, t].set((tokens[0, t] - 4 + 97) % 256 + 4)
        logits = fwd(m.all_params(), changed)
        np.testing.assert_allclose(np.asarray(logits[0, :t]), np.asarray(base[0, :t]), atol=1e-5,
                                   err_msg=f"logits before byte {t} moved")
        assert not np.allclose(np.asarray(logits[0, t:]), np.asarray(base[0, t:]), atol=1e-5)


# ---- cached pieces equal the full forward ---------------------------------------------------------------------

def _chunks(S):
    return [(0, 11), (11, 12), (12, 13), (13, 20), (20, S)]  # a prefill, single steps, a longer chunk


@pytest.mark.parametrize("window,slots", [(64, 48), (8, 9)])
def test_entropy_model_cache_equals_forward(window, slots):
    """Chunks and single steps against a KV cache reproduce the full forward, also when the cache is a ring of
    window + 1 slots that the 40 positions wrap around several times (chunks longer than the ring included)."""
    cfg = tiny_cfg().entropy_model
    cfg = dataclasses.replace(cfg, stack=dataclasses.replace(cfg.stack, window=window))
    graphdef, params = model_lib.build(cfg)
    B, S = 2, 40
    tokens = random_tokens(B, S)
    full, _ = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)
    step = jax.jit(lambda p, t, pos, c, off: nnx.merge(graphdef, p)(
        t, pos, c, cached_chunk_mask(cfg.stack, pos, off, jnp.full(off.shape, t.shape[1]))))
    caches = init_stack_caches(cfg.stack, B, slots)
    for a, b in _chunks(S):
        pos = jnp.broadcast_to(jnp.arange(a, b)[None], (B, b - a))
        out, caches = step(params, tokens[:, a:b], pos, caches, jnp.full((B,), a, jnp.int32))
        chex.assert_trees_all_close(out, full[:, a:b], atol=2e-5)


def test_blt_pieces_with_caches_equal_forward():
    """Encoder, global model and decoder each run chunk by chunk against KV caches (prefill, then one-step
    decodes), bytes decoded against fixed latents, and reproduce the teacher-forced forward."""
    cfg = tiny_cfg(max_patch_length=5)
    m = loaded(cfg)
    blt = nnx.merge(m.spec.graphdef, m.params)
    B, S = 2, 40
    tokens = random_tokens(B, S, seed=2)
    starts = compute_patch_starts(m.spec, m.all_params(), tokens)
    full_logits, ids = blt(tokens, starts, max_patches=S + 1)
    P = S + 1

    # reference intermediate values from the uncached pieces
    emb = blt.byte_embeddings(tokens)
    pos = jnp.broadcast_to(jnp.arange(S)[None], (B, S))
    seg = jnp.cumsum(tokens == BOS_ID, axis=1)
    h_full, _ = blt.encode(emb, pos, seg)
    patches = blt.pool_patches(h_full, ids.encoder_ids, P)
    latents_full, _ = blt.global_latents(patches, jnp.broadcast_to(jnp.arange(P)[None], (B, P)))

    gd, params = m.spec.graphdef, m.params

    def chunk_mask(stack, positions, offset):
        return cached_chunk_mask(stack, positions, offset, jnp.full(offset.shape, positions.shape[1]))

    @jax.jit
    def encode_chunk(p, toks, context, positions, caches, offset):
        net = nnx.merge(gd, p)
        e = net.byte_embeddings(toks, context)
        return (e,) + net.encode(e, positions, caches=caches, mask=chunk_mask(cfg.encoder, positions, offset))

    @jax.jit
    def global_step(p, patch, positions, caches, offset):
        return nnx.merge(gd, p).global_latents(patch, positions, caches=caches,
                                               mask=chunk_mask(cfg.global_model, positions, offset))

    @jax.jit
    def decode_step(p, h, positions, latent, caches, offset):
        net = nnx.merge(gd, p)  # one byte against one fixed latent
        return net.decode(h, positions, net.decoder_cross_kv(latent), jnp.zeros((B, 1), jnp.int32),
                          mask=chunk_mask(cfg.decoder, positions, offset), caches=caches)

    # encoder: hash context + KV cache, chunk by chunk
    enc_caches = init_stack_caches(cfg.encoder, B, 48)
    ctx_len = blt.hash_context
    hs = []
    for a, b in _chunks(S):
        context = jnp.pad(tokens, ((0, 0), (ctx_len, 0)))[:, a:a + ctx_len]
        e, h, enc_caches = encode_chunk(params, tokens[:, a:b], context, pos[:, a:b], enc_caches,
                                        jnp.full((B,), a, jnp.int32))
        chex.assert_trees_all_close(e, emb[:, a:b], atol=1e-6)
        hs.append(h)
    h_cached = jnp.concatenate(hs, axis=1)
    chex.assert_trees_all_close(h_cached, h_full, atol=2e-5)

    # global model: one patch at a time against its KV cache
    n = int(jnp.max(ids.num_patches))
    g_caches = init_stack_caches(cfg.global_model, B, 48)
    lat = []
    for p in range(n):
        out, g_caches = global_step(params, patches[:, p:p + 1], jnp.full((B, 1), p), g_caches,
                                    jnp.full((B,), p, jnp.int32))
        lat.append(out)
    chex.assert_trees_all_close(jnp.concatenate(lat, axis=1), latents_full[:, :n], atol=2e-5)

    # decoder: per chunk, each byte against its own latent only (a one-latent cross-attention source)
    d_caches = init_stack_caches(cfg.decoder, B, 48)
    cross_all = blt.decoder_cross_kv(latents_full)
    for t in range(S):
        one = jnp.take_along_axis(latents_full, ids.decoder_ids[:, t, None, None], axis=1)  # (B, 1, Dg)
        logits, d_caches = decode_step(params, h_full[:, t:t + 1], pos[:, t:t + 1], one, d_caches,
                                       jnp.full((B,), t, jnp.int32))
        chex.assert_trees_all_close(logits[:, 0], full_logits[:, t], atol=5e-5)
    assert len(cross_all) == cfg.decoder.n_layers  # cross-attention before every decoder layer


# ---- presets ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,glob,enc,dec", [("fast-blt-1b", 1.28e9, 19e6, 160e6),
                                                  ("fast-blt-3b", 2.82e9, 26e6, 160e6)])
def test_paper_parameter_counts(preset, glob, enc, dec):
    c = model_lib.param_counts(get_preset(preset).model)
    assert abs(c["global"] - glob) / glob < 0.01
    assert abs(c["encoder"] - enc) / enc < 0.03
    assert abs(c["decoder"] - dec) / dec < 0.02


def test_released_blt_1b_shapes():
    c = model_lib.param_counts(get_preset("blt-1b").model)
    assert c["hash_embeddings"] == 6 * 500_002 * 1024
    assert abs(c["entropy_model"] - 99.5e6) / 99.5e6 < 0.01  # 14 x 768, the released blt-entropy


def test_every_parameter_has_logical_axis_names():
    _, state = model_lib.abstract_state(get_preset("tiny").model)
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), path


@pytest.mark.slow
def test_bfloat16_compute_tracks_float32():
    cfg = tiny_cfg()
    graphdef, params = model_lib.build(cfg)
    tokens = random_tokens(2, 32)
    starts = jnp.zeros((2, 33), bool).at[:, ::3].set(True).at[:, 1].set(True)
    f32 = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens, starts)[0])(params)
    b16 = jax.jit(lambda p: nnx.merge(graphdef, cast_floating(p, jnp.bfloat16))(
        tokens, starts, dtype=jnp.bfloat16)[0])(params)
    p32, p16 = jax.nn.softmax(f32), jax.nn.softmax(b16)
    assert float(jnp.abs(p32 - p16).max()) < 0.02
    assert float(jnp.mean(jnp.argmax(f32, -1) == jnp.argmax(b16, -1))) > 0.9


@pytest.mark.slow
def test_remat_gives_identical_gradients():
    cfg = tiny_cfg()
    graphdef, params = model_lib.build(cfg)
    tokens = random_tokens(2, 32)
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "loss_mask": jnp.ones((2, 32)),
             "patch_starts": jnp.zeros((2, 33), bool).at[:, ::4].set(True).at[:, 1].set(True)}

    def grad(remat):
        return jax.jit(jax.grad(lambda p: blt_loss(nnx.merge(graphdef, p), batch, None, remat, jnp.float32)[0]))(params)

    chex.assert_trees_all_close(grad(True), grad(False), atol=1e-5)
