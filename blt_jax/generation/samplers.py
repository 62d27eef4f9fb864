"""Cached generation methods, each one `lax.while_loop` compiled once per (batch, length) bucket:

- ``ar``  BLT with KV caches in all four networks; the global model runs only when a patch closes.
- ``s``   BLT-S: draft k bytes with encoder + decoder against the latest latent, verify them with one full
          pass, keep the longest agreeing prefix (the verifier's own byte follows it). Output == ``ar``.
- ``d``   BLT-D (Algorithm 1): B [MASK] cells after the text, unmasked over a few decoder passes, then
          committed; the commit pass also computes the next latent and the next block's first decoder pass.
- ``dv``  BLT-DV: a BLT-D draft of B cells, verified like BLT-S. Output == the model's own ``ar``.

Bytes are chosen with position-keyed randomness (`sampling.position_keys`), so under sampling too every
verified method reproduces ``ar`` exactly whenever it sees the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from blt_jax import sharding
from blt_jax.config import ConfigError
from blt_jax.generation import engine
from blt_jax.generation.model import ModelSpec
from blt_jax.generation.sampling import SamplingConfig, choose, position_keys
from blt_jax.generation.unmasking import UnmaskConfig, cells_to_commit
from blt_jax.tokenizer import EOS_ID, MASK_ID

Method = Literal["ar", "s", "d", "dv"]


@dataclass(frozen=True)
class MethodConfig:
    method: Method = "ar"
    draft_len: int = 8  # BLT-S: k bytes drafted per round
    block_size: int = 8  # BLT-D / BLT-DV: B cells per block
    unmask: UnmaskConfig = field(default_factory=UnmaskConfig)

    def __post_init__(self):
        if self.method not in ("ar", "s", "d", "dv"):
            raise ConfigError(f"method: must be one of ar, s, d, dv, got {self.method!r}")
        if self.draft_len < 1:
            raise ConfigError(f"draft_len: must be >= 1, got {self.draft_len}")
        if self.block_size < 1:
            raise ConfigError(f"block_size: must be >= 1, got {self.block_size}")

    @property
    def lookahead(self) -> int:
        """Positions a round may write past the committed text (buffers are sized with this slack)."""
        return {"ar": 1, "s": self.draft_len + 1, "d": 2 * self.block_size, "dv": self.block_size}[self.method]


class Carry(NamedTuple):
    state: engine.EngineState
    start: jax.Array  # (B,) prompt lengths
    ended: jax.Array  # (B,) emitted EOS or filled the buffer: finished for good
    cells: jax.Array  # (B, Bk) BLT-D: the block being denoised
    block_logits: jax.Array  # (B, Bk, V) BLT-D: the latest decoder pass over it


def _done(c: Carry, max_new: jax.Array) -> jax.Array:
    return c.ended | (c.state.length - c.start >= max_new)


def _ended(ended, length, committed, n, S, lookahead, stop_at_eos):
    """Rows end for good at the buffer's end, or (optionally) once they emitted EOS."""
    ended = ended | (length + lookahead > S)
    if stop_at_eos:
        ended = ended | jnp.any((committed == EOS_ID) & (jnp.arange(committed.shape[1])[None, :] < n[:, None]), -1)
    return ended


def _cut_at_eos(tokens: jax.Array, n: jax.Array, stop_at_eos: bool) -> jax.Array:
    """Commit no byte past the first EOS (it is committed itself)."""
    if not stop_at_eos:
        return n
    idx = jnp.arange(tokens.shape[1])[None, :]
    first = jnp.min(jnp.where((tokens == EOS_ID) & (idx < n[:, None]), idx, tokens.shape[1]), axis=1)
    return jnp.minimum(n, first + 1)


