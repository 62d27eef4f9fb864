"""Building blocks shared by every BLT network: linear maps, RMSNorm, RoPE, self- and cross-attention
layers, SwiGLU, pre-norm blocks (the attention computations themselves live in `blt_jax.model.attention`).

Numerics follow transformers' `Blt*` modules (RMSNorm and RoPE in float32, interleaved-pair RoPE, attention
scale head_dim^-0.5, cross-attention with RMSNorm on queries and keys/values and the double residual).
Every parameter carries logical axis names in its `out_sharding` metadata; `blt_jax.sharding` maps them
onto a device mesh.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from blt_jax.config import StackConfig
from blt_jax.model.attention import CachedMask, KVCache, attention, cached_attention, init_cache, write_cache
from blt_jax.sharding import constrain

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
        scale = self.scale[...].reshape((1,) * (x.ndim - 1) + (-1,))  # over every leading axis
        return scale.astype(x.dtype) * normed.astype(x.dtype)


def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos/sin (..., T, head_dim) for interleaved-pair RoPE, computed in float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.int32).astype(jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq.reshape((1,) * positions.ndim + (-1,))
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


class SelfAttention(nnx.Module):
    def __init__(self, cfg: StackConfig, rngs: nnx.Rngs):
        d, hd = cfg.dim, cfg.head_dim
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, hd
        self.q_proj = Linear(d, cfg.n_heads * hd, ("embed", "q_heads"), rngs, std=d ** -0.5)
        self.k_proj = Linear(d, cfg.kv_heads * hd, ("embed", "kv_heads"), rngs, std=d ** -0.5)
        self.v_proj = Linear(d, cfg.kv_heads * hd, ("embed", "kv_heads"), rngs, std=d ** -0.5)
        self.o_proj = Linear(cfg.n_heads * hd, d, ("q_heads", "embed"), rngs, std=d ** -0.5)

    def __call__(self, x: Array, rope: tuple[Array, Array], mask, cache: Optional[KVCache] = None,
                 write: bool = True):
        """Without a cache: attention over x itself under `mask` (see `attention.attention`). With one: `mask`
        is a `CachedMask`; the queries attend the cache and x's own keys, then x's keys are written (or, with
        `write=False`, returned as a `KVCache` of the chunk for the caller to write: a cache read inside a
        `lax.cond` and written outside it is updated in place, not copied)."""
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.kv_heads, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            out = cached_attention(q, k, v, cache, mask)
            if write:
                # The keys are written after every read of the cache; without a data dependence saying so,
                # XLA's copy insertion keeps the old cache alive with a full copy per step.
                after = (0.0 * jnp.sum(out, dtype=jnp.float32)).astype(k.dtype)
                cache = write_cache(cache, k + after, v + after, mask)
            else:
                cache = KVCache(k, v)
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

    def __call__(self, x, rope, mask, cache=None, write: bool = True):
        h, cache = self.self_attn(self.input_layernorm(x), rope, mask, cache, write)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "act_embed")), cache


def run_block(block: Block, x, rope, mask, cache=None, remat: bool = False, write: bool = True):
    """Apply one block, optionally rematerialised in the backward pass (activation checkpointing)."""
    if not remat:
        return block(x, rope, mask, cache, write)
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


def run_layers(layers, cfg: StackConfig, x, positions, mask, caches: Optional[list] = None, remat: bool = False,
               write: bool = True):
    """Apply a list of blocks; with `caches` (one `KVCache` per layer) and a `CachedMask`, each layer attends its
    cache and keeps the chunk's keys (`write=False`: returns them instead, see `SelfAttention`)."""
    rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    new_caches = []
    for i, layer in enumerate(layers):
        x, c = run_block(layer, x, rope, mask, None if caches is None else caches[i], remat, write)
        new_caches.append(c)
    return x, (new_caches if caches is not None else None)


def init_stack_caches(cfg: StackConfig, batch: int, size: int, dtype=jnp.float32) -> list[KVCache]:
    """One cache of `size` slots per layer of a stack (see `attention.cache_size`)."""
    return [init_cache(batch, cfg.kv_heads, cfg.head_dim, size, dtype) for _ in range(cfg.n_layers)]


def cached_chunk_mask(cfg: StackConfig, positions: Array, length: Array, n_write: Array) -> CachedMask:
    """The usual cached call: consecutive positions from `length`, causal within the stack's window."""
    return CachedMask.causal(positions, length, n_write, cfg.window)


def cast_floating(tree: Any, dtype) -> Any:
    """Cast floating leaves (parameters) to the compute dtype."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
