"""BLT-D training: the block layout on the paper's worked example, the block attention against a dense
reference and rule by rule, exactly zero gradient from a masked cell into its clean copy and the block's
suffix, the loss and its normalisation, and a trained leak regression (training vs inference layout)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from blt_jax import diffusion, prepare
from blt_jax.cli import main
from blt_jax.data import pipeline
from blt_jax.generation import api, samplers
from blt_jax.generation.prompts import prepare_prompts
from blt_jax.generation.loaded import from_params
from blt_jax.model import build
from blt_jax.model.attention import BlockDiffusionMask, attention, dense_attention
from blt_jax.objectives import blt_d_loss, blt_loss
from blt_jax.patching import patch_ids, start_flags
from blt_jax.tokenizer import BLOCK_PAD_ID, BOS_ID, MASK_ID
from blt_jax.train.checkpoint import load_trained_params
from blt_jax.train.loop import resolve_task, train
from conftest import tiny_config

P = 40  # the tiny preset's patch slots


def worked_example(block_size=4, max_patches=5):
    """docs/fast-blt.md §1's worked example: bytes 0..9, patches {0}, {1,2,3}, {4,5}, {6,7,8,9} (+ the trailing
    empty one)."""
    tokens = jnp.asarray([[BOS_ID] + list(range(100, 109))])
    starts = np.zeros((1, 11), bool)
    starts[0, [0, 1, 4, 6, 10]] = True
    ids = patch_ids(jnp.asarray(starts), max_patches)
    return tokens, jnp.asarray(starts), ids, diffusion.block_layout(tokens, jnp.asarray(starts), ids.valid,
                                                                   block_size, max_patches)


def test_block_layout_on_the_papers_worked_example():
    tokens, _, ids, lay = worked_example()
    assert lay.starts.tolist() == [[1, 4, 6, 10]]  # blocks of patches 1..3; the trailing empty patch: none
    assert lay.positions[0, :3].tolist() == [[1, 2, 3, 4], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert lay.targets[0].tolist() == [[100, 101, 102, 103], [103, 104, 105, 106], [105, 106, 107, 108],
                                       [BLOCK_PAD_ID] * 4]
    assert lay.live[0].tolist() == [[True] * 4] * 3 + [[False] * 4]
    assert lay.cross_ids[0, :3, 0].tolist() == [0, 1, 2]  # o1, o2, o3: the latent before each block's start
    assert ids.decoder_ids[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]  # clean bytes: the BLT rule

    _, _, _, wide = worked_example(block_size=6)  # blocks run past the window's end: [PAD], no target
    assert wide.targets[0, 2].tolist() == [105, 106, 107, 108, BLOCK_PAD_ID, BLOCK_PAD_ID]
    assert wide.live[0, 2].tolist() == [True] * 4 + [False] * 2
    _, _, ids3, cut = worked_example(max_patches=3)  # patch {6..9} truncated: its bytes are no targets
    assert cut.starts.tolist() == [[1, 4]] and not bool(ids3.valid[0, 6])
    assert cut.live[0, 1].tolist() == [True, True, False, False]


def test_worked_example_mask_follows_the_rules():
    """Block b2 (positions 4-7) sees clean bytes 0-3 and its own four cells; clean bytes never see cells."""
    _, _, _, lay = worked_example()
    m = np.asarray(BlockDiffusionMask(positions=lay.positions, segments=None, window=None).dense(10))[0]
    assert m.shape == (26, 26)
    assert (m[:10, :10] == np.tril(np.ones((10, 10), bool))).all() and not m[:10, 10:].any()
    for j, s in enumerate([1, 4, 6, 10]):
        rows = m[10 + 4 * j: 14 + 4 * j]
        assert rows[:, :s].all() and not rows[:, s:10].any(), j  # clean < s_i only
        own = np.zeros(16, bool)
        own[4 * j: 4 * j + 4] = True
        assert (rows[:, 10:] == own[None]).all(), j  # its own block, in both directions


@pytest.mark.parametrize("window,N,with_segments,kv_heads", [
    (None, 40, False, 2), (16, 40, True, 1), (64, 64, True, 2), (8, 64, False, 4)])
def test_block_attention_equals_dense_masked_attention(window, N, with_segments, kv_heads):
    B, nb, Bk, H, D = 2, 6, 4, 4, 8
    rng = np.random.default_rng(0)
    starts = np.sort(np.stack([rng.choice(np.arange(1, N), nb, replace=False) for _ in range(B)]), axis=1)
    starts[:, -1] = N  # a slot without a block
    starts[:, 0] = 1  # a block inside the first window
    seg = jnp.asarray(np.cumsum(rng.random((B, N)) < 0.08, axis=1)) if with_segments else None
    mask = BlockDiffusionMask(positions=jnp.asarray(starts[:, :, None] + np.arange(Bk)), segments=seg, window=window)
    T = N + nb * Bk
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (B, T, H, D))
    k, v = jax.random.normal(kk, (B, T, kv_heads, D)), jax.random.normal(kv, (B, T, kv_heads, D))
    fast, dense, reference = jax.jit(lambda q, k, v, m: (attention(q, k, v, m), m.dense(N),
                                                          dense_attention(q, k, v, m.dense(N))))(q, k, v, mask)
    np.testing.assert_allclose(fast, reference, atol=2e-6)

    # the reference mask itself, rule by rule
    d, seg = np.asarray(dense), None if seg is None else np.asarray(seg)
    pos = np.arange(N)
    clean = pos[None, :] <= pos[:, None]
    if window:
        clean &= pos[:, None] - pos[None, :] < window
    for b in range(B):
        same_doc = True if seg is None else seg[b][:, None] == seg[b][None, :]
        assert (d[b, :N, :N] == (clean & same_doc)).all() and not d[b, :N, N:].any()  # never a cell
        for j, s in enumerate(starts[b]):
            for c in range(Bk):
                row = d[b, N + j * Bk + c]
                want = (pos < s) & ((s + c - pos < window) if window else True)
                if seg is not None:
                    want &= seg[b] == seg[b, s - 1]
                assert (row[:N] == want).all(), (b, j, c)
                assert (row[N:] == (np.arange(nb * Bk) // Bk == j)).all(), (b, j, c)


# ---- a random tiny BLT-D ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_blt_d(tmp_path_factory):
    cfg = tiny_config(str(tmp_path_factory.mktemp("unused")), "model.patching.threshold=4.5",
                      "model.diffusion.block_size=4").model
    graphdef, params = build(cfg, seed=0)
    rng = np.random.default_rng(0)
    B, N = 3, 64
    tokens = rng.integers(4, 260, (B, N))
    tokens[:, 0] = BOS_ID
    tokens[1, 29] = BOS_ID  # a second document inside the window
    starts = rng.random((B, N + 1)) < 0.3
    starts[:, :2] = True
    starts[1, 29:31] = True
    starts[2, 50:] = False  # a long patch: blocks of patch slots that do not exist
    tokens = jnp.asarray(tokens)
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "loss_mask": jnp.ones((B, N)),
             "patch_starts": jnp.asarray(starts)}
    return cfg, graphdef, params, batch


def _layout_and_cells(model, batch, t=0.5, seed=3):
    ctx = model.context(batch["tokens"], batch["patch_starts"], P)
    lay = diffusion.block_layout(batch["tokens"], batch["patch_starts"], ctx.ids.valid,
                                 model.cfg.diffusion.block_size, P)
    cells, masked = diffusion.corrupt(lay, jax.random.key(seed), jnp.full((batch["tokens"].shape[0],), t))
    return ctx, lay, cells, masked


def _both_layouts(model, batch):
    """Every block's logits (B, nb, Bk, V) in the training layout and in generation's (inference) layout."""
    ctx, lay, cells, masked = _layout_and_cells(model, batch)
    N = batch["tokens"].shape[1]
    train_layout = diffusion.decode_blocks(model, ctx, lay, cells)[:, N:].reshape(cells.shape + (-1,))
    inference = diffusion.inference_layout_logits(model, batch["tokens"], batch["patch_starts"], lay, cells, P)
    return train_layout, inference, lay, masked


def test_training_layout_equals_inference_layout(random_blt_d):
    """Each block's logits in the training layout equal those of the block decoded alone after its truncated
    prefix, as generation does: the training layout can see nothing generation cannot."""
    _, graphdef, params, batch = random_blt_d

    @jax.jit
    def both(params):
        train_layout, inference, lay, masked = _both_layouts(nnx.merge(graphdef, params), batch)
        return train_layout, inference, lay.live, masked

    train_layout, inference, live, masked = both(params)
    assert int(masked.sum()) > 50
    gap = jnp.max(jnp.abs(train_layout - inference) * live[..., None])
    assert float(gap) < 1e-4, float(gap)


def test_masked_cell_gets_no_gradient_from_its_clean_copy_or_later_bytes(random_blt_d):
    """d(CE of a masked cell of block s_i) / d(decoder input of clean byte j) is exactly 0 for j >= s_i (its
    own clean copy included) and non-zero for every j < s_i (one document, window = N in the tiny preset)."""
    _, graphdef, params, batch = random_blt_d
    N = batch["tokens"].shape[1]
    row = 0
    chosen = [(j, c) for j in (0, 3, 8) for c in (0, 3)]  # first and last cell of a few blocks

    @jax.jit
    def jacobian(params):
        model = nnx.merge(graphdef, params)
        ctx, lay, cells, masked = _layout_and_cells(model, batch, t=1.0)

        def cell_losses(h_clean):  # the decoder input of row `row`'s clean bytes -> the chosen cells' CE
            ctx_h = ctx._replace(h=ctx.h.at[row].set(h_clean))
            logits = diffusion.decode_blocks(model, ctx_h, lay, cells)[row, N:].reshape(cells.shape[1:] + (-1,))
            logp = jax.nn.log_softmax(logits)
            return jnp.stack([-logp[j, c, lay.targets[row, j, c]] for j, c in chosen])

        return jax.jacrev(cell_losses)(ctx.h[row]), lay.starts, masked  # (cells, N, D)

    jac, starts, masked = map(np.asarray, jacobian(params))
    for (j, c), g in zip(chosen, jac, strict=True):
        s = int(starts[row, j])
        assert masked[row, j, c] and s + c < N
        norms = np.abs(g).sum(-1)
        assert (norms[s:] == 0).all(), (j, c, s, np.nonzero(norms[s:]))
        assert (norms[:s] > 0).all(), (j, c, s)


def test_masked_loss_is_the_weighted_masked_cross_entropy():
    _, _, _, lay = worked_example()
    lay = jax.tree.map(lambda x: jnp.concatenate([x, x]), lay)  # two examples with different t
    cells, masked = diffusion.corrupt(lay, jax.random.key(0), jnp.array([1.0, 1.0]))
    assert (masked == lay.live).all() and (cells[~lay.live] == BLOCK_PAD_ID).all()  # [PAD] is never masked
    assert (cells[lay.live] == MASK_ID).all()
    masked = masked & (jnp.arange(4)[None, None, :] % 2 == 0)
    t = jnp.array([0.25, 0.8])
    logits = jax.random.normal(jax.random.key(1), lay.targets.shape + (260,))
    loss, stats = diffusion.masked_diffusion_loss(logits, lay, masked, t)

    logp = np.asarray(jax.nn.log_softmax(logits))
    targets, m = np.asarray(lay.targets), np.asarray(masked)
    want = correct = 0.0
    for e, j, c in zip(*np.nonzero(m), strict=True):
        want += -logp[e, j, c, targets[e, j, c]] / float(t[e])
        correct += float(np.argmax(logp[e, j, c]) == targets[e, j, c])
    live, n_masked = int(lay.live.sum()), int(masked.sum())
    assert live == 24 and n_masked == 12
    np.testing.assert_allclose(float(loss), want / live, rtol=1e-6)
    np.testing.assert_allclose(float(stats["log_masked_accuracy"]), correct / n_masked)
    np.testing.assert_allclose(float(stats["log_mask_rate"]), n_masked / live)
    garbage = jnp.where(lay.live[..., None], logits, 1e4 * jnp.arange(260.0))  # [PAD] cells never count
    np.testing.assert_allclose(float(diffusion.masked_diffusion_loss(garbage, lay, masked, t)[0]), float(loss),
                               rtol=1e-6)


def test_blt_d_loss_is_next_byte_plus_weighted_masked_loss(random_blt_d):
    cfg, graphdef, params, batch = random_blt_d
    plain_graphdef, _ = build(dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, block_size=0)))
    rng = jax.random.key(7)

    @jax.jit
    def losses(params):
        plain = nnx.merge(plain_graphdef, params)
        blt_d = nnx.merge(graphdef, params)
        return (blt_loss(plain, batch, rng, False, jnp.float32), blt_loss(plain, batch, None, False, jnp.float32),
                blt_loss(blt_d, batch, rng, False, jnp.float32, objective="blt-d"),
                blt_d_loss(blt_d, batch, rng, False, jnp.float32), blt_loss(blt_d, batch, None, False, jnp.float32))

    (p_rng, p_stats), (p_none, _), (d_loss, d_stats), (direct, _), (d_eval, d_eval_stats) = losses(params)
    assert float(p_rng) == float(p_none) == float(d_eval)  # the default objective is next-byte, rng or not
    assert float(direct) == float(d_loss)
    clean = d_stats["nll_sum"] / d_stats["bytes"]
    np.testing.assert_allclose(float(clean), float(p_rng), rtol=1e-5)  # L_clean is plain BLT's loss
    np.testing.assert_allclose(float(d_stats["nll_sum"]), float(p_stats["nll_sum"]), rtol=1e-5)
    np.testing.assert_allclose(float(d_loss), float(clean + cfg.diffusion.weight * d_stats["log_diffusion_loss"]),
                               rtol=1e-6)
    assert 0 < float(d_stats["log_mask_rate"]) < 1 and float(d_stats["log_diffusion_loss"]) > 0


def test_generation_block_pass_equals_the_training_layout():
    """The engine's first decoder pass over B [MASK] cells after a prompt that ends at a patch boundary gives
    the training layout's logits for that patch's block: BLT-D generates in the layout it was trained in.
    The prompt goes through generation's real prefill, padded into its length bucket (the block must sit right
    after the prompt and never see the padding)."""
    cfg = tiny_config("unused", 'model.patching.mode="static"', "model.diffusion.block_size=4").model
    _, params = build(cfg, seed=1)
    loaded = from_params(cfg, params)
    rng = np.random.default_rng(1)
    N, Bk = 48, 4
    tokens = jnp.asarray(np.concatenate([[BOS_ID], rng.integers(4, 260, N - 1)])[None].astype(np.int32))
    starts = jnp.asarray(start_flags(cfg.patching, np.asarray(tokens)))

    @jax.jit
    def training_layout(params):
        model = nnx.merge(loaded.spec.graphdef, params)
        ctx = model.context(tokens, starts, P)
        lay = diffusion.block_layout(tokens, starts, ctx.ids.valid, Bk, P)
        cells = jnp.where(lay.live, MASK_ID, BLOCK_PAD_ID)
        return diffusion.decode_blocks(model, ctx, lay, cells)[:, N:].reshape(cells.shape + (-1,)), lay.starts

    want, block_starts = training_layout(params)
    mc = samplers.MethodConfig("d", block_size=Bk)
    checked = 0
    for j, s in enumerate(np.asarray(block_starts[0])):
        if s + Bk > N or s < 2 or j % 3:
            continue
        batch = prepare_prompts([bytes((np.asarray(tokens[0, 1:s]) - 4).tolist())], 8, extra_positions=mc.lookahead)
        assert batch.prompt_len > s  # padded: the bug this guards read the padding's keys
        carry = samplers.prefill(loaded.spec, mc, loaded.all_params(), jnp.asarray(batch.tokens),
                                 jnp.asarray(batch.lengths), jnp.asarray([8]), jnp.zeros((1, 2), jnp.uint32), None,
                                 prompt_len=batch.prompt_len)
        np.testing.assert_allclose(np.asarray(carry.block_logits[0]), np.asarray(want[0, j]), atol=1e-4,
                                   err_msg=f"block {j}")
        checked += 1
    assert checked >= 3


# ---- trained: the leak regression --------------------------------------------------------------------------------

def _leaky_block_mask(layout, segments, window):
    """A deliberate leak: block cells also see the clean byte at their own position (their target)."""
    honest = BlockDiffusionMask(positions=layout.positions, segments=segments, window=window)
    B, N = segments.shape
    dense = honest.dense(N)
    cell_pos = layout.positions.reshape(B, -1)
    own = (cell_pos[:, :, None] == jnp.arange(N)[None, None, :])
    return dense.at[:, N:, :N].set(dense[:, N:, :N] | own)


def _masked_accuracies(cfg, run_dir, root):
    """Masked accuracy (t = 0.5) in the training layout and in the inference layout on held-out windows,
    and the accuracy of always guessing the most frequent masked byte (chance)."""
    task = resolve_task("blt", cfg)
    batches = pipeline.make_eval_batches(task.cfg.data, "heldout", task.train_transform, task.fields, num_batches=2)
    graphdef, _ = build(cfg.model)
    params = load_trained_params(run_dir)

    @jax.jit
    def counts(params, batch):
        train_layout, inference, lay, masked = _both_layouts(nnx.merge(graphdef, params), batch)
        hist = jnp.zeros(260).at[lay.targets].add(masked.astype(jnp.float32))
        return (diffusion.masked_accuracy(train_layout, lay, masked)[0],
                diffusion.masked_accuracy(inference, lay, masked)[0], masked.sum(), hist)

    totals = [sum(x) for x in zip(*(counts(params, pipeline_batch) for pipeline_batch in
                                    ({k: jnp.asarray(v) for k, v in b.items()} for b in batches)), strict=True)]
    n = float(totals[2])
    return float(totals[0]) / n, float(totals[1]) / n, float(jnp.max(totals[3])) / n


def test_leaky_mask_breaks_the_layout_equivalence(random_blt_d, monkeypatch):
    """The equivalence test above can fail: with cells that see their own clean copy, the training layout's
    logits leave the inference layout's."""
    _, graphdef, params, batch = random_blt_d
    monkeypatch.setattr(diffusion, "block_mask", _leaky_block_mask)

    @jax.jit
    def gap(params):
        train_layout, inference, lay, _ = _both_layouts(nnx.merge(graphdef, params), batch)
        return jnp.max(jnp.abs(train_layout - inference) * lay.live[..., None])

    assert float(gap(params)) > 1e-2


