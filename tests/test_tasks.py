"""The evaluation harness (`blt eval --task ...`): per-byte scores checked against an independent forward,
the chain rule and batch/bucket independence; multiple choice against a hand computation; HumanEval's
checker on canonical, wrong and non-terminating code; sacrebleu and gettext pairs; clear errors."""

import dataclasses
import json
import math
import struct
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blt_jax.cli import main
from blt_jax.generation import api
from blt_jax.generation.loaded import from_params
from blt_jax.generation.forward import forward
from blt_jax.tasks import code, continuation, multiple_choice, scoring, translation
from blt_jax.tokenizer import BOE_ID, BOS_ID, encode

# all under 64 bytes: one (8, 64) compile serves most tests
TEXTS = ["import json\n", "def dumps(obj, *, skipkeys=False):\n", "x", "\u00e9t\u00e9 \u2014 caf\u00e9"]


@pytest.fixture(scope="module")
def model(tiny_runs):
    return api.load(str(tiny_runs[3]))


_forward = jax.jit(lambda spec, params, tokens: forward(spec, params, tokens)[0], static_argnums=0)


def direct_logprobs(model, text: str) -> np.ndarray:
    """Oracle: one unpadded, unbatched forward of BOS + text (compiled for its exact length); log_softmax
    read at each byte's id."""
    ids = encode(text)
    logits = _forward(model.spec, model.all_params(), jnp.asarray(ids[None]))
    logp = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1), np.float64)
    return logp[np.arange(len(ids) - 1), ids[1:]] / math.log(2)


def test_byte_logprobs_equal_an_unpadded_forward(model):
    lps = scoring.byte_logprobs(model, TEXTS)
    for text, lp in zip(TEXTS, lps, strict=True):
        assert lp.shape == (len(text.encode()),)
        assert (lp < 0).all()
    for i in (0, 3):  # one compile per length: a line of code and multi-byte UTF-8 suffice
        np.testing.assert_allclose(lps[i], direct_logprobs(model, TEXTS[i]), atol=2e-4, rtol=0)


def test_scores_do_not_depend_on_batch_or_bucket(model):
    together = scoring.byte_logprobs(model, TEXTS + [b"\xff\x00" * 20])
    alone = scoring.byte_logprobs(model, [TEXTS[1]])[0]
    np.testing.assert_allclose(together[1], alone, atol=1e-5, rtol=0)
    # the same text padded into the 128 bucket beside another row
    S, text = 128, TEXTS[1].encode()
    inputs = np.full((8, S), BOE_ID, np.int32)
    targets = np.zeros((8, S), np.int32)
    inputs[:, 0] = BOS_ID
    other = encode("y" * 120)
    inputs[0, :len(other) - 1], targets[0, :len(other) - 1] = other[:-1], other[1:]
    ids = encode(text)
    inputs[3, :len(ids) - 1], targets[3, :len(ids) - 1] = ids[:-1], ids[1:]
    big = np.asarray(scoring._logprobs(model.spec, model.all_params(), jnp.asarray(inputs), jnp.asarray(targets)))
    np.testing.assert_allclose(big[3, :len(text)], alone, atol=1e-5, rtol=0)


def test_chain_rule_over_context_and_continuation(model):
    pairs = [("import json\nimport ", "sys\n"), ("def loads(s, *, cls=None,", " object_hook=None):\n" * 4),
             ("", "ab")]
    cont = scoring.continuation_logprob(model, pairs)
    whole = scoring.byte_logprobs(model, [c + x for c, x in pairs])
    for (c, _), lp_cont, lp_whole in zip(pairs, cont, whole, strict=True):
        lp_ctx = scoring.byte_logprobs(model, [c])[0].sum() if c else 0.0
        assert lp_whole.sum() == pytest.approx(lp_ctx + lp_cont, abs=1e-3)
        assert lp_cont == pytest.approx(lp_whole[len(c.encode()):].sum(), abs=1e-9)
    assert len(whole[1]) > 64  # crossed into the 128 bucket while the context alone sat in 64


