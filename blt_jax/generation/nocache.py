"""No-cache autoregressive generation: every byte re-runs the entropy model and the whole BLT over the
whole buffer, as the reference code and transformers do. The correctness oracle for the cached samplers
and the speed baseline users had. One `lax.while_loop`, compiled once per (batch, length) bucket."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from blt_jax.generation.forward import last_logits

from blt_jax.generation.loaded import ModelSpec
from blt_jax.generation.sampling import SamplingRows, choose, position_keys
from blt_jax.tokenizer import EOS_ID


class GenState(NamedTuple):
    tokens: jax.Array  # (B, S)
    lengths: jax.Array  # (B,)
    done: jax.Array  # (B,)
    step: jax.Array
    forward_calls: jax.Array  # (B,) full-model passes spent on each row


@partial(jax.jit, static_argnames=("spec", "allow_specials", "stop_at_eos"))
def generate_nocache(spec: ModelSpec, params: dict, tokens: jax.Array, lengths: jax.Array, max_new: jax.Array,
                     row_keys: jax.Array, sampling: Optional[SamplingRows], allow_specials: bool = False,
                     stop_at_eos: bool = True) -> GenState:
    """tokens (B, S) right-padded prompts; lengths (B,); max_new (B,) bytes to add; row_keys (B, 2) key data;
    sampling: per-row settings (None: greedy)."""
    B, S = tokens.shape
    start = lengths

    def body(st: GenState) -> GenState:
        nxt = choose(last_logits(spec, params, st.tokens, st.lengths), position_keys(row_keys, st.lengths), sampling,
                     allow_specials)
        active = ~st.done
        write = jnp.where(active, nxt, st.tokens[jnp.arange(B), jnp.minimum(st.lengths, S - 1)])
        toks = st.tokens.at[jnp.arange(B), jnp.minimum(st.lengths, S - 1)].set(write)
        new_len = st.lengths + active
        done = st.done | (new_len - start >= max_new) | (new_len >= S)
        if stop_at_eos:
            done = done | (active & (nxt == EOS_ID))
        return GenState(toks, new_len, done, st.step + 1, st.forward_calls + active)

    init = GenState(tokens, lengths, (max_new <= 0) | (lengths >= S), jnp.zeros((), jnp.int32),
                    jnp.zeros((B,), jnp.int32))
    return jax.lax.while_loop(lambda st: ~jnp.all(st.done), body, init)