def _verify(spec, params, st, chunk, n, rngs, sampling, stop_at_eos):
    """One full pass over chunk[:, :n] (chunk[:, 0] is the model's own next byte). Keeps chunk[:, 0] and the
    drafted bytes up to the first one the verifier would not have chosen; returns (state, kept, accepted)."""
    L = st.length
    st, logits, _ = engine.extend(spec, params, st, chunk, n)
    T = chunk.shape[1]
    picks = choose(logits, position_keys(rngs, L[:, None] + 1 + jnp.arange(T)[None, :]), sampling)
    agree = (chunk[:, 1:] == picks[:, :-1]) & (jnp.arange(1, T)[None, :] < n[:, None])
    accepted = jnp.sum(jnp.cumprod(agree.astype(jnp.int32), axis=1), axis=1)
    kept = _cut_at_eos(chunk, jnp.minimum(1 + accepted, n), stop_at_eos)
    next_logits = jnp.take_along_axis(logits, jnp.maximum(kept - 1, 0)[:, None, None], axis=1)[:, 0]
    st = engine.rollback(spec, st, L + kept, jnp.where((n > 0)[:, None], next_logits, st.next_logits))
    return st, kept, jnp.minimum(accepted, kept - 1)


def _denoise_block(spec, params, st, cells, masked, logits, latent, rngs, sampling, unmask, active):
    """Unmask `cells` until no [MASK] is left; `logits` holds the first pass. Returns the finished block."""
    Bk = cells.shape[1]
    positions = st.length[:, None] + jnp.arange(Bk)[None, :]

    def body(c):
        st, cells, masked, logits = c
        values = choose(logits, position_keys(rngs, positions), sampling)
        commit = cells_to_commit(logits, masked, unmask) & active[:, None]
        cells = jnp.where(commit, values, cells)
        masked = masked & ~commit
        again = active & jnp.any(masked, axis=1)

        def run(_):
            return engine.denoise(spec, params, st, cells, latent, again)

        st, logits = jax.lax.cond(jnp.any(again), run, lambda _: (st, logits), None)
        return st, cells, masked, logits

    cond = lambda c: jnp.any(c[2] & active[:, None])  # noqa: E731
    st, cells, _, _ = jax.lax.while_loop(cond, body, (st, cells, masked, logits))
    return st, cells


def _check(spec: ModelSpec) -> None:
    if spec.cfg.patching.drop_trailing_patch and spec.cfg.patching.max_patch_length is not None:
        raise ConfigError("model.patching.drop_trailing_patch: transformers' post-hoc patch splitting is not "
                          "incremental at the newest byte; cached generation needs it off (use ar-nocache)")


def _prefill(spec: ModelSpec, method: MethodConfig, params: dict, tokens: jax.Array, lengths: jax.Array,
             prompt_len: int) -> Carry:
    B, S = tokens.shape
    Bk = method.block_size
    st = engine.init_state(spec, B, S)
    mask_cells = jnp.full((B, Bk), MASK_ID, jnp.int32)
    first_block = method.method == "d"
    st, _, blk = engine.extend(spec, params, st, tokens[:, :prompt_len], lengths, provisional=first_block,
                               block=mask_cells if first_block else None)
    ended = _ended(jnp.zeros((B,), bool), st.length, tokens[:, :0], jnp.zeros_like(lengths), S, method.lookahead,
                   False)
    V = st.next_logits.shape[-1]
    return Carry(st, lengths, ended, mask_cells, blk if first_block else jnp.zeros((B, Bk, V), jnp.float32))


