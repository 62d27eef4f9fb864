"""Cached generation methods: one round function per method (the table `ROUNDS`), run by one
`lax.while_loop` compiled once per (batch, length) bucket.

- ``ar``  BLT with KV caches in all four networks; the global model runs only when a patch closes.
- ``s``   BLT-S: the verifier's next byte is encoded and the latent of its (open) patch computed; the
          decoder drafts k bytes against it; one full pass verifies them; the longest agreeing prefix is kept
          and the verifier's own byte follows it. Output == ``ar``.
- ``d``   BLT-D (Algorithm 1): B [MASK] cells after the text, unmasked over a few decoder passes, then
          committed; the commit pass also computes the next latent and the next block's first decoder pass.
- ``dv``  BLT-DV: after the verifier's next byte, a BLT-D draft of B cells, verified like BLT-S. Output ==
          the model's own ``ar``.

Bytes are chosen with position-keyed randomness (`sampling.position_keys`), so under sampling too every
verified method reproduces ``ar`` exactly whenever it sees the same logits. Everything per row (budget,
sampling settings, keys) lives in the `Carry`, every leaf with the batch as its leading axis, so a finished
row's slot can be refilled with a new prompt's state (`insert_rows`: continuous batching).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp

from blt_jax import sharding
from blt_jax.config import ConfigError
from blt_jax.generation import constants, engine
from blt_jax.generation.loaded import ModelSpec
from blt_jax.generation.programs import jit_by_rows
from blt_jax.generation.sampling import SamplingRows, choose, position_keys
from blt_jax.generation.unmasking import UnmaskConfig, cells_to_commit
from blt_jax.tokenizer import EOS_ID, MASK_ID

Method = Literal["ar", "s", "d", "dv"]
CACHED_METHODS: tuple[str, ...] = ("ar", "s", "d", "dv")

PREFILL_CHUNK = 256  # prompt bytes extended per prefill step: memory O(chunk x window), time linear in the prompt


@dataclass(frozen=True)
class MethodConfig:
    method: Method = "ar"
    draft_len: int = constants.DRAFT_LEN  # BLT-S: k bytes drafted per round
    block_size: int = 8  # BLT-D / BLT-DV: B cells per block
    unmask: UnmaskConfig = field(default_factory=UnmaskConfig)

    def __post_init__(self):
        if self.method not in CACHED_METHODS:
            raise ConfigError(f"method: must be one of {', '.join(CACHED_METHODS)}, got {self.method!r}")
        if self.draft_len < 1:
            raise ConfigError(f"draft_len: must be >= 1, got {self.draft_len}")
        if self.block_size < 1:
            raise ConfigError(f"block_size: must be >= 1, got {self.block_size}")

    @property
    def lookahead(self) -> int:
        """Positions a round may write past the committed text (buffers are sized with this slack)."""
        return {"ar": 1, "s": self.draft_len + 1, "d": 2 * self.block_size, "dv": self.block_size + 1}[self.method]

    @property
    def max_bytes_per_round(self) -> int:
        return {"ar": 1, "s": self.draft_len + 1, "d": self.block_size, "dv": self.block_size + 1}[self.method]

    @property
    def positions_per_pass(self) -> int:
        """Positions per row of a round's typical decoder pass: a block of cells, a verification chunk (the
        draft + 1), or the one byte of `ar`; as many as a round may commit."""
        return self.max_bytes_per_round

    def layout(self, buffer: int, prompt_len: int) -> engine.Layout:
        chunk = min(prompt_len, PREFILL_CHUNK)
        return engine.Layout(buffer=buffer, slack=self.lookahead, max_chunk=max(chunk, self.lookahead + 1))


class Carry(NamedTuple):
    """Everything a batch of rows carries between rounds; every leaf is indexed by row first."""

    state: engine.EngineState
    start: jax.Array  # (B,) prompt lengths
    budget: jax.Array  # (B,) bytes to generate past the prompt
    row_keys: jax.Array  # (B, 2) per-row random key data (sampling.position_keys)
    sampling: Optional[SamplingRows]  # per-row settings; None: all greedy
    ended: jax.Array  # (B,) emitted EOS or filled the buffer: finished for good
    cells: jax.Array  # (B, Bk) BLT-D: the block being denoised
    block_logits: jax.Array  # (B, Bk, V) BLT-D: the latest decoder pass over it


@dataclass(frozen=True)
class Round:
    """What a round function needs besides the carry: the model, the method and the byte chooser."""

    spec: ModelSpec
    method: MethodConfig
    params: dict
    allow_specials: bool
    stop_at_eos: bool

    def choose(self, c: Carry, logits: jax.Array, positions: jax.Array) -> jax.Array:
        return choose(logits, position_keys(c.row_keys, positions), c.sampling, self.allow_specials)


def done(c: Carry) -> jax.Array:
    return c.ended | (c.state.length - c.start >= c.budget)


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


def _verify(r: Round, c: Carry, st: engine.EngineState, chunk, n):
    """One full pass over chunk[:, :n] (chunk[:, 0] is the model's own next byte). Keeps chunk[:, 0] and the
    drafted bytes up to the first one the verifier would not have chosen; returns (state, kept, accepted)."""
    L = st.length
    st, logits, _ = engine.extend(r.spec, r.params, st, chunk, n)
    T = chunk.shape[1]
    picks = r.choose(c, logits, L[:, None] + 1 + jnp.arange(T)[None, :])
    agree = (chunk[:, 1:] == picks[:, :-1]) & (jnp.arange(1, T)[None, :] < n[:, None])
    accepted = jnp.sum(jnp.cumprod(agree.astype(jnp.int32), axis=1), axis=1)
    kept = _cut_at_eos(chunk, jnp.minimum(1 + accepted, n), r.stop_at_eos)
    next_logits = engine.gather(logits, jnp.maximum(kept - 1, 0))
    st = engine.rollback(st, L + kept, jnp.where((n > 0)[:, None], next_logits, st.next_logits))
    return st, kept, jnp.minimum(accepted, kept - 1)


def _denoise_block(r: Round, c: Carry, st, cells, masked, logits, prefix_end, patch, active):
    """Unmask `cells` until no [MASK] is left; `logits` holds the first pass. Returns (state, the finished
    block, decoder passes run after the first (B,))."""
    Bk = cells.shape[1]
    positions = prefix_end[:, None] + jnp.arange(Bk)[None, :]

    def body(loop):
        st, cells, masked, logits, passes = loop
        values = r.choose(c, logits, positions)
        commit = cells_to_commit(logits, masked, r.method.unmask) & active[:, None]
        cells = jnp.where(commit, values, cells)
        masked = masked & ~commit
        again = active & jnp.any(masked, axis=1)

        def run(_):
            return engine.denoise(r.spec, r.params, st, cells, prefix_end, patch, again)

        st, logits = jax.lax.cond(jnp.any(again), run, lambda _: (st, logits), None)
        return st, cells, masked, logits, passes + again

    cond = lambda loop: jnp.any(loop[2] & active[:, None])  # noqa: E731
    zeros = jnp.zeros(prefix_end.shape, jnp.int32)
    st, cells, _, _, passes = jax.lax.while_loop(cond, body, (st, cells, masked, logits, zeros))
    return st, cells, passes


def _remaining(c: Carry, active):
    return jnp.where(active, c.budget - (c.state.length - c.start), 0)


def _count(st: engine.EngineState, active, **adds) -> engine.EngineState:
    return st.replace(counters=engine.add_counts(st, **{k: jnp.where(active, v, 0) for k, v in adds.items()}))


# ---- one round per method -----------------------------------------------------------------------------------------
# Each takes (round context, carry, active rows) and returns (carry, committed bytes (B, T), how many (B,)).

def ar_round(r: Round, c: Carry, active):
    st = c.state
    nxt = r.choose(c, st.next_logits, st.length)
    n = active.astype(jnp.int32)
    before = st.counters["global_calls"]
    st, _, _ = engine.extend(r.spec, r.params, st, nxt[:, None], n)
    st = _count(st, active, paper_decoder_calls=1, paper_global_calls=st.counters["global_calls"] - before)
    return c._replace(state=st), nxt[:, None], n


def _verify_round(r: Round, c: Carry, st, chunk, active, paper_decoder_calls):
    """The end of a speculative round: one pass verifies chunk (the verifier's byte, then the draft), counted
    as the paper counts a round (two encoder/global passes)."""
    n = jnp.minimum(chunk.shape[1], _remaining(c, active))
    st, kept, accepted = _verify(r, c, st, chunk, n)
    st = _count(st, active, drafted=jnp.maximum(n - 1, 0), accepted=accepted,
                paper_decoder_calls=paper_decoder_calls, paper_global_calls=2)
    return c._replace(state=st), chunk, kept


def speculative_round(r: Round, c: Carry, active):
    """BLT-S: refresh the latest latent with the verifier's byte, draft k bytes, verify."""
    k = r.method.draft_len
    st = c.state
    L = st.length
    first = r.choose(c, st.next_logits, L)  # the verifier's own next byte: always kept
    st, h = engine.refresh(r.spec, r.params, st, first, active)
    patch = st.num_closed  # the open patch holding `first`
    st, logits = engine.decode_at(r.spec, r.params, st, h, patch, active)
    chunk = jnp.zeros((first.shape[0], k + 1), jnp.int32).at[:, 0].set(first)
    chunk = chunk.at[:, 1].set(r.choose(c, logits[:, 0], L + 1))

    def draft(j, loop):  # encoder + decoder steps against the latest latent
        st, chunk = loop
        st, lg = engine.draft_step(r.spec, r.params, st, chunk[:, j], L + j, patch, active)
        return st, chunk.at[:, j + 1].set(r.choose(c, lg, L + j + 1))

    st, chunk = jax.lax.fori_loop(1, k, draft, (st, chunk))
    return _verify_round(r, c, st, chunk, active, paper_decoder_calls=k + 1)


def diffusion_verify_round(r: Round, c: Carry, active):
    """BLT-DV: refresh the latest latent with the verifier's byte, draft a block of B cells after it by
    diffusion (the first pass also decodes the byte itself), verify all B."""
    Bk = r.method.block_size
    st = c.state
    L = st.length
    B = L.shape[0]
    first = r.choose(c, st.next_logits, L)
    st, h = engine.refresh(r.spec, r.params, st, first, active)
    patch = st.num_closed
    cells = jnp.full((B, Bk), MASK_ID, jnp.int32)
    st, logits = engine.decode_at(r.spec, r.params, st, h, patch, active, cells=cells)
    masked = jnp.ones((B, Bk), bool) & active[:, None]
    st, cells, passes = _denoise_block(r, c, st, cells, masked, logits[:, 1:], L + 1, patch, active)
    chunk = jnp.concatenate([first[:, None], cells], axis=1)
    return _verify_round(r, c, st, chunk, active, paper_decoder_calls=passes + 2)


def diffusion_round(r: Round, c: Carry, active):
    """BLT-D: c.cells / c.block_logits hold the block and its first decoder pass (made by the previous
    commit); unmask, then commit the block, which also opens the next one."""
    st = c.state
    B, Bk = c.cells.shape
    masked = jnp.ones((B, Bk), bool) & active[:, None]
    st, cells, passes = _denoise_block(r, c, st, c.cells, masked, c.block_logits, st.length,
                                       engine.latest_patch(st), active)
    n = _cut_at_eos(cells, jnp.minimum(Bk, _remaining(c, active)), r.stop_at_eos)
    st, _, blk = engine.extend(r.spec, r.params, st, cells, n, provisional=True,
                               block=jnp.full((B, Bk), MASK_ID, jnp.int32))
    st = _count(st, active, paper_decoder_calls=passes + 1, paper_global_calls=1)
    return c._replace(state=st, block_logits=blk), cells, n


ROUNDS: dict[str, Callable] = {"ar": ar_round, "s": speculative_round, "d": diffusion_round,
                               "dv": diffusion_verify_round}
assert tuple(ROUNDS) == CACHED_METHODS


def check_cached(cfg) -> None:
    """Refuse a model (BLTConfig) the cached methods cannot run, before anything compiles."""
    if cfg.patching.drop_trailing_patch and cfg.patching.max_patch_length is not None:
        raise ConfigError("model.patching.drop_trailing_patch: transformers' post-hoc patch splitting (a model "
                          "imported with `blt convert --from-hf`) is not incremental at the newest byte, so the cached "
                          "methods cannot run this model; `blt generate --method ar-nocache` can")


def chunks_without_decoder(chunk: int, lengths, reach: Optional[int]):
    """How many leading prefill chunks end at least `reach` bytes before every row's end (so the decoder's
    work on them is never read); 0 without a reach (an unwindowed decoder)."""
    if reach is None:
        return jnp.asarray(0, jnp.int32)
    return jnp.maximum(jnp.min(lengths) - reach, 0) // chunk


def _prefill(spec: ModelSpec, method: MethodConfig, params: dict, tokens, lengths, budget, row_keys, sampling,
             prompt_len: int, dtype) -> Carry:
    """Extend every row's prompt through the caches in fixed-size chunks (a `fori_loop`): time linear in the
    prompt, memory independent of it. BLT-D's first block rides along with each chunk, so the chunk that ends
    a row's prompt also makes its first decoder pass over the block."""
    B, S = tokens.shape
    Bk = method.block_size
    layout = method.layout(S, prompt_len)
    C = min(prompt_len, PREFILL_CHUNK)
    n_chunks = -(-prompt_len // C)
    prompt = jnp.pad(tokens[:, :prompt_len], ((0, 0), (0, n_chunks * C - prompt_len)))
    st = engine.init_state(spec, B, layout, dtype)
    mask_cells = jnp.full((B, Bk), MASK_ID, jnp.int32)
    first_block = method.method == "d"
    V = st.next_logits.shape[-1]
    blk = jnp.zeros((B, Bk, V), jnp.float32)

    def chunk(i, loop, decode=True):
        st, blk = loop
        n = jnp.clip(lengths - i * C, 0, C)
        piece = jax.lax.dynamic_slice_in_dim(prompt, i * C, C, axis=1)
        if not decode:
            return engine.extend(spec, params, st, piece, n, provisional=first_block, decode=False)[0], blk
        st, _, new_blk = engine.extend(spec, params, st, piece, n, provisional=first_block,
                                       block=mask_cells if first_block else None)
        return st, (jnp.where((n > 0)[:, None, None], new_blk, blk) if first_block else blk)

    counters = st.counters
    reach = engine.decoder_reach(spec, layout.slack)
    if reach is None or prompt_len - reach < C:  # no chunk of this bucket can be beyond the decoder's reach
        st, blk = jax.lax.fori_loop(0, n_chunks, chunk, (st, blk))
    else:
        # the decoder's work on bytes beyond its reach from every row's end is never read: the first chunks of
        # a long prompt leave it out (two loops, not a cond per chunk: a cond would copy the state every chunk)
        skip = chunks_without_decoder(C, lengths, reach)
        loop = jax.lax.fori_loop(0, skip, partial(chunk, decode=False), (st, blk))
        st, blk = jax.lax.fori_loop(skip, n_chunks, chunk, loop)
    ran = st.counters["global_calls"] > 0
    one = jnp.ones((B,), jnp.int32)  # the prompt pass counts once per network, however many chunks it took
    st = st.replace(counters={**counters, "decoder_calls": one, "encoder_calls": one,
                              "global_calls": ran.astype(jnp.int32),
                              "entropy_calls": one if spec.entropy_graphdef is not None else 0 * one})
    ended = _ended(jnp.zeros((B,), bool), st.length, tokens[:, :0], jnp.zeros_like(lengths), S, method.lookahead,
                   False)
    return Carry(st, lengths, budget, row_keys, sampling, ended, mask_cells, blk)


def _run(r: Round, c: Carry, max_rounds, exit_on_finish: bool) -> Carry:
    """Run rounds until every row is done, `max_rounds` rounds have run, or (`exit_on_finish`) some row has
    just finished (so a continuous batcher can refill its slot)."""
    S = c.state.buffer
    method = r.method
    round_fn = ROUNDS[method.method]
    done_at_entry = done(c)

    def body(loop):
        c, i = loop
        active = ~done(c)
        c, committed, kept = round_fn(r, c, active)
        st = _count(c.state, active, rounds=1)
        ended = _ended(c.ended, st.length, committed, kept, S, method.lookahead, r.stop_at_eos)
        return c._replace(state=st, ended=ended, cells=jnp.full_like(c.cells, MASK_ID)), i + 1

    def cond(loop):
        c, i = loop
        d = done(c)
        go = ~jnp.all(d) & (i < max_rounds)
        if exit_on_finish:
            go = go & ~jnp.any(d & ~done_at_entry)
        return go

    return jax.lax.while_loop(cond, body, (c, jnp.zeros((), jnp.int32)))[0]


def _pass_rows(batched: str):
    """A program's rows per pass (for `jit_by_rows`): its batch (the leading size of argument `batched`) x
    the method's positions per pass."""
    return lambda args: jax.tree.leaves(args[batched])[0].shape[0] * args["method"].positions_per_pass


def _dtype(params: dict):
    """The compute dtype: the parameters' (cast them once to bfloat16 for bf16 generation)."""
    return jax.tree.leaves(params["blt"])[0].dtype


@jit_by_rows(_pass_rows("tokens"), static_argnames=("spec", "method", "prompt_len", "allow_specials", "stop_at_eos"))
def generate_cached(spec: ModelSpec, method: MethodConfig, params: dict, tokens, lengths, budget, row_keys,
                    sampling: Optional[SamplingRows], prompt_len: int, allow_specials: bool = False,
                    stop_at_eos: bool = True) -> engine.EngineState:
    """tokens (B, S): right-padded prompts in a buffer with room for budget (B,) bytes plus the method's
    lookahead; prompt_len: the static prompt bucket (prefilled in chunks). Returns the final EngineState
    (tokens, length, counters)."""
    check_cached(spec.cfg)
    with sharding.activation_rules(spec.sharding_rules):
        c = _prefill(spec, method, params, tokens, lengths, budget, row_keys, sampling, prompt_len, _dtype(params))
        r = Round(spec, method, params, allow_specials, stop_at_eos)
        return _run(r, c, jnp.iinfo(jnp.int32).max, False).state


@jit_by_rows(_pass_rows("tokens"), static_argnames=("spec", "method", "prompt_len"))
def prefill(spec: ModelSpec, method: MethodConfig, params: dict, tokens, lengths, budget, row_keys,
            sampling: Optional[SamplingRows], prompt_len: int) -> Carry:
    """The carry of a batch of prompts after their prefill: what `advance` continues (streaming, continuous
    batching)."""
    check_cached(spec.cfg)
    with sharding.activation_rules(spec.sharding_rules):
        return _prefill(spec, method, params, tokens, lengths, budget, row_keys, sampling, prompt_len,
                        _dtype(params))


@jit_by_rows(_pass_rows("carry"), static_argnames=("spec", "method", "allow_specials", "stop_at_eos", "exit_on_finish"),
             donate_argnums=(3,))
def advance(spec: ModelSpec, method: MethodConfig, params: dict, carry: Carry, max_rounds,
            allow_specials: bool = False, stop_at_eos: bool = True, exit_on_finish: bool = False) -> Carry:
    """Run up to `max_rounds` rounds (a traced count: one compile serves any) on a carry."""
    with sharding.activation_rules(spec.sharding_rules):
        r = Round(spec, method, params, allow_specials, stop_at_eos)
        return _run(r, carry, jnp.asarray(max_rounds, jnp.int32), exit_on_finish)


@partial(jax.jit, donate_argnums=(0,))
def insert_rows(carry: Carry, rows: jax.Array, new: Carry) -> Carry:
    """Write the rows of `new` (a carry of len(rows) rows, e.g. fresh prefills) into `carry` at `rows`: every
    buffer, cache, budget and setting of those slots is replaced, so the batch keeps running with them."""
    return jax.tree.map(lambda full, part: full.at[rows].set(part.astype(full.dtype)), carry, new)