def test_bits_per_byte_over_windows_matches_hand_computation(model, tiny_runs, tmp_path, capsys):
    data = (b'"""JSON encoder."""\nimport re\n\ndef encode(o):\n    return str(o)\n' * 3)[:150]
    (tmp_path / "a.py").write_bytes(data)
    (tmp_path / "b.txt").write_bytes(b"hello json\n")
    r = scoring.bits_per_byte(model, [tmp_path], window=64)
    chunks = [data[:64], data[64:128], data[128:], b"hello json\n"]
    hand = -sum(lp.sum() for lp in scoring.byte_logprobs(model, chunks)) / (150 + 11)
    assert r["bytes"] == 161 and r["windows"] == 4 and r["documents"] == 2
    assert r["bits_per_byte"] == pytest.approx(hand, rel=1e-9)
    # the CLI's bpb task on the same folder, window given
    assert main(["eval", "--checkpoint", str(tiny_runs[3]), "--task", "bpb", "--files", str(tmp_path),
                 "--window", "64"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["bits_per_byte"] == pytest.approx(hand, rel=1e-6) and cli["bytes"] == 161


def _real_text(n: int) -> bytes:
    import sysconfig  # noqa: PLC0415

    return (Path(sysconfig.get_paths()["stdlib"]) / "json" / "encoder.py").read_bytes()[:n]


def test_long_windows_score_in_chunks_as_the_dense_forward_does(model, monkeypatch):
    """A probe: `blt eval --task bpb --window 100000` ran out of memory: every window went through one dense
    forward, whose global attention grows with batch x window^2. Buckets past DENSE_MAX_BUCKET now go
    through the engine's caches in chunks; where both fit, the scores agree."""
    doc = _real_text(1600)  # windows of 1000 and 600 bytes: one 1024 bucket, rows of unequal length + padding rows
    dense = scoring.bits_per_byte(model, [doc], window=1000, batch_size=4)
    dense_lps = scoring.byte_logprobs(model, [doc[:1000], doc[1000:]], batch_size=4, max_bytes=1000)

    def no_dense(*args):
        raise AssertionError("a bucket past DENSE_MAX_BUCKET ran the dense forward")

    monkeypatch.setattr(scoring, "DENSE_MAX_BUCKET", 64)
    monkeypatch.setattr(scoring, "_logprobs", no_dense)
    chunked = scoring.bits_per_byte(model, [doc], window=1000, batch_size=4)  # 4 chunks of 256 bytes
    chunked_lps = scoring.byte_logprobs(model, [doc[:1000], doc[1000:]], batch_size=4, max_bytes=1000)
    assert chunked["bytes"] == dense["bytes"] == 1600 and chunked["windows"] == 2
    assert chunked["bits_per_byte"] == pytest.approx(dense["bits_per_byte"], abs=1e-5)
    for a, b in zip(chunked_lps, dense_lps, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=0)


def test_chunked_scoring_memory_grows_linearly_with_the_window(model):
    """What the chunked path compiles for a bucket 4x longer needs about 4x the memory (the dense forward:
    16x), so every window up to MAX_WINDOW fits where its caches do."""
    def temp_bytes(S):
        x = jnp.zeros((1, S), jnp.int32)
        compiled = scoring._chunked_logprobs.lower(model.spec, model.all_params(), x, x,
                                                   jnp.zeros((1,), jnp.int32)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(8192), temp_bytes(32768)
    assert large < 6 * small, (small, large)


def test_a_window_past_the_limit_is_a_one_line_error_before_any_work(model, tiny_runs, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^--window 100000: more than the limit of 65536 bytes .*; lower --window$"):
        scoring.bits_per_byte(model, [b"a short text"], window=100_000)
    (tmp_path / "a.txt").write_bytes(b"a short text\n")
    assert main(["eval", "--checkpoint", str(tiny_runs[3]), "--task", "bpb", "--files", str(tmp_path),
                 "--window", "100000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--window 100000" in err and "65536" in err, err
    # transformers' post-hoc patch splitting cannot run through the caches: its windows stop at the dense limit
    cfg = model.cfg
    split = dataclasses.replace(cfg, patching=dataclasses.replace(cfg.patching, drop_trailing_patch=True))
    imported = from_params(split, model.params, model.entropy_params)
    with pytest.raises(ValueError, match=r"^--window 5000: more than the limit of 4096 bytes \(this model, imported"):
        scoring.bits_per_byte(imported, [b"a short text"], window=5000)
    with pytest.raises(ValueError, match=r"text 0 has 5000 bytes, more than the limit of 4096"):
        scoring.byte_logprobs(imported, [b"x" * 5000], max_bytes=8192)


def test_running_out_of_memory_in_bpb_names_the_options_bpb_takes(tiny_runs, tmp_path, capsys, monkeypatch):
    """The out-of-memory advice named --max-positions and --max-new-bytes, which --task bpb refuses."""
    def oom(*args):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 137438953472 bytes.")

    (tmp_path / "a.txt").write_bytes(b"a short text\n")
    monkeypatch.setattr(scoring, "_logprobs", oom)
    assert main(["eval", "--checkpoint", str(tiny_runs[3]), "--task", "bpb", "--files", str(tmp_path),
                 "--window", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory" in err and err.rstrip().endswith("lower --batch-size or --window")
    assert "--max-positions" not in err, err


def test_multiple_choice_matches_byte_logprobs_and_prefers_real_text(model):
    rng = np.random.default_rng(0)
    noise = [bytes(rng.integers(0, 256, 12, dtype=np.uint8)) for _ in range(3)]
    items = [multiple_choice.make_item("import json\n", [noise[0], "import sys\n"], 1),
             multiple_choice.make_item("def f(x):\n", ["    return x\n", noise[1], noise[2]], 0),
             multiple_choice.make_item("class A:\n", ["a", "    pass\n"], 0)]  # per-byte vs total differ
    r = multiple_choice.evaluate(model, items)
    hand_total = hand_byte = 0
    for it, pred in zip(items, r["predictions"], strict=True):
        totals = [scoring.byte_logprobs(model, [it.context + c])[0][len(it.context):].sum() for c in it.choices]
        np.testing.assert_allclose(pred["logprob_bits"], totals, atol=1e-3)
        hand_total += int(np.argmax(totals)) == it.answer
        hand_byte += int(np.argmax(np.array(totals) / [len(c) for c in it.choices])) == it.answer
    assert r["accuracy"] == hand_total / 3 and r["accuracy_per_byte"] == hand_byte / 3
    # a trained byte LM puts Python far above random bytes
    assert [p["pred"] for p in r["predictions"][:2]] == [1, 0]
    assert r["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)


def test_heldout_next_line_items_are_deterministic_and_true():
    a = multiple_choice.heldout_next_line_items(6, seed=3)
    assert a == multiple_choice.heldout_next_line_items(6, seed=3)
    assert a != multiple_choice.heldout_next_line_items(6, seed=4)
    held = [f.read_bytes() for f in multiple_choice.heldout_files()]
    for it in a:
        assert len(it.choices) == 4 and len(set(it.choices)) == 4
        assert any(it.context + it.choices[it.answer] in d for d in held)  # the true next line
        assert it.context.endswith(b"\n") and all(c.endswith(b"\n") for c in it.choices)


def test_humaneval_canonical_passes_wrong_fails_loop_times_out():
    probs = code.problems(limit=3)
    assert len(code.problems()) == 164 and list(probs) == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    r = code.execute(probs, {t: [p["canonical_solution"]] for t, p in probs.items()}, timeout=3.0)
    assert r["pass_at_k"] == {"pass@1": 1.0}
    t0 = time.time()
    r = code.execute({t: probs[t] for t in ["HumanEval/0"]},
                     {"HumanEval/0": ["    return not has_close_elements\n", "    while True:\n        pass\n",
                                      probs["HumanEval/0"]["canonical_solution"]]}, timeout=1.0, ks=(1, 2, 3))
    assert time.time() - t0 < 20
    res = r["results"]["HumanEval/0"]
    assert [x["passed"] for x in res] == [False, False, True]
    assert res[1]["result"] == "timed out" and res[0]["result"].startswith("failed")
    # one of three correct: pass@1 = 1/3, pass@2 = 1 - C(2,2)/C(3,2) = 2/3, pass@3 = 1
    assert r["pass_at_k"] == pytest.approx({"pass@1": 1 / 3, "pass@2": 2 / 3, "pass@3": 1.0})


def test_pass_at_k_estimator_by_hand():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 0.7; n=4, c=0: 0; n=3, c=3: 1; k=10 > n is left out
    got = code.pass_at_k([5, 4, 3], [2, 0, 3], ks=(1, 2, 10))
    assert got == pytest.approx({"pass@1": (2 / 5 + 0 + 1) / 3, "pass@2": (0.7 + 0 + 1) / 3})


def test_truncate_completion_at_stop_sequences():
    body = "    return a + b\n"
    assert code.truncate_completion(body + "\ndef other():\n    pass") == body
    assert code.truncate_completion(body + "\n# test\nprint(1)") == body
    assert code.truncate_completion(body + "\nif __name__ == '__main__':") == body
    assert code.truncate_completion(body) == body


def test_sacrebleu_scores():
    refs = ["Der Hund bellt laut.", "Eine Datei wurde nicht gefunden."]
    assert translation.score(refs, refs) == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    worse = translation.score(["Die Katze schläft.", "Eine Datei fehlt."], refs)
    assert 0 <= worse["bleu"] < 100 and 0 < worse["chrf"] < 100
    assert translation.hypothesis(" Bonjour le monde\nEnglish: next") == "Bonjour le monde"
    assert translation.few_shot_prompt([("a b", "x y")], "c d", "fr") == \
        "English: a b\nFrench: x y\n\nEnglish: c d\nFrench:"
    assert continuation.score([b"abcdef", b"xyz"], [b"abcd", b"xyq"]) == \
        {"items": 2, "exact_match": 0.5, "mean_prefix_bytes": 3.0, "chrf": pytest.approx(
            translation.score(["abcd", "xyz"], ["abcd", "xyq"])["chrf"])}


def _mo_entries(path: Path) -> dict:
    """Independent .mo reader (GNU format: magic, revision, N, table offsets) for UTF-8 catalogs."""
    data = path.read_bytes()
    magic = struct.unpack("<I", data[:4])[0]
    end = "<" if magic == 0x950412DE else ">"
    _, n, orig, trans = struct.unpack(end + "4I", data[4:20])
    out = {}
    for i in range(n):
        ln, off = struct.unpack(end + "2I", data[orig + 8 * i: orig + 8 * i + 8])
        tl, toff = struct.unpack(end + "2I", data[trans + 8 * i: trans + 8 * i + 8])
        try:
            out[data[off:off + ln].decode("utf-8")] = data[toff:toff + tl].decode("utf-8")
        except UnicodeDecodeError:
            pass
    return out


def test_gettext_pairs_are_deterministic_and_aligned():
    lang = "de"
    try:
        pairs = translation.gettext_pairs(lang, max_pairs=12, seed=1)
    except translation.NoCatalogs as e:
        pytest.skip(f"skipped: {e}")
    assert pairs == translation.gettext_pairs(lang, max_pairs=12, seed=1)
    assert pairs != translation.gettext_pairs(lang, max_pairs=12, seed=2)
    files = translation.catalog_files(lang)
    for src, tgt in pairs:
        assert src != tgt and "\n" not in src + tgt and 12 <= len(src) <= 80
        # the first catalog (by name) holding this English id translates it so
        first = next(e[src] for e in (_mo_entries(f) for f in files) if src in e)
        assert first == tgt, src
    with pytest.raises(translation.NoCatalogs, match="no gettext catalogs for 'xx'"):
        translation.gettext_pairs("xx")


def test_gettext_choice_items_hold_the_right_translation():
    try:
        items = multiple_choice.gettext_choice_items("de", 5, seed=0)
    except translation.NoCatalogs as e:
        pytest.skip(f"skipped: {e}")
    pairs = dict(translation.gettext_pairs("de", max_pairs=None))
    for it in items:
        src = it.context.decode().rsplit("English: ", 1)[1].split("\n")[0]
        assert it.choices[it.answer] == f" {pairs[src]}\n".encode()
        assert len(set(it.choices)) == 4


def test_bad_inputs_are_clear_errors(model):
    with pytest.raises(ValueError, match="text 1 is empty"):
        scoring.byte_logprobs(model, ["ok", ""])
    with pytest.raises(ValueError, match="limit of max_bytes=4096"):
        scoring.byte_logprobs(model, ["x" * 4097])
    with pytest.raises(ValueError, match="continuation is empty"):
        scoring.continuation_logprob(model, [("context", "")])
    with pytest.raises(FileNotFoundError, match="exist: /nonexistent/corpus; .* exist: /nonexistent/other$"):
        scoring.bits_per_byte(model, ["/nonexistent/corpus", b"a text", "/nonexistent/other"])  # every bad one
    with pytest.raises(ValueError, match="out of range"):
        multiple_choice.make_item("c", ["a", "b"], 2)
    with pytest.raises(ValueError, match="unknown"):
        code.execute(code.problems(limit=1), {"HumanEval/999": ["x"]})


def test_cli_translate_without_catalogs_is_an_error(tiny_runs, capsys):
    """An evaluation that cannot run exits non-zero (it used to exit 0 with "skipped"), before loading the model."""
    assert main(["eval", "--checkpoint", str(tiny_runs[3]), "--task", "translate", "--lang", "xx"]) == 2
    cap = capsys.readouterr()
    assert cap.err.startswith("blt eval: error: no gettext catalogs for 'xx'") and not cap.out


@pytest.mark.slow
def test_cli_generation_tasks_run_end_to_end(tiny_runs, capsys):
    run = str(tiny_runs[3])
    assert main(["eval", "--checkpoint", run, "--task", "continuation", "--items", "3", "--prompt-bytes", "40",
                 "--target-bytes", "8"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["items"] == 3 and 0 <= r["mean_prefix_bytes"] <= 8
    assert main(["eval", "--checkpoint", run, "--task", "humaneval", "--items", "2", "--samples", "2", "--k", "1,2",
                 "--max-new-bytes", "24", "--temperature", "0.8"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["problems"] == 2 and 0 <= r["pass@2"] <= 1
    assert main(["eval", "--checkpoint", run, "--task", "mc-next-line", "--items", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == 4