def _run(spec: ModelSpec, method: MethodConfig, sampling: SamplingConfig, params: dict, c: Carry,
         max_new: jax.Array, rngs: jax.Array, stop_at_eos: bool) -> Carry:
    """Generate until every row has `max_new` bytes past its prompt (or ended)."""
    B, S = c.state.tokens.shape
    Bk = method.block_size
    mask_cells = jnp.full((B, Bk), MASK_ID, jnp.int32)

    def body(c: Carry) -> Carry:
        st, active = c.state, ~_done(c, max_new)
        L, start = st.length, c.start
        remaining = jnp.where(active, max_new - (L - start), 0)
        if method.method == "ar":
            nxt = choose(st.next_logits, position_keys(rngs, L), sampling)
            n = active.astype(jnp.int32)
            st, _, _ = engine.extend(spec, params, st, nxt[:, None], n)
            committed, kept = nxt[:, None], n
        elif method.method == "s":
            k = method.draft_len
            st = engine.refresh_latent(spec, params, st, active)
            latent = engine.latest_latent(spec, st)
            first = choose(st.next_logits, position_keys(rngs, L), sampling)
            chunk = jnp.zeros((B, k + 1), jnp.int32).at[:, 0].set(first)

            def draft(j, carry):  # decoder-only steps against the latest latent
                st, chunk = carry
                st, lg = engine.draft_step(spec, params, st, chunk[:, j], L + j, latent, active)
                return st, chunk.at[:, j + 1].set(choose(lg, position_keys(rngs, L + j + 1), sampling))

            st, chunk = jax.lax.fori_loop(0, k, draft, (st, chunk))
            n = jnp.minimum(k + 1, remaining)
            st, kept, accepted = _verify(spec, params, st, chunk, n, rngs, sampling, stop_at_eos)
            st = st.replace(counters=engine.add_counts(st, drafted=jnp.maximum(n - 1, 0), accepted=accepted))
            committed = chunk
        elif method.method == "dv":
            st = engine.refresh_latent(spec, params, st, active)
            latent = engine.latest_latent(spec, st)
            first = choose(st.next_logits, position_keys(rngs, L), sampling)  # the verifier's own next byte
            cells = jnp.concatenate([first[:, None], jnp.full((B, Bk - 1), MASK_ID, jnp.int32)], axis=1)
            masked = jnp.arange(Bk)[None, :] >= 1
            st, logits = engine.denoise(spec, params, st, cells, latent, active & (Bk > 1))
            st, cells = _denoise_block(spec, params, st, cells, masked & active[:, None], logits, latent, rngs,
                                       sampling, method.unmask, active)
            n = jnp.minimum(Bk, remaining)
            st, kept, accepted = _verify(spec, params, st, cells, n, rngs, sampling, stop_at_eos)
            st = st.replace(counters=engine.add_counts(st, drafted=jnp.maximum(n - 1, 0), accepted=accepted))
            committed = cells
        else:  # "d": c.cells / c.block_logits hold the block and its first decoder pass
            latent = engine.latest_latent(spec, st)
            masked = jnp.ones((B, Bk), bool) & active[:, None]
            st, cells = _denoise_block(spec, params, st, c.cells, masked, c.block_logits, latent, rngs,
                                       sampling, method.unmask, active)
            n = _cut_at_eos(cells, jnp.minimum(Bk, remaining), stop_at_eos)
            st, _, blk = engine.extend(spec, params, st, cells, n, provisional=True, block=mask_cells)
            committed, kept = cells, n
            c = c._replace(block_logits=blk)
        ended = _ended(c.ended, st.length, committed, kept, S, method.lookahead, stop_at_eos)
        return c._replace(state=st, ended=ended, cells=mask_cells)

    return jax.lax.while_loop(lambda c: ~jnp.all(_done(c, max_new)), body, c)


@partial(jax.jit, static_argnames=("spec", "method", "sampling", "prompt_len", "stop_at_eos"))
def generate_cached(spec: ModelSpec, method: MethodConfig, sampling: SamplingConfig, params: dict,
                    tokens: jax.Array, lengths: jax.Array, max_new: jax.Array, rngs: jax.Array, prompt_len: int,
                    stop_at_eos: bool = True) -> engine.EngineState:
    """tokens (B, S): right-padded prompts in a buffer with room for max_new (B,) bytes plus the method's
    lookahead; prompt_len: the static prompt bucket prefilled as one chunk. Returns the final EngineState
    (tokens, length, counters)."""
    _check(spec)
    with sharding.activation_rules(spec.sharding_rules):
        c = _prefill(spec, method, params, tokens, lengths, prompt_len)
        return _run(spec, method, sampling, params, c, max_new, rngs, stop_at_eos).state


@partial(jax.jit, static_argnames=("spec", "method", "prompt_len"))
def start_stream(spec: ModelSpec, method: MethodConfig, params: dict, tokens: jax.Array, lengths: jax.Array,
                 prompt_len: int) -> Carry:
    """Streaming: prefill once, then `advance` repeatedly with a growing budget (one compile each)."""
    _check(spec)
    with sharding.activation_rules(spec.sharding_rules):
        return _prefill(spec, method, params, tokens, lengths, prompt_len)


@partial(jax.jit, static_argnames=("spec", "method", "sampling", "stop_at_eos"), donate_argnums=(4,))
def advance(spec: ModelSpec, method: MethodConfig, sampling: SamplingConfig, params: dict, carry: Carry,
            max_new: jax.Array, rngs: jax.Array, stop_at_eos: bool = True) -> Carry:
    with sharding.activation_rules(spec.sharding_rules):
        return _run(spec, method, sampling, params, carry, max_new, rngs, stop_at_eos)
