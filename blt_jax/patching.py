"""Patch boundaries: which bytes start a new patch, as static-shaped arrays.

One implementation serves the host (NumPy, in the data pipeline) and the device (jax.numpy, inside jit):
every function takes `xp`-agnostic arrays and dispatches on their type.

Conventions (the reference code's; docs/transformers.md §4, and docs/engine.md §4 for the incremental form):
- `starts` has shape (B, S + 1): `starts[:, t]` says whether byte t starts a patch; index S is the virtual
  next byte ("include_next_token"), so a sequence whose last byte closes a patch ends with a zero-length
  patch. Position 0 (BOS) is a patch of its own and position 1 always starts a patch.
- Entropy `H[t]` is the entropy of the entropy model's prediction made *at* t (for byte t + 1), so byte
  t + 1 starts a patch when `H[t]` exceeds the threshold (global rule).
- Every rule is causal: whether byte t starts a patch depends on bytes < t only. `max_patch_length` is
  applied as "a patch also starts m bytes after the previous start", which equals the reference's post-hoc
  splitting of long patches except that it keeps the trailing empty patch the causal rule implies.
- Documents: a BOS in the middle of a window starts a patch of its own, like position 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from blt_jax.config import ConfigError, PatchingConfig
from blt_jax.tokenizer import BOS_ID, OFFSET


def _xp(*arrays) -> Any:
    return jnp if any(isinstance(a, jax.Array) for a in arrays if a is not None) else np


def _cummax(xp, x):
    return jax.lax.cummax(x, axis=1) if xp is jnp else np.maximum.accumulate(x, axis=1)


def _shift_right(xp, x, fill):
    """out[:, t] = x[:, t - 1]; out[:, 0] = fill."""
    pad = xp.full(x.shape[:1] + (1,), fill, dtype=x.dtype)
    return xp.concatenate([pad, x[:, :-1]], axis=1)


def space_like(tokens):
    """The reference's space patching class: not [0-9A-Za-z] and not a UTF-8 continuation byte."""
    b = tokens - OFFSET
    return ((b < ord("0")) | ((b > ord("9")) & (b < ord("A"))) | ((b > ord("Z")) & (b < ord("a")))
            | ((b > ord("z")) & (b < 0x80)) | (b >= 0xC0))


def start_flags(cfg: PatchingConfig, tokens, entropies=None, threshold: Optional[float] = None):
    """Boolean (B, S + 1) patch-start flags for `tokens` (B, S) under `cfg`."""
    xp = _xp(tokens, entropies)
    tokens = xp.asarray(tokens)
    B, S = tokens.shape
    pos = xp.arange(S + 1)[None, :]
    true2 = xp.ones((B, 2), dtype=bool)

    if cfg.mode == "byte":
        starts = xp.ones((B, S + 1), dtype=bool)
    elif cfg.mode == "static":
        bos_at = xp.where(tokens == BOS_ID, xp.arange(S)[None, :], 0)
        # anchor(t) = last BOS strictly before t (or 0): the grid restarts after every document start.
        anchor = _shift_right(xp, _cummax(xp, bos_at), 0)
        anchor = xp.concatenate([anchor, _cummax(xp, bos_at)[:, -1:]], axis=1)
        starts = (pos >= 1) & ((pos - anchor - 1) % cfg.patch_size == 0)
        starts = starts | (pos == 0)
    elif cfg.mode == "space":
        sl = space_like(tokens)
        end = sl & ~_shift_right(xp, sl, False)
        end = end | (tokens < OFFSET)
        starts = xp.concatenate([true2, end[:, 1:]], axis=1)
    elif cfg.mode == "entropy":
        if entropies is None:
            raise ValueError("entropy patching needs entropies")
        thr = cfg.threshold if threshold is None else threshold
        if thr is None:
            raise ConfigError("model.patching.threshold: entropy patching needs a threshold "
                              "(calibrate one with `blt calibrate` or set it)")
        H = xp.asarray(entropies, dtype=xp.float32)
        prev = _shift_right(xp, H, 0.0)
        t = xp.arange(S)[None, :]
        if cfg.rule == "global":
            cond = H > thr
        elif cfg.rule == "monotonic":
            cond = ((H - prev) > thr) | (t == 1)
        else:  # global_and_monotonic, with the reference's forced start at byte 2 and none at byte 3
            cond = (((H - prev) > cfg.threshold_add) & (H > thr) & (t >= 3)) | (t == 1)
        starts = xp.concatenate([true2, cond[:, 1:]], axis=1)
    else:
        raise ConfigError(f"model.patching.mode: unknown mode {cfg.mode!r}")

    starts = starts[:, : S + 1]
    if cfg.mode != "byte" and cfg.document_starts:
        is_bos = tokens == BOS_ID
        starts = starts | xp.concatenate([is_bos, xp.zeros((B, 1), bool)], axis=1)
        starts = starts | xp.concatenate([xp.zeros((B, 1), bool), is_bos], axis=1)
    if cfg.max_patch_length is not None:
        last_start = _cummax(xp, xp.where(starts, pos, 0))
        starts = starts | ((pos - last_start) % cfg.max_patch_length == 0)
        if cfg.drop_trailing_patch:
            starts = starts & (pos < S)
    return starts


