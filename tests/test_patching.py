"""Patching follows the reference code's rules exactly; checked against independent pure-Python versions."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from blt_jax.config import ConfigError, PatchingConfig
from blt_jax.patching import (PatchCarry, calibrate_threshold, chunk_start_flags, mean_patch_length, patch_ids,
                              patch_lengths, start_flags, starts_from_lengths)
from blt_jax.tokenizer import BOS_ID, encode

THR = 1.0


# ---- pure-Python transcriptions of the reference rules (facebookresearch/blt patcher.py, HF modeling_blt) ----

def ref_entropy_starts(H, thr, rule="global", add=None):
    """Start ids as the reference computes them (include_next_token: ids may equal len(H))."""
    e = list(H[1:])  # the reference drops the BOS entropy; e[j] decides whether byte j + 2 starts a patch
    starts = [0, 1]
    for j in range(len(e)):
        if rule == "global":
            hit = e[j] > thr
        elif rule == "monotonic":
            hit = True if j == 0 else e[j] - e[j - 1] > thr
        else:  # global_and_monotonic: mask[0] is True and ~mask[j - 1] vetoes j == 1
            hit = True if j == 0 else (e[j] - e[j - 1] > add) and (e[j] > thr) and j != 1
        if hit:
            starts.append(j + 2)
    return starts


def ref_lengths(starts, S):
    """HF's patch_lengths_from_entropies: lengths sum to S, a start at S yields a trailing 0."""
    ends = [s - 1 for s in starts[1:]] + [S - 1]
    return [e - s + 1 for s, e in zip(starts, ends, strict=True)]


def split_large_numbers(lst, m):
    out = []
    for i in lst:
        while i > m:
            out.append(m)
            i -= m
        out.append(i)
    return out


def ref_space_starts(tokens):
    b = [t - 4 for t in tokens]
    space = [(x < ord("0")) or (ord("9") < x < ord("A")) or (ord("Z") < x < ord("a")) or (ord("z") < x < 0x80)
             or (x >= 0xC0) for x in b]
    end = [space[j] and not (j > 0 and space[j - 1]) or tokens[j] < 4 for j in range(len(tokens))]
    return [0, 1] + [j + 1 for j in range(1, len(tokens)) if end[j]]


def ours(cfg, tokens, H=None, xp=np):
    t = xp.asarray(tokens)[None]
    h = None if H is None else xp.asarray(H, dtype=xp.float32)[None]
    return np.asarray(start_flags(cfg, t, h, THR))[0]


def lengths_of(starts):
    pos = np.nonzero(starts)[0].tolist()
    S = len(starts) - 1
    return [b - a for a, b in zip(pos, pos[1:] + [S], strict=True)]


def random_case(seed, S=60):
    rng = np.random.default_rng(seed)
    tokens = np.concatenate([[BOS_ID], rng.integers(4, 260, S - 1)])
    H = rng.gamma(2.0, 0.5, S).astype(np.float32)
    return tokens, H


# ---- rules --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["global", "monotonic", "global_and_monotonic"])
@pytest.mark.parametrize("seed", range(5))
def test_entropy_rules_match_reference(rule, seed):
    tokens, H = random_case(seed)
    cfg = PatchingConfig(rule=rule, threshold_add=0.1 if rule == "global_and_monotonic" else None)
    want = ref_entropy_starts(H, THR, rule, 0.1)
    for xp in (np, jnp):
        got = np.nonzero(ours(cfg, tokens, H, xp))[0].tolist()
        assert got == want


def test_global_lengths_equal_hf_including_trailing_empty_patch():
    tokens, H = random_case(7, S=30)
    H[-1] = THR + 1.0  # the last byte's entropy is high: the next byte would start a patch
    starts = ours(PatchingConfig(), tokens, H)
    want = ref_lengths(ref_entropy_starts(H, THR), len(tokens))
    assert want[-1] == 0 and lengths_of(starts) == want
    ids = patch_ids(starts[None], 64)
    assert int(ids.num_patches[0]) == len(want)  # the empty trailing patch is a real (last) patch
    np.testing.assert_array_equal(np.asarray(patch_lengths(ids, 64))[0, : len(want)], want)


@pytest.mark.parametrize("seed", range(6))
def test_max_patch_length_splits_like_reference(seed):
    """Equal to the reference's post-hoc split; the only addition is the trailing empty patch the causal
    rule implies when the last (split) patch ends exactly at a multiple of m."""
    m = 3
    tokens, H = random_case(seed, S=50)
    H = H * 0.6  # longer patches, so splitting matters
    ref_starts = ref_entropy_starts(H, THR)
    want = split_large_numbers([n for n in ref_lengths(ref_starts, 50) if n > 0], m)
    got = lengths_of(ours(PatchingConfig(max_patch_length=m), tokens, H))
    trailing = 50 in ref_starts or (50 - max(s for s in ref_starts if s < 50)) % m == 0
    assert got == want + ([0] if trailing else [])
    assert max(got) <= m