PATTERN = "abc defg hi jklmn opq rstu vw xyz\n"
PATTERN_SETS = ["data.batch_size=16", "train.steps=200", "train.warmup_steps=5", "train.log_every=10",
                "train.eval_batches=1", "train.checkpoint_every=1000", "model.patching.mode=\"static\"",
                "model.patching.patch_size=4"]


@pytest.fixture(scope="module")
def patterned_blt_d(tmp_path_factory):
    """A tiny BLT-D-8 trained by `blt train --objective blt-d` on text a tiny model learns in a few dozen
    steps (a spaced alphabet, line after line; 200 steps, about a minute): (config, data root, run directory).
    Static 4-byte patches put every generated 8-byte block on a patch boundary, where training puts blocks
    (the paper's Algorithm 1 treats the prefix end as a boundary even where the entropy rule would not:
    docs/fast-blt.md §2, "BLT-D")."""
    base = tmp_path_factory.mktemp("patterned")
    corpus = base / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"part{i}.txt").write_text(PATTERN * 3000)
    root = str(base / "data")
    prepare.prepare_corpus(root, [str(corpus)])
    args = ["train", "--preset", "tiny", "--store", root, "--objective", "blt-d", "--block-size", "8", "--no-progress"]
    assert main(args + ["--run", str(base / "honest")] + [x for s in PATTERN_SETS for x in ("--set", s)]) == 0
    return tiny_config(root, *PATTERN_SETS, "model.diffusion.block_size=8"), root, base / "honest"