class PatchCarry(NamedTuple):
    """What the patching rules remember about a sequence's past beyond its last two bytes, per row; the
    generation engine keeps it for every position, so a shorter prefix (a rollback) finds its own."""

    last_natural: jax.Array  # (B,) the newest start the rule itself made at or before the last byte
    last_bos: jax.Array  # (B,) the newest BOS at or before the last byte (static patching's grid restarts after it)

    @classmethod
    def initial(cls, batch: int) -> "PatchCarry":
        zeros = jnp.zeros((batch,), jnp.int32)
        return cls(zeros, zeros)


def chunk_start_flags(cfg: PatchingConfig, threshold: Optional[float], prev_tokens, prev_entropies, tokens,
                      entropies, start, n, carry: PatchCarry):
    """`start_flags` incrementally, for generation: the flags of positions start .. start + T (B, T + 1) after
    a chunk `tokens` (B, T) at per-row positions `start` (B,), of which the first `n` (B,) bytes are real.

    Every rule reads at most the two bytes (and entropies) before a position, plus `carry` (the state at
    byte start - 1): `prev_tokens` / `prev_entropies` (B, 2) hold positions start - 2 and start - 1 (anything
    before the sequence start is never read). The flag at start + n is the "virtual next byte" of the row.
    Returns (starts (B, T + 1), the carry after each chunk byte (PatchCarry of (B, T) arrays)). Equal to
    `start_flags` over the whole sequence (tested), never reading more than the chunk."""
    B, T = tokens.shape
    t = start[:, None] + jnp.arange(T + 1)[None, :]
    tok = jnp.concatenate([prev_tokens, tokens], axis=1)  # tok[:, j] is the byte at start - 2 + j
    H = jnp.concatenate([prev_entropies, entropies], axis=1).astype(jnp.float32)
    tok_1, tok_2 = tok[:, 1:], tok[:, :-1]  # the bytes at t - 1 and t - 2
    H_1, H_2 = H[:, 1:], H[:, :-1]
    real = jnp.arange(T)[None, :] < n[:, None]
    bos_here = jnp.concatenate([(tokens == BOS_ID) & real, jnp.zeros((B, 1), bool)], axis=1)  # byte t is BOS
    bos_pos = jax.lax.cummax(jnp.where(bos_here, t, -1), axis=1)  # newest BOS at or before t, from the chunk
    last_bos = jnp.maximum(carry.last_bos[:, None], bos_pos)  # (B, T + 1)

    if cfg.mode == "byte":
        natural = jnp.ones((B, T + 1), bool)
    elif cfg.mode == "static":
        anchor = jnp.concatenate([carry.last_bos[:, None], last_bos[:, :-1]], axis=1)  # newest BOS before t
        natural = (t == 0) | ((t >= 1) & ((t - anchor - 1) % cfg.patch_size == 0))
    elif cfg.mode == "space":
        end = (space_like(tok_1) & ~space_like(tok_2)) | (tok_1 < OFFSET)
        natural = end
    elif cfg.mode == "entropy":
        thr = cfg.threshold if threshold is None else threshold
        if thr is None:
            raise ConfigError("model.patching.threshold: entropy patching needs a threshold")
        if cfg.rule == "global":
            natural = H_1 > thr
        elif cfg.rule == "monotonic":
            natural = ((H_1 - H_2) > thr) | (t == 2)
        else:
            natural = (((H_1 - H_2) > cfg.threshold_add) & (H_1 > thr) & (t >= 4)) | (t == 2)
    else:
        raise ConfigError(f"model.patching.mode: unknown mode {cfg.mode!r}")
    natural = natural | (t <= 1)
    if cfg.mode != "byte" and cfg.document_starts:
        natural = natural | bos_here | (tok_1 == BOS_ID) & (t >= 1)
    last_natural = jnp.maximum(carry.last_natural[:, None], jax.lax.cummax(jnp.where(natural, t, -1), axis=1))
    starts = natural
    if cfg.max_patch_length is not None:
        starts = starts | ((t - last_natural) % cfg.max_patch_length == 0)
    return starts, PatchCarry(last_natural[:, :T], last_bos[:, :T])


