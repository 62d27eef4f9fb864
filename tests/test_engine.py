"""The generation engine, exact to the paper and to the forward pass: drafts condition on the latest latent
(including the verifier's byte), BLT-DV drafts a whole block, rounds are counted and Eq. 8 reported in both
accountings (in test_samplers), caches stay exact past many ring wraps and chunked prefills, bfloat16 runs, and a step's
compiled loop copies no per-position buffer."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from blt_jax.generation import api, engine, programs, samplers
from blt_jax.generation.forward import compute_patch_starts
from blt_jax.generation.prompts import PromptError, prepare_prompts
from blt_jax.generation.unmasking import UnmaskConfig
from blt_jax.tokenizer import EOS_ID, encode
from test_samplers import ALPHABET, assert_same, ids_of, random_model


def long_prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [bytes(rng.choice(list(ALPHABET), size=n).tolist()) for n in lengths]


@pytest.fixture(scope="module")
def plain():
    return random_model()


def test_cached_ar_stays_exact_across_ring_wraps_and_prefill_chunks(plain):
    """Prompts longer than a prefill chunk (256; the 400-byte one's first chunk is beyond the decoder's reach,
    so its prefill leaves the decoder out there) and generations that wrap every local ring (window 64)
    several times: cached AR and BLT-S still equal the no-cache forward."""
    ps = long_prompts([400, 20], seed=1)
    want = ids_of(api.generate(plain, ps, max_new_bytes=100, method="ar-nocache", stop_at_eos=False))
    assert_same(ids_of(api.generate(plain, ps, max_new_bytes=100, method="ar", stop_at_eos=False)), want, "AR")
    assert_same(ids_of(api.generate(plain, ps, max_new_bytes=100, method="s", draft_len=6, stop_at_eos=False)),
                want, "BLT-S")


def test_prefill_leaves_out_the_decoder_beyond_its_reach_and_stays_exact(plain, monkeypatch):
    """A long prompt's prefill runs the decoder only on chunks within n_layers x window (+ the ring's slack)
    bytes of some row's end (the rest is never read again); the decoder's caches, the next byte's logits and
    BLT-D's first block come out as with the decoder run on every chunk (generation from such prompts: the
    ring-wrap test above)."""
    C, reach = samplers.PREFILL_CHUNK, engine.decoder_reach(plain.spec, slack=4)
    assert reach == plain.cfg.decoder.n_layers * plain.cfg.decoder.window + 4 == 132
    skipped = lambda *lengths: int(samplers.chunks_without_decoder(C, jnp.asarray(lengths), reach))  # noqa: E731
    assert skipped(C + reach) == 1 and skipped(C + reach - 1) == 0  # one byte shorter: chunk 0 is within reach
    assert skipped(3 * C + reach + 7) == 3 and skipped(reach - 5) == 0
    assert skipped(3 * C + reach, C + reach) == 1  # a batch leaves out only what every row can
    assert int(samplers.chunks_without_decoder(C, jnp.asarray([10 * C]), None)) == 0  # unwindowed: never

    def prefill(model, method, prompt):
        batch = prepare_prompts([prompt], 8, extra_positions=method.lookahead)
        run = jax.jit(lambda params, tokens, lengths: samplers._prefill(
            model.spec, method, params, tokens, lengths, jnp.asarray([8]), jnp.zeros((1, 2), jnp.uint32), None,
            batch.prompt_len, jnp.float32))  # a new jit: traces with whatever decoder_reach says now
        return run(model.all_params(), jnp.asarray(batch.tokens), jnp.asarray(batch.lengths))

    blt_d = random_model(block_size=4, seed=2)
    cases = [(plain, samplers.MethodConfig("ar")), (blt_d, samplers.MethodConfig("d", block_size=4))]
    for model, method in cases:
        r = engine.decoder_reach(model.spec, method.lookahead)
        for prompt in long_prompts([C + r - 1], seed=3):  # BOS + C + r - 1 bytes: chunk 0 is just left out
            left_out = prefill(model, method, prompt)
            with monkeypatch.context() as m:
                m.setattr(engine, "decoder_reach", lambda spec, slack: None)
                full = prefill(model, method, prompt)
            for name, a, b in (("next logits", left_out.state.next_logits, full.state.next_logits),
                               ("block logits", left_out.block_logits, full.block_logits),
                               ("decoder caches", left_out.state.decoder_kv, full.state.decoder_kv)):
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5,
                                               err_msg=f"{method.method}, {len(prompt)} bytes: {name}")


def _prefilled(model, prompt: bytes, method: samplers.MethodConfig):
    batch = prepare_prompts([prompt], 16, extra_positions=method.lookahead)
    return samplers.prefill(model.spec, method, model.all_params(), jnp.asarray(batch.tokens),
                            jnp.asarray(batch.lengths), jnp.asarray([16]), jnp.zeros((1, 2), jnp.uint32), None,
                            prompt_len=batch.prompt_len)


def test_drafts_condition_on_the_latent_that_includes_the_verifiers_byte(plain):
    """BLT-S / BLT-DV draft after the text x that already holds the verifier's byte c: the encoder and global
    model run over all of x, so the first draft equals the forward pass over x with a patch boundary after c
    (every draft reads the latest latent, o_M, computed from c's patch including c)."""
    mc = samplers.MethodConfig("s", draft_len=4)
    prompt = b"def f(x):\n  return x + 1"
    carry = _prefilled(plain, prompt, mc)
    c = jnp.asarray([4 + ord("z")])
    active = jnp.asarray([True])
    st, h = engine.refresh(plain.spec, plain.all_params(), carry.state, c, active)
    st, logits = engine.decode_at(plain.spec, plain.all_params(), st, h, st.num_closed, active)

    x = jnp.asarray(np.concatenate([encode(prompt), [4 + ord("z")]])[None].astype(np.int32))
    L = x.shape[1] - 1
    starts = compute_patch_starts(plain.spec, plain.all_params(), x).at[:, L + 1].set(True)
    ref = nnx.merge(plain.spec.graphdef, plain.params)(x, starts, max_patches=L + 3)[0][0, L]
    np.testing.assert_allclose(np.asarray(logits[0, 0]), np.asarray(ref), atol=2e-4)


def constant_model(block_size):
    """A BLT-D whose every prediction is the same byte (the decoder's final norm is zeroed, so all logits tie
    and the first allowed id, EOS, wins): a draft that always agrees with its verifier."""
    m = random_model(block_size=block_size, seed=3)
    m.params["local_decoder"]["norm"]["scale"].set_value(jnp.zeros_like(m.params["local_decoder"]["norm"]["scale"][...]))
    return m


def test_blt_dv_drafts_a_whole_block_and_gains_up_to_b_plus_one():
    """The paper drafts B masked bytes after the text (which holds the verifier's byte) and verifies r = B:
    with a draft that always agrees, one-step BLT-DV gains B + 1 bytes a round and counts drafted == B."""
    B = 4
    m = constant_model(B)
    r = api.generate(m, [b"hello"], max_new_bytes=20, method="dv", unmask=UnmaskConfig("one_step"),
                     stop_at_eos=False)[0]
    assert r.token_ids == [EOS_ID] * 20
    assert r.cost["rounds"] == 20 // (B + 1)
    assert r.cost["drafted"] == r.cost["accepted"] == B * r.cost["rounds"]
    assert r.cost["paper_decoder_calls"] == 2 * r.cost["rounds"]  # one draft pass + one verification pass
    assert r.cost["paper_global_calls"] == 2 * r.cost["rounds"]


@pytest.mark.slow
def test_bfloat16_generation_runs_in_bfloat16(plain):
    """`astype("bfloat16")` casts the weights once; the caches follow; the next-byte distributions after a
    prompt stay close to float32's (total variation < 0.05; the same argmax)."""
    bf = plain.astype("bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf.params))
    mc = samplers.MethodConfig("ar")
    ps = long_prompts([30, 12, 20, 50, 7, 33, 25, 40], seed=7)
    batch = prepare_prompts(ps, 16, extra_positions=mc.lookahead)
    B = batch.tokens.shape[0]
    probs = []
    for m in (plain, bf):
        carry = samplers.prefill(m.spec, mc, m.all_params(), jnp.asarray(batch.tokens), jnp.asarray(batch.lengths),
                                 jnp.full((B,), 16), jnp.zeros((B, 2), jnp.uint32), None, prompt_len=batch.prompt_len)
        probs.append(np.asarray(jax.nn.softmax(carry.state.next_logits)))
    assert carry.state.decoder_kv[0].k.dtype == jnp.bfloat16 and carry.state.enc_h.dtype == jnp.bfloat16
    assert (0.5 * np.abs(probs[0] - probs[1]).sum(-1)).max() < 0.05
    assert (probs[0].argmax(-1) == probs[1].argmax(-1)).all()


@pytest.mark.slow
def test_advance_compiles_once_for_any_round_count(plain):
    mc = samplers.MethodConfig("ar")
    carry = _prefilled(plain, b"abc", mc)
    carry = samplers.advance(plain.spec, mc, plain.all_params(), carry, 2)
    before = samplers.advance._cache_size()
    carry = samplers.advance(plain.spec, mc, plain.all_params(), carry, 5)
    assert int(carry.state.length[0]) == 4 + 7 and samplers.advance._cache_size() == before


def _computations(hlo: str) -> dict:
    comps, cur = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            cur = head.group(2)
            comps[cur] = []
        elif cur:
            comps[cur].append(line)
    return comps


def _reachable(comps: dict, root: str, seen=None) -> set:
    seen = set() if seen is None else seen
    if root in seen or root not in comps:
        return seen
    seen.add(root)
    for line in comps[root]:
        callees = r"(?:calls|to_apply|body|condition|branch_computations)=\{?([^}\s]+(?:, [^}\s]+)*)"
        for group in re.findall(callees, line):
            for callee in group.split(","):
                _reachable(comps, callee.strip().lstrip("%"), seen)
    return seen


def test_a_compiled_step_copies_no_buffer_or_cache(plain):
    """The generation loops never copy a buffer that holds every position (tokens) nor any KV cache (4-D):
    per-row writes compile to in-place updates, so a step's cost follows the window, not the buffer. (Only
    the small rings of recent per-byte state may be copied.)"""
    mc = samplers.MethodConfig("s", draft_len=4)
    batch = prepare_prompts(long_prompts([20], seed=8), 3000, extra_positions=mc.lookahead)
    S = batch.tokens.shape[1]
    args = (plain.spec, mc, plain.all_params(), jnp.asarray(batch.tokens), jnp.asarray(batch.lengths),
            jnp.asarray([5]), jnp.zeros((1, 2), jnp.uint32), None)
    hlo = samplers.generate_cached.lower(*args, prompt_len=batch.prompt_len).compile().as_text()
    comps = _computations(hlo)
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    assert bodies
    in_loops = set().union(*(_reachable(comps, b) for b in bodies))
    copied = [shape for c in in_loops for shape in re.findall(r"= (\S+) copy\(", "\n".join(comps[c]))
              if not c.startswith("fused_computation")]
    window = plain.cfg.encoder.window  # every ring holds at least a window of positions

    def too_big(shape: str) -> bool:  # a buffer of every position, or anything the size of a KV ring
        dims = [int(d) for d in re.findall(r"\d+", shape.split("{")[0].split("[", 1)[1])]
        return S in dims or int(np.prod(dims)) >= window * plain.cfg.encoder.dim // 2
    assert [c for c in copied if not too_big(c)] == copied  # the pattern sees the copies (small ones only)
    assert not [c for c in copied if too_big(c)], copied


@pytest.mark.slow
def test_a_60kb_prompt_prefills_in_chunks_and_a_longer_one_is_a_clear_error(plain):
    """A prompt just under the 65,536-position limit is prefilled chunk by chunk through the windowed caches
    (it once needed a 137 GB dense attention); over the limit, a one-line PromptError names it."""
    prompt = long_prompts([60_000], seed=9)[0]
    r = api.generate(plain, [prompt], max_new_bytes=8, method="ar", stop_at_eos=False)[0]
    assert r.cost["new_bytes"] == 8 and len(r.token_ids) == 8
    with pytest.raises(PromptError, match="more than the limit of 65536"):
        api.generate(plain, [prompt + b"x" * 6000], max_new_bytes=8, method="ar")


def test_cpu_programs_of_many_rows_use_eigen_dots(plain):
    """From EIGEN_DOTS_FROM_ROWS rows per pass on (batch x the method's positions per pass), a generation
    program is compiled with YNNPACK's fusions off (Eigen's dots are faster there on the CPU); smaller passes
    keep XLA's default kernels. (That the kernels change no greedy text: test_generation's
    rows_do_not_depend_on_their_batch, 4 rows against each alone, and s == ar there.)"""
    def hlo(rows, method=None):
        method = method or samplers.MethodConfig("ar")
        batch = prepare_prompts(long_prompts([30] * rows, seed=11), 8, extra_positions=method.lookahead)
        args = (plain.spec, method, plain.all_params(), jnp.asarray(batch.tokens),
                jnp.asarray(batch.lengths), jnp.full((rows,), 8), jnp.zeros((rows, 2), jnp.uint32), None)
        return samplers.prefill.lower(*args, prompt_len=batch.prompt_len).compile().as_text()

    few = programs.EIGEN_DOTS_FROM_ROWS - 1
    assert "__ynn_fusion" in hlo(1)
    assert "__ynn_fusion" not in hlo(programs.EIGEN_DOTS_FROM_ROWS)
    # one row whose verification passes carry a draft of `few` bytes + 1
    assert "__ynn_fusion" in hlo(1, samplers.MethodConfig("s", draft_len=few - 1))
    assert "__ynn_fusion" not in hlo(1, samplers.MethodConfig("s", draft_len=few))
