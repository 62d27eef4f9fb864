"""Building blocks shared by every BLT network: linear maps, RMSNorm, RoPE, attention, SwiGLU, KV caches.

Numerics follow transformers' `Blt*` modules (RMSNorm and RoPE in float32, interleaved-pair RoPE, attention
scale head_dim^-0.5, cross-attention with RMSNorm on queries and keys/values and the double residual).
Every parameter carries logical axis names in its `out_sharding` metadata; `blt_jax.sharding` maps them
onto a device mesh.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from blt_jax.config import StackConfig
from blt_jax.sharding import constrain

if TYPE_CHECKING:  # block_attention builds on this module
    from blt_jax.model.block_attention import BlockDiffusionMask

Array = jax.Array


def trunc_normal(std: float):
    """Truncated normal at +-3 sigma (the reference/HF init)."""
    base = jax.nn.initializers.truncated_normal(stddev=1.0, lower=-3.0, upper=3.0)

    def init(key, shape, dtype=jnp.float32):
        return base(key, shape, dtype) * jnp.asarray(std, dtype)

    return init


def _param(rngs: nnx.Rngs, shape: Sequence[int], std: float, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(trunc_normal(std)(rngs.params(), tuple(shape)), out_sharding=axes)


class Linear(nnx.Module):
    """Bias-free linear map; kernel stored (in, out)."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], rngs: nnx.Rngs, std: Optional[float] = None):
        self.kernel = _param(rngs, (d_in, d_out), d_in ** -0.5 if std is None else std, axes)

    def __call__(self, x: Array) -> Array:
        w = self.kernel[...].astype(x.dtype)
        # a 2-D matmul: XLA:CPU runs the backward of the flattened form about twice as fast
        return (x.reshape(-1, x.shape[-1]) @ w).reshape(x.shape[:-1] + (w.shape[1],))