def test_trained_blt_d_fills_blocks_in_fewer_passes_than_bytes(patterned_blt_d):
    """On the trained model: BLT-D continues the pattern with fewer decoder calls than bytes; BLT-S and BLT-DV
    reproduce the model's own AR output, and their drafts are mostly accepted."""
    _, _, run = patterned_blt_d
    model = api.load(str(run))
    prompts = [PATTERN * 2 + PATTERN[:k] for k in (4, 12, 20, 32)]  # 4m bytes: blocks start on boundaries
    want = [(PATTERN * 4)[len(p) - 2 * len(PATTERN):][:32] for p in prompts]
    d = api.generate(model, prompts, max_new_bytes=32, method="d", stop_at_eos=False)
    correct = sum(a == b for r, w in zip(d, want, strict=True)
                  for a, b in zip(r.text, w, strict=False)) / (32 * len(prompts))
    calls = sum(r.cost["decoder_calls"] for r in d)
    print(f"BLT-D-8: {correct:.0%} of bytes continue the pattern, {calls / (32 * len(prompts)):.2f} decoder calls/byte")
    assert correct > 0.75 and calls < 32 * len(prompts) / 2  # measured: 88%, 0.25 calls/byte
    ar = api.generate(model, prompts, max_new_bytes=32, method="ar", stop_at_eos=False)
    for method, kw in (("s", {"draft_len": 8}), ("dv", {})):
        res = api.generate(model, prompts, max_new_bytes=32, method=method, stop_at_eos=False, **kw)
        assert [r.token_ids for r in res] == [r.token_ids for r in ar], method
        acceptance = sum(r.cost["accepted"] for r in res) / sum(r.cost["drafted"] for r in res)
        print(f"{method}: acceptance {acceptance:.2f}")
        assert acceptance > 0.5, method


@pytest.mark.slow
def test_trained_masked_accuracy_is_the_same_in_training_and_inference_layouts(patterned_blt_d, tmp_path,
                                                                                monkeypatch):
    """Trained with the honest mask, masked-cell accuracy where generation decodes (the inference layout)
    matches the training layout's and beats always guessing the most frequent byte. A deliberately leaky
    mask (cells see their own clean copy) drives the training-layout accuracy far above the inference
    layout's, so this test can fail."""
    cfg, root, honest = patterned_blt_d
    train_acc, inference_acc, chance = _masked_accuracies(cfg, honest, root)
    print(f"honest: training layout {train_acc:.3f}, inference layout {inference_acc:.3f}, chance {chance:.3f}")
    assert abs(train_acc - inference_acc) < 0.05 and min(train_acc, inference_acc) > chance + 0.2

    monkeypatch.setattr(diffusion, "block_mask", _leaky_block_mask)
    train("blt", cfg, tmp_path / "leaky", progress=False)
    leaky_train, leaky_inference, _ = _masked_accuracies(cfg, tmp_path / "leaky", root)
    print(f"leaky: training layout {leaky_train:.3f}, inference layout {leaky_inference:.3f}")
    assert leaky_train > leaky_inference + 0.1