@dataclass(frozen=True)
class PatchIds:
    """Per-byte patch bookkeeping derived from start flags, padded to `max_patches` slots.

    Bytes beyond the first `max_patches` patches are dropped: their ids are the sentinel `max_patches`
    (they pool into no patch) and `valid` is False for them (no loss).
    """

    encoder_ids: Any  # (B, S) patch holding byte t
    decoder_ids: Any  # (B, S) patch whose latent byte t cross-attends: p(t + 1) - 1
    num_patches: Any  # (B,) patches in use (incl. a trailing empty one), capped at max_patches
    valid: Any  # (B, S) byte lies inside a kept patch
    total_patches: Any  # (B,) patches the sequence needed (uncapped); > max_patches means truncation


def patch_ids(starts, max_patches: int) -> PatchIds:
    xp = _xp(starts)
    S = starts.shape[1] - 1
    csum = xp.cumsum(starts.astype(xp.int32), axis=1)
    enc = csum[:, :S] - 1
    dec = csum[:, 1:] - 2
    enc = xp.where(enc >= max_patches, max_patches, enc)
    dec = xp.where(dec >= max_patches, max_patches, dec)
    total = csum[:, S]
    return PatchIds(encoder_ids=enc.astype(xp.int32), decoder_ids=dec.astype(xp.int32),
                    num_patches=xp.minimum(total, max_patches).astype(xp.int32), valid=enc < max_patches,
                    total_patches=total.astype(xp.int32))


def patch_lengths(ids: PatchIds, max_patches: int):
    """(B, max_patches) bytes per patch slot (zero-length slots for the trailing patch and padding)."""
    xp = _xp(ids.encoder_ids)
    B = ids.encoder_ids.shape[0]
    if xp is jnp:
        one_hot = ids.encoder_ids[:, :, None] == jnp.arange(max_patches)[None, None, :]
        return one_hot.sum(axis=1).astype(jnp.int32)
    out = np.zeros((B, max_patches + 1), np.int32)
    np.add.at(out, (np.arange(B)[:, None], ids.encoder_ids), 1)
    return out[:, :max_patches]


def starts_from_lengths(lengths, seq_len: int):
    """Inverse of `patch_lengths` for HF-style explicit lengths (B, P); zero lengths only at the end."""
    lengths = np.asarray(lengths)
    B, P = lengths.shape
    starts = np.zeros((B, seq_len + 1), bool)
    for b in range(B):
        pos = 0
        seen_zero = False
        for p, n in enumerate(lengths[b]):
            if n < 0 or (seen_zero and n > 0):
                raise ValueError(
                    f"patch lengths row {b}: zero-length patches may only trail, got {lengths[b].tolist()}")
            if n == 0:
                if not seen_zero and pos == seq_len and p > 0:
                    starts[b, pos] = True  # the trailing empty patch the include_next_token rule creates
                seen_zero = True
                continue
            starts[b, pos] = True
            pos += int(n)
        if pos != seq_len:
            raise ValueError(f"patch lengths row {b} sum to {pos}, expected {seq_len}")
    return starts


def mean_patch_length(starts) -> float:
    """Bytes per non-empty patch over all rows (the calibration target's definition)."""
    s = np.asarray(starts)
    S = s.shape[1] - 1
    return float(s.shape[0] * S) / float(s[:, :S].sum())


def calibrate_threshold(cfg: PatchingConfig, tokens: np.ndarray, entropies: np.ndarray,
                        target: Optional[float] = None, iters: int = 50) -> tuple[float, float]:
    """Entropy threshold whose mean patch length on (tokens, entropies) windows is closest to `target`.

    Mean patch length grows monotonically with the threshold, so a bisection suffices.
    Returns (threshold, achieved mean patch length).
    """
    target = cfg.target_patch_length if target is None else target
    if tokens.size == 0:
        raise ValueError("calibration data is empty")
    # the threshold is compared with entropies, or with their rise over the previous byte's (monotonic rule)
    compared = np.diff(entropies, axis=1, prepend=0.0) if cfg.rule == "monotonic" else entropies
    lo, hi = float(np.min(compared)) - 1e-3, float(np.max(compared)) + 1e-3
    shortest = mean_patch_length(start_flags(cfg, tokens, entropies, lo))
    best = (hi, mean_patch_length(start_flags(cfg, tokens, entropies, hi)))
    if not shortest <= target <= best[1]:  # a threshold at either end of the search would be stored silently
        caps = f"; model.patching.max_patch_length {cfg.max_patch_length} caps it" if cfg.max_patch_length else ""
        raise ValueError(f"target mean patch length {target:g} is out of reach: on these windows any threshold "
                         f"gives between {shortest:.3f} and {best[1]:.3f} bytes per patch{caps}")
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        mpl = mean_patch_length(start_flags(cfg, tokens, entropies, mid))
        if abs(mpl - target) < abs(best[1] - target):
            best = (mid, mpl)
        if mpl < target:
            lo = mid
        else:
            hi = mid
    return best