class Embed(nnx.Module):
    def __init__(self, num: int, dim: int, axes: tuple[str, str], rngs: nnx.Rngs, std: Optional[float] = None):
        self.embedding = _param(rngs, (num, dim), dim ** -0.5 if std is None else std, axes)

    def __call__(self, ids: Array, dtype=jnp.float32) -> Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("norm",))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos/sin (..., T, head_dim) for interleaved-pair RoPE, computed in float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.int32).astype(jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.repeat(freqs, 2, axis=-1)  # (..., T, head_dim): pairs (2i, 2i+1) share a frequency
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x (B, T, H, D); rotates consecutive pairs (x0, x1) -> (x0 c - x1 s, x1 c + x0 s)."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    rot = jnp.stack([-x2, x1], axis=-1).reshape(x.shape)
    c = cos[:, :, None, :].astype(x.dtype)
    s = sin[:, :, None, :].astype(x.dtype)
    return x * c + rot * s


@flax.struct.dataclass
class LocalMask:
    """A sliding-window causal mask over a contiguous sequence (positions 0..S-1), optionally restricted to
    documents: described, not materialised, so attention can skip the blocks it never needs."""

    segments: Optional[Array]  # (B, S) document ids, or None
    window: int = flax.struct.field(pytree_node=False)

    def dense(self, S: int, batch: int) -> Array:
        pos = jnp.broadcast_to(jnp.arange(S)[None, :], (batch, S))
        return causal_mask(pos, pos, self.window, self.segments, self.segments)


CAUSAL_BLOCK = 128  # query block of triangular attention


def attention(q: Array, k: Array, v: Array, mask: "Array | LocalMask | BlockDiffusionMask") -> Array:
    """Scaled dot-product attention with GQA. q (B,T,H,D), k/v (B,S,KV,D); mask (B,T,S) bool, LocalMask, or
    BLT-D's BlockDiffusionMask (`blt_jax.model.block_attention`).

    The single place self-attention is computed, so a fused kernel can replace it. A LocalMask (a sliding
    causal window over a training window) never materialises what it masks: over several windows, block-local
    attention computes S x 2W scores instead of S x S; otherwise query blocks skip the causal upper triangle.
    Rows with no visible key get a uniform average (as transformers' additive finfo.min masks do); callers
    never read such rows.
    """
    from blt_jax.model import block_attention  # noqa: PLC0415 (it builds on this module)

    if isinstance(mask, block_attention.BlockDiffusionMask):
        return block_attention.block_diffusion_attention(q, k, v, mask)
    if isinstance(mask, LocalMask):
        S = k.shape[1]
        if S % mask.window == 0 and S >= 2 * mask.window:
            return _block_local_attention(q, k, v, mask)
        if S % CAUSAL_BLOCK == 0 and S >= 2 * CAUSAL_BLOCK:
            return _triangular_attention(q, k, v, mask)
        mask = mask.dense(S, q.shape[0])
    return _dense_attention(q, k, v, mask)


def _dense_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """On GPU `jax.nn.dot_product_attention` (cuDNN where it applies); elsewhere explicit batched matmuls
    (on XLA:CPU 1.3-1.6x faster than the library's generic path)."""
    if jax.default_backend() == "gpu":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :])
    B, T, H, D = q.shape
    KV = k.shape[2]
    qt = q.reshape(B, T, KV, H // KV, D).transpose(0, 2, 3, 1, 4)  # (B, KV, g, T, D)
    kt = k.transpose(0, 2, 1, 3)[:, :, None]  # (B, KV, 1, S, D)
    vt = v.transpose(0, 2, 1, 3)[:, :, None]
    probs = _masked_softmax(jnp.matmul(qt, kt.swapaxes(-1, -2)), mask[:, None, None], D).astype(v.dtype)
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
        outs.append(_dense_attention(q[:, q0:q1], k[:, lo:q1], v[:, lo:q1], m))
    return jnp.concatenate(outs, axis=1)


def _masked_softmax(scores: Array, mask: Array, head_dim: int) -> Array:
    scores = scores.astype(jnp.float32) * (head_dim ** -0.5)
    return jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)


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
    allowed = allowed[None, None] & ((jnp.arange(nb) > 0)[:, None, None] | (ki >= W))[None]  # no block -1
    if mask.segments is not None:
        seg = mask.segments.reshape(B, nb, W)
        allowed = allowed & (seg[..., :, None] == with_previous(seg, -1)[..., None, :])
    probs = _masked_softmax(jnp.matmul(qb, kb.swapaxes(-1, -2)), allowed[:, :, None, None], D).astype(v.dtype)
    out = jnp.matmul(probs, vb)  # (B, nb, KV, g, W, D)
    return out.transpose(0, 1, 4, 2, 3, 5).reshape(B, S, H, D)


class LayerCache(NamedTuple):
    """KV cache of one self-attention layer: slot index == position. Stored in the layouts the two attention
    matmuls read without a transpose (q @ k: k as (D, S); probs @ v: v as (S, D)), so a decode step never
    copies the whole cache (XLA:CPU would, per layer and step)."""

    k: Array  # (B, KV, D, S_max)
    v: Array  # (B, KV, S_max, D)

    @property
    def length(self) -> int:
        return self.v.shape[2]


def write_cache(cache: LayerCache, k: Array, v: Array, offset: Array) -> LayerCache:
    """Write k/v (B, T, KV, D) at per-row slot `offset` (B,)."""
    put = lambda c, u, at: jax.lax.dynamic_update_slice(c, u.astype(c.dtype), at)  # noqa: E731
    new_k = jax.vmap(lambda c, u, i: put(c, u.transpose(1, 2, 0), (0, 0, i)))(cache.k, k, offset)
    new_v = jax.vmap(lambda c, u, i: put(c, u.swapaxes(0, 1), (0, i, 0)))(cache.v, v, offset)
    return LayerCache(new_k, new_v)