def test_max_patch_length_with_no_entropy_starts():
    tokens, H = random_case(0, S=20)
    got = lengths_of(ours(PatchingConfig(max_patch_length=8), tokens, np.zeros_like(H)))
    assert got == [1, 8, 8, 3]


def test_space_patching_matches_reference():
    tokens = encode("def f(x):  return x**2 +  ünïcode\n\tpass")
    want = ref_space_starts(tokens.tolist())
    got = np.nonzero(ours(PatchingConfig(mode="space"), tokens))[0].tolist()
    assert got == want


def test_static_patches():
    tokens = encode("abcdefghij")  # BOS + 10 bytes
    assert lengths_of(ours(PatchingConfig(mode="static", patch_size=4), tokens)) == [1, 4, 4, 2]
    tokens = encode("abcdefgh")  # BOS + 8: the last byte closes a patch -> trailing empty patch
    assert lengths_of(ours(PatchingConfig(mode="static", patch_size=4), tokens)) == [1, 4, 4, 0]
    both = np.concatenate([encode("abcde"), encode("xyz")])  # a second document restarts the grid
    assert lengths_of(ours(PatchingConfig(mode="static", patch_size=2), both)) == [1, 2, 2, 1, 1, 2, 1]


def test_byte_patching():
    tokens = encode("abc")
    assert lengths_of(ours(PatchingConfig(mode="byte"), tokens)) == [1, 1, 1, 1, 0]


def test_document_start_gets_its_own_patch():
    tokens = np.concatenate([encode("hello"), encode("world")])
    starts = ours(PatchingConfig(), tokens, np.zeros(len(tokens), np.float32))  # no entropy starts at all
    bos = 6
    assert starts[bos] and starts[bos + 1]


# ---- invariants ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["entropy", "static", "space", "byte"])
def test_patching_is_causal(mode):
    cfg = PatchingConfig(mode=mode, max_patch_length=5)
    tokens, H = random_case(3, S=64)
    full = ours(cfg, tokens, H)
    for cut in (2, 17, 40, 63):
        prefix = ours(cfg, tokens[:cut], H[:cut])
        np.testing.assert_array_equal(prefix, full[: cut + 1])


def test_decoder_ids_follow_the_next_byte_rule_and_hf():
    """decoder id of byte t = patch(t + 1) - 1 = HF's `_patch_ids_from_lengths(lengths[:, 1:])`."""
    tokens, H = random_case(11, S=40)
    H[-1] = THR + 1
    starts = ours(PatchingConfig(), tokens, H)
    ids = patch_ids(starts[None], 64)
    enc = np.asarray(ids.encoder_ids)[0]
    dec = np.asarray(ids.decoder_ids)[0]
    lengths = lengths_of(starts)
    hf_starts = np.concatenate([[0], np.cumsum(lengths[1:])[:-1]])
    hf_dec = (hf_starts[None, :] <= np.arange(40)[:, None]).sum(1) - 1
    np.testing.assert_array_equal(dec, hf_dec)
    next_patch = np.concatenate([enc[1:], [enc[-1] + int(starts[40])]])
    np.testing.assert_array_equal(dec, next_patch - 1)
    last_of_patch = np.nonzero(starts[1:])[0]  # byte t is the last of its patch iff t + 1 starts one
    np.testing.assert_array_equal(dec[last_of_patch], enc[last_of_patch])  # ... and reads its own latent
    others = np.setdiff1d(np.arange(40), last_of_patch)
    np.testing.assert_array_equal(dec[others], enc[others] - 1)


def test_batch_rows_with_different_patch_counts_pad_with_empty_slots():
    (t1, h1), (t2, h2) = random_case(1, 32), random_case(2, 32)
    h2 = h2 * 0.3  # fewer patches
    starts = start_flags(PatchingConfig(), np.stack([t1, t2]), np.stack([h1, h2]), THR)
    ids = patch_ids(starts, 40)
    lengths = np.asarray(patch_lengths(ids, 40))
    n = np.asarray(ids.num_patches)
    assert n[0] > n[1]
    for row in range(2):
        assert lengths[row, : n[row]].sum() == 32 and (lengths[row, n[row]:] == 0).all()
        assert lengths_of(starts[row]) == lengths[row, : n[row]].tolist()


def test_truncation_beyond_max_patches():
    starts = ours(PatchingConfig(mode="byte"), encode("abcdefghij"))  # 11 bytes -> 12 patches
    ids = patch_ids(starts[None], 5)
    valid = np.asarray(ids.valid)[0]
    assert valid.tolist() == [True] * 5 + [False] * 6
    assert int(ids.num_patches[0]) == 5 and int(ids.total_patches[0]) == 12
    assert (np.asarray(ids.encoder_ids)[0, 5:] == 5).all()  # sentinel: pooled into no patch


def test_numpy_and_jax_paths_agree():
    tokens, H = random_case(5, S=64)
    for cfg in (PatchingConfig(max_patch_length=4), PatchingConfig(mode="space"),
                PatchingConfig(mode="static", patch_size=3)):
        np.testing.assert_array_equal(ours(cfg, tokens, H, np), ours(cfg, tokens, H, jnp))


