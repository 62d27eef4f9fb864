"""No-cache generation: equal to an independent step-by-step loop, batch-independent, compiled once per
bucket, with clear errors for bad prompts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blt_jax.generation import api
from blt_jax.generation.forward import forward
from blt_jax.generation.nocache import generate_nocache
from blt_jax.generation.prompts import PromptError, prepare_prompts
from blt_jax.generation.sampling import SamplingConfig, restrict
from blt_jax.tokenizer import EOS_ID, decode_bytes, encode

PROMPTS = ["def load(", "import", "class JSONDecoder(object):\n    ", "x"]


@pytest.fixture(scope="module")
def model(tiny_runs):
    return api.load(str(tiny_runs[3]))


def manual_greedy(model, prompt: str, n: int) -> bytes:
    """Oracle: a plain Python loop of unbatched full forwards, one per byte, reading the last prefix
    position (right padding cannot change it: the model is causal, see test_model)."""
    ids = list(encode(prompt))
    fwd = jax.jit(lambda p, t: forward(model.spec, p, t)[0][0])
    for _ in range(n):
        buf = np.zeros((1, 64), np.int32)
        buf[0, : len(ids)] = ids
        logits = restrict(fwd(model.all_params(), jnp.asarray(buf))[len(ids) - 1][None], SamplingConfig())
        nxt = int(jnp.argmax(logits[0]))
        ids.append(nxt)
        if nxt == EOS_ID:
            break
    return decode_bytes(ids[len(encode(prompt)):])


@pytest.mark.slow
def test_batched_padded_greedy_equals_step_by_step_loop(model):
    results = api.generate(model, PROMPTS, max_new_bytes=12)
    for prompt, r in zip(PROMPTS, results, strict=True):
        assert r.new_bytes == manual_greedy(model, prompt, 12), prompt
        # cached AR: the prompt's prefill pass, then one pass per committed byte (the last one leaves the
        # next byte's logits ready, so a stream can go on without recomputing)
        assert r.cost["decoder_calls"] == r.cost["new_bytes"] + 1 and r.cost["new_bytes"] >= len(r.new_bytes)
    nocache = api.generate(model, PROMPTS, max_new_bytes=12, method="ar-nocache")
    for r, n in zip(results, nocache, strict=True):
        assert n.new_bytes == r.new_bytes and n.cost["decoder_calls"] == n.cost["new_bytes"]  # one full pass per byte


def test_rows_do_not_depend_on_their_batch(model):
    together = api.generate(model, PROMPTS, max_new_bytes=10)
    for prompt, r in zip(PROMPTS, together, strict=True):
        alone = api.generate(model, [prompt], max_new_bytes=10)[0]
        assert alone.new_bytes == r.new_bytes


def test_sampling_is_reproducible_per_seed_and_row(model):
    s = SamplingConfig(temperature=1.0, top_p=0.95)
    a = api.generate(model, PROMPTS, max_new_bytes=16, sampling=s, seed=1)
    b = api.generate(model, PROMPTS, max_new_bytes=16, sampling=s, seed=1)
    c = api.generate(model, PROMPTS, max_new_bytes=16, sampling=s, seed=2)
    assert [r.new_bytes for r in a] == [r.new_bytes for r in b]
    assert [r.new_bytes for r in a] != [r.new_bytes for r in c]


def test_length_limits_and_eos(model):
    batch = prepare_prompts(["abc", "a much longer prompt"], max_new_bytes=5)
    max_new = jnp.asarray([5, 2])
    row_keys = jnp.zeros((2, 2), jnp.uint32)
    out = generate_nocache(model.spec, model.all_params(), jnp.asarray(batch.tokens), jnp.asarray(batch.lengths),
                           max_new, row_keys, None, stop_at_eos=False)
    np.testing.assert_array_equal(np.asarray(out.lengths - batch.lengths), [5, 2])
    np.testing.assert_array_equal(np.asarray(out.forward_calls), [5, 2])
    # padding past each row's end is untouched
    for i in range(2):
        assert (np.asarray(out.tokens)[i, int(out.lengths[i]):] == 0).all()


def test_one_compilation_per_bucket(model):
    api.generate(model, ["first prompt"], max_new_bytes=8)
    before = generate_nocache._cache_size()
    api.generate(model, ["another, longer prompt"], max_new_bytes=8)  # same (1, 64) bucket
    api.generate(model, ["z"], max_new_bytes=8)
    assert generate_nocache._cache_size() == before


def test_bad_prompts_are_clear_errors(model):
    with pytest.raises(PromptError, match="empty"):
        api.generate(model, ["ok", ""], max_new_bytes=4)
    with pytest.raises(PromptError, match="more than the limit"):
        prepare_prompts(["x" * 70_000], max_new_bytes=4)
    with pytest.raises(PromptError, match="no prompts"):
        prepare_prompts([], max_new_bytes=4)
    with pytest.raises(ValueError, match="method"):
        api.generate(model, ["ok"], method="telepathy")