def cached_attention(q: Array, cache: LayerCache, mask: Array) -> Array:
    """Attention of q (B, T, H, D) over a whole cache (`LayerCache`) under mask (B, T, S), with GQA: explicit
    batched matmuls on every backend (T is a step or a chunk; the cache stays in its layout)."""
    B, T, H, D = q.shape
    KV = cache.v.shape[1]
    qt = q.reshape(B, T, KV, H // KV, D).transpose(0, 2, 3, 1, 4).reshape(B, KV, (H // KV) * T, D)
    k, v = cache.k.astype(q.dtype), cache.v.astype(q.dtype)
    scores = jnp.matmul(qt, k).reshape(B, KV, H // KV, T, -1)
    probs = _masked_softmax(scores, mask[:, None, None], D).astype(v.dtype).reshape(B, KV, (H // KV) * T, -1)
    out = jnp.matmul(probs, v).reshape(B, KV, H // KV, T, D)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: StackConfig, rngs: nnx.Rngs):
        d, hd = cfg.dim, cfg.head_dim
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, hd
        self.q_proj = Linear(d, cfg.n_heads * hd, ("embed", "q_heads"), rngs, std=d ** -0.5)
        self.k_proj = Linear(d, cfg.kv_heads * hd, ("embed", "kv_heads"), rngs, std=d ** -0.5)
        self.v_proj = Linear(d, cfg.kv_heads * hd, ("embed", "kv_heads"), rngs, std=d ** -0.5)
        self.o_proj = Linear(cfg.n_heads * hd, d, ("q_heads", "embed"), rngs, std=d ** -0.5)

    def __call__(self, x: Array, rope: tuple[Array, Array], mask: Array,
                 cache: Optional[LayerCache] = None, offset: Optional[Array] = None):
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.kv_heads, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            cache = write_cache(cache, k, v, offset)
            out = cached_attention(q, cache, mask)
        else:
            out = attention(q, k, v, mask)
        out = out.reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(out), cache


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs):
        self.gate_proj = Linear(dim, hidden, ("embed", "mlp"), rngs, std=dim ** -0.5)
        self.up_proj = Linear(dim, hidden, ("embed", "mlp"), rngs, std=dim ** -0.5)
        self.down_proj = Linear(hidden, dim, ("mlp", "embed"), rngs, std=hidden ** -0.5)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """Pre-norm transformer layer: x += attn(norm(x)); x += mlp(norm(x))."""

    def __init__(self, cfg: StackConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = SelfAttention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg.dim, cfg.ffn_dim, rngs)

    def __call__(self, x, rope, mask, cache=None, offset=None):
        h, cache = self.self_attn(self.input_layernorm(x), rope, mask, cache, offset)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "act_embed")), cache


def run_block(block: Block, x, rope, mask, cache=None, offset=None, remat: bool = False):
    """Apply one block, optionally rematerialised in the backward pass (activation checkpointing)."""
    if not remat:
        return block(x, rope, mask, cache, offset)
    graphdef, state = nnx.split(block)

    @jax.checkpoint
    def f(state, x, rope, mask):
        return nnx.merge(graphdef, state)(x, rope, mask)[0]

    return f(state, x, rope, mask), cache


class CrossAttention(nnx.Module):
    """transformers' BltCrossAttention: RMSNorm on q and kv, no RoPE, returns out + queries."""

    def __init__(self, cfg: StackConfig, rngs: nnx.Rngs):
        d, hd = cfg.dim, cfg.head_dim
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, hd
        self.q_norm = RMSNorm(d, cfg.norm_eps)
        self.k_norm = RMSNorm(d, cfg.norm_eps)
        self.q_proj = Linear(d, cfg.n_heads * hd, ("embed", "q_heads"), rngs, std=d ** -0.5)
        self.k_proj = Linear(d, cfg.kv_heads * hd, ("embed", "kv_heads"), rngs, std=d ** -0.5)
        self.v_proj = Linear(d, cfg.kv_heads * hd, ("embed", "kv_heads"), rngs, std=d ** -0.5)
        self.o_proj = Linear(cfg.n_heads * hd, d, ("q_heads", "embed"), rngs, std=d ** -0.5)

    def keys_values(self, kv_states: Array) -> tuple[Array, Array]:
        """kv_states (..., N, D) -> k, v (..., N, KV, hd)."""
        h = self.k_norm(kv_states)
        shape = kv_states.shape[:-1] + (self.kv_heads, self.head_dim)
        return self.k_proj(h).reshape(shape), self.v_proj(h).reshape(shape)

    def queries(self, x: Array) -> Array:
        return self.q_proj(self.q_norm(x)).reshape(x.shape[:-1] + (self.n_heads, self.head_dim))

    def segmented(self, x: Array, kv_states: Array, ids: Array) -> Array:
        """Patch queries attend only their own bytes. x (B, P, N, D): N queries per patch; kv_states (B, S, D);
        ids (B, S): the patch of each byte (P = a byte in no patch). Scores exist only for (byte, own patch)
        pairs, so the cost is linear in S (a dense patch-by-byte mask would cost P x S); the softmax over each
        patch's bytes is taken with segment reductions. Patches without bytes get o = 0."""
        B, P, N, _ = x.shape
        KV, g, hd = self.kv_heads, self.n_heads // self.kv_heads, self.head_dim
        q = self.queries(x).reshape(B, P, N, KV, g, hd)
        q = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # slot P: bytes in no patch
        k, v = self.keys_values(kv_states)  # (B, S, KV, hd)
        q_t = jnp.take_along_axis(q, ids[:, :, None, None, None, None], axis=1)  # (B, S, N, KV, g, hd)
        logits = jnp.einsum("bsnkgd,bskd->bsnkg", q_t, k).astype(jnp.float32) * (hd ** -0.5)
        per_patch = lambda f: jax.vmap(lambda d, i: f(d, i, num_segments=P + 1))  # noqa: E731
        peak = jax.lax.stop_gradient(per_patch(jax.ops.segment_max)(logits, ids))
        e = jnp.exp(logits - jnp.take_along_axis(peak, ids[:, :, None, None, None], axis=1))
        denom = per_patch(jax.ops.segment_sum)(e, ids)[:, :P]
        num = per_patch(jax.ops.segment_sum)(e[..., None] * v[:, :, None, :, None, :].astype(jnp.float32), ids)[:, :P]
        out = (num / jnp.maximum(denom, 1e-30)[..., None]).astype(x.dtype).reshape(B, P, N, -1)
        return self.o_proj(out) + x

    def gathered(self, x: Array, k: Array, v: Array) -> Array:
        """Each query position attends only its own keys: x (B,T,D), k/v (B,T,N,KV,hd).

        Equal to masked attention over all keys with a mask that admits only these, at a fraction of the cost.
        """
        B, T, _ = x.shape
        q = self.queries(x)  # (B,T,H,hd)
        g = self.n_heads // self.kv_heads
        qg = q.reshape(B, T, self.kv_heads, g, self.head_dim)
        logits = jnp.einsum("btkgd,btnkd->btkgn", qg, k).astype(jnp.float32) * (self.head_dim ** -0.5)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("btkgn,btnkd->btkgd", probs, v).reshape(B, T, -1)
        return self.o_proj(out) + x


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


def run_layers(layers, cfg: StackConfig, x, positions, mask, caches: Optional[list] = None, offset=None,
               remat: bool = False):
    """Apply a list of blocks; with `caches`, each layer writes its k/v at `offset` and attends the cache."""
    rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    new_caches = []
    for i, layer in enumerate(layers):
        x, c = run_block(layer, x, rope, mask, None if caches is None else caches[i], offset, remat)
        new_caches.append(c)
    return x, (new_caches if caches is not None else None)


def self_attention_mask(positions: Array, window: Optional[int], segments: Optional[Array] = None,
                        cache_len: Optional[int] = None, contiguous: bool = False) -> "Array | LocalMask":
    """Mask for a chunk of queries at `positions` (B,T): over the chunk itself, or over a KV cache.
    `contiguous` declares positions == 0..T-1 (training windows), which allows block-local attention."""
    if cache_len is None:
        if contiguous and window is not None:
            return LocalMask(segments, window)
        return causal_mask(positions, positions, window, segments, segments)
    slots = jnp.broadcast_to(jnp.arange(cache_len)[None, :], (positions.shape[0], cache_len))
    return causal_mask(positions, slots, window)


def init_caches(cfg: StackConfig, batch: int, length: int, dtype=jnp.float32) -> list[LayerCache]:
    k_shape = (batch, cfg.kv_heads, cfg.head_dim, length)
    v_shape = (batch, cfg.kv_heads, length, cfg.head_dim)
    return [LayerCache(jnp.zeros(k_shape, dtype), jnp.zeros(v_shape, dtype)) for _ in range(cfg.n_layers)]


def cast_floating(tree: Any, dtype) -> Any:
    """Cast floating leaves (parameters) to the compute dtype."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