def test_starts_from_lengths_roundtrip():
    tokens, H = random_case(9, S=30)
    H[-1] = THR + 1
    starts = ours(PatchingConfig(), tokens, H)
    np.testing.assert_array_equal(starts_from_lengths([lengths_of(starts)], 30)[0], starts)
    with pytest.raises(ValueError):
        starts_from_lengths([[1, 0, 29]], 30)


def test_calibration_hits_target_mean_patch_length():
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 260, (64, 128))
    H = rng.gamma(2.0, 0.7, (64, 128)).astype(np.float32)
    cfg = PatchingConfig()
    for target in (3.0, 4.0, 6.0):
        thr, achieved = calibrate_threshold(cfg, tokens, H, target)
        assert abs(achieved - target) < 0.05 * target
        assert abs(mean_patch_length(start_flags(cfg, tokens, H, thr)) - achieved) < 1e-9
    lo, _ = calibrate_threshold(cfg, tokens, H, 3.0)
    hi, _ = calibrate_threshold(cfg, tokens, H, 6.0)
    assert lo < hi


def test_entropy_patching_without_threshold_is_a_clear_error():
    with pytest.raises(ConfigError, match="threshold"):
        start_flags(dataclasses.replace(PatchingConfig(), threshold=None), np.ones((1, 4), int), np.ones((1, 4)))


# ---- incremental patching (generation) == the whole-sequence rules ----------------------------------------------

INCREMENTAL_CASES = [
    PatchingConfig(mode="entropy", threshold=THR),
    PatchingConfig(mode="entropy", threshold=THR, max_patch_length=3),
    PatchingConfig(mode="entropy", threshold=0.3, rule="monotonic", max_patch_length=5),
    PatchingConfig(mode="entropy", threshold=THR, rule="global_and_monotonic", threshold_add=0.1),
    PatchingConfig(mode="entropy", threshold=THR, document_starts=False),
    PatchingConfig(mode="static", patch_size=3),
    PatchingConfig(mode="static", patch_size=4, max_patch_length=2),
    PatchingConfig(mode="space"),
    PatchingConfig(mode="space", max_patch_length=4),
    PatchingConfig(mode="byte"),
]


@pytest.mark.parametrize("cfg", INCREMENTAL_CASES, ids=lambda c: f"{c.mode}-{c.rule}-{c.max_patch_length}")
def test_chunked_start_flags_equal_the_whole_sequence_rules(cfg):
    """Generation computes patch starts chunk by chunk from the last two bytes and a carried state; the flags
    (including each chunk's virtual next byte) must equal `start_flags` over the whole sequence, for every
    rule, with documents (mid-sequence BOS) and ragged chunk lengths per row."""

    rng = np.random.default_rng(0)
    B, S, T = 3, 61, 7
    tokens = rng.choice([BOS_ID, 4 + ord(" "), 4 + ord("a"), 4 + ord("7"), 4 + ord("."), 4 + 0xC3], size=(B, S),
                        p=[0.03, 0.2, 0.3, 0.2, 0.17, 0.1]).astype(np.int32)
    tokens[:, 0] = BOS_ID
    H = rng.uniform(0, 2, size=(B, S)).astype(np.float32)
    want = np.asarray(start_flags(cfg, tokens, H))  # (B, S + 1)

    got = np.zeros((B, S + 1), bool)
    length = np.zeros(B, np.int32)
    carry = PatchCarry.initial(B)
    carries = []
    while (length < S).any():
        n = np.minimum(rng.integers(0, T + 1, size=B), S - length).astype(np.int32)
        pad = lambda a, fill: np.concatenate([a, np.full((B, T + 2), fill, a.dtype)], axis=1)  # noqa: E731
        take = lambda a, off, w: np.stack([a[b, max(off[b], 0):][:w] if off[b] >= 0 else  # noqa: E731
                                           np.concatenate([np.zeros(-off[b], a.dtype), a[b, :w + off[b]]])
                                           for b in range(B)])
        tp, hp = pad(tokens, 0), pad(H, 0.0)
        flags, new = chunk_start_flags(cfg, None,
                                       jnp.asarray(take(tp, length - 2, 2)), jnp.asarray(take(hp, length - 2, 2)),
                                       jnp.asarray(take(tp, length, T)), jnp.asarray(take(hp, length, T)),
                                       jnp.asarray(length), jnp.asarray(n), carry)
        flags = np.asarray(flags)
        for b in range(B):
            got[b, length[b]:length[b] + n[b] + 1] = flags[b, :n[b] + 1]
            if n[b]:
                carry = PatchCarry(carry.last_natural.at[b].set(new.last_natural[b, n[b] - 1]),
                                   carry.last_bos.at[b].set(new.last_bos[b, n[b] - 1]))
        length = length + n
        carries.append(carry)
    np.testing.assert_array_equal(got, want)
    assert want[:, 2:S].any() and not want[:, 2:S].all() or cfg.mode == "byte"
