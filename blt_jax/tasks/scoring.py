"""Per-byte log-likelihoods of texts under a BLT: one jitted causal pass per (batch, length) bucket.

Every text is scored as BOS + its bytes; entry i of a text's result is log2 p(byte_i | BOS, bytes_<i).
The model's own entropy patching runs in-forward (the same `forward` generation uses); BLT-D models are
scored in their causal (next-byte) mode, i.e. exactly this path. Right padding never changes the scores of
earlier positions (patching and attention are causal), so a text's scores do not depend on its batch or
bucket.

Buckets up to DENSE_MAX_BUCKET bytes run one full forward (its global attention is O(S^2) per row); longer
ones go through the generation engine's caches in SCORE_CHUNK-byte chunks (`engine.extend`, as a prompt's
prefill does), so memory grows linearly with the bucket, up to MAX_WINDOW bytes.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blt_jax.config import ConfigError
from blt_jax.generation import engine
from blt_jax.generation.constants import MAX_WINDOW
from blt_jax.generation.forward import forward
from blt_jax.generation.loaded import LoadedModel, ModelSpec
from blt_jax.generation.samplers import check_cached
from blt_jax.tokenizer import BOE_ID, BOS_ID, OFFSET

MIN_BUCKET = 64
DEFAULT_MAX_BYTES = 4096
# the longest bucket run as one full forward: its global attention holds batch x heads x S^2 scores
DENSE_MAX_BUCKET = 4096
SCORE_CHUNK = 256  # bytes per engine step of a longer bucket: O(chunk x S) attention, not O(S^2)


def _as_bytes(text: bytes | str, i: int) -> bytes:
    if isinstance(text, str):
        return text.encode("utf-8")
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    raise TypeError(f"text {i}: expected bytes or str, got {type(text).__name__}")


def bucket_length(n: int) -> int:
    """The padded input length for a text of n bytes: a power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())


@functools.partial(jax.jit, static_argnums=(0,))
def _logprobs(spec: ModelSpec, params: dict, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """inputs (B, S) = BOS + bytes[:-1] (right-padded), targets (B, S) = bytes (ids) -> log2 p(targets) (B, S)."""
    logits, _ = forward(spec, params, inputs)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked / jnp.log(2.0)


@functools.partial(jax.jit, static_argnums=(0,))
def _chunked_logprobs(spec: ModelSpec, params: dict, inputs: jax.Array, targets: jax.Array,
                      lengths: jax.Array) -> jax.Array:
    """`_logprobs` through the engine's caches, SCORE_CHUNK bytes per step (a fori_loop): the same scores,
    memory linear in S. `lengths` (B,): real positions per row (0 for a padding row)."""
    B, S = inputs.shape
    C = min(S, SCORE_CHUNK)
    layout = engine.Layout(buffer=S, slack=1, max_chunk=max(C, 2))  # as an `ar` prefill lays it out
    state = engine.init_state(spec, B, layout, jax.tree.leaves(params["blt"])[0].dtype)

    def step(i, loop):
        st, out = loop
        piece = jax.lax.dynamic_slice_in_dim(inputs, i * C, C, axis=1)
        want = jax.lax.dynamic_slice_in_dim(targets, i * C, C, axis=1)
        st, logits, _ = engine.extend(spec, params, st, piece, jnp.clip(lengths - i * C, 0, C))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, want[..., None], axis=-1)[..., 0] / jnp.log(2.0)
        return st, jax.lax.dynamic_update_slice_in_dim(out, picked, i * C, axis=1)

    return jax.lax.fori_loop(0, S // C, step, (state, jnp.zeros((B, S), jnp.float32)))[1]


def _longest_text(model: LoadedModel) -> tuple[int, str]:
    """The most bytes one text (window) may hold, and why: buckets past DENSE_MAX_BUCKET go through the
    engine's caches, which transformers' post-hoc patch splitting (refused by the cached methods) cannot."""
    try:
        check_cached(model.cfg)
    except ConfigError:
        return DENSE_MAX_BUCKET, ("this model, imported with transformers' patch splitting, is scored by full "
                                  "forwards only, whose memory grows with the square of the length")
    return MAX_WINDOW, "the longest context blt_jax runs a model on"


def byte_logprobs(model: LoadedModel, texts: Sequence[bytes | str], batch_size: int = 8,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> list[np.ndarray]:
    """log2 p(byte_i | BOS, bytes_<i) for every byte of every text (float64 arrays, one per text).

    Texts are grouped by length bucket (a power of two >= 64 bytes) and run `batch_size` rows at a time
    (short batches padded), so compilations are bounded by the number of buckets, never per text. Buckets
    past DENSE_MAX_BUCKET are scored in chunks through the engine's caches (see the module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data = [_as_bytes(t, i) for i, t in enumerate(texts)]
    longest = _longest_text(model)
    for i, d in enumerate(data):
        if not d:
            raise ValueError(f"text {i} is empty; scoring needs at least one byte")
        if len(d) > max_bytes:
            raise ValueError(f"text {i} has {len(d)} bytes, more than the limit of max_bytes={max_bytes}; "
                             f"split it into windows (see bits_per_byte)")
        if len(d) > longest[0]:
            raise ValueError(f"text {i} has {len(d)} bytes, more than the limit of {longest[0]} ({longest[1]}); "
                             f"split it into windows (see bits_per_byte)")
    out: list[Optional[np.ndarray]] = [None] * len(data)
    by_bucket: dict[int, list[int]] = {}
    for i, d in enumerate(data):
        by_bucket.setdefault(bucket_length(len(d)), []).append(i)
    params = model.all_params()
    for S, idx in sorted(by_bucket.items()):
        for start in range(0, len(idx), batch_size):
            rows = idx[start:start + batch_size]
            inputs = np.full((batch_size, S), BOE_ID, np.int32)
            targets = np.zeros((batch_size, S), np.int32)
            lengths = np.zeros((batch_size,), np.int32)
            inputs[:, 0] = BOS_ID
            for r, i in enumerate(rows):
                ids = np.frombuffer(data[i], np.uint8).astype(np.int32) + OFFSET
                inputs[r, 1:len(ids)] = ids[:-1]
                targets[r, :len(ids)] = ids
                lengths[r] = len(ids)
            lp = _run_bucket(model, params, inputs, targets, lengths)
            for r, i in enumerate(rows):
                out[i] = lp[r, :len(data[i])].astype(np.float64)
    return out  # type: ignore[return-value]


def _run_bucket(model: LoadedModel, params: dict, inputs: np.ndarray, targets: np.ndarray,
                lengths: np.ndarray) -> np.ndarray:
    if inputs.shape[1] <= DENSE_MAX_BUCKET:
        return np.asarray(_logprobs(model.spec, params, jnp.asarray(inputs), jnp.asarray(targets)))
    return np.asarray(_chunked_logprobs(model.spec, params, jnp.asarray(inputs), jnp.asarray(targets),
                                        jnp.asarray(lengths)))


def continuation_logprob(model: LoadedModel, pairs: Sequence[tuple[bytes | str, bytes | str]],
                         batch_size: int = 8, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Total log2 p(continuation | BOS + context) per (context, continuation) pair: one forward of the
    concatenation, summing the continuation's bytes. The context may be empty, the continuation may not."""
    texts = []
    sizes = []
    for i, (ctx, cont) in enumerate(pairs):
        c = _as_bytes(cont, i)
        if not c:
            raise ValueError(f"pair {i}: the continuation is empty; give at least one byte to score")
        texts.append(_as_bytes(ctx, i) + c)
        sizes.append(len(c))
    lps = byte_logprobs(model, texts, batch_size=batch_size, max_bytes=max_bytes)
    return np.array([lp[len(lp) - n:].sum() for lp, n in zip(lps, sizes, strict=True)], np.float64)


def _read_sources(paths_or_texts: Iterable) -> list[tuple[str, bytes]]:
    """(name, bytes) per document: bytes are texts; str/PathLike are files, folders (every text file under) or
    glob patterns."""
    from blt_jax.data.sources import text_files  # noqa: PLC0415

    if isinstance(paths_or_texts, (str, bytes, bytearray, os.PathLike)):
        paths_or_texts = [paths_or_texts]  # one path or text, not a sequence of characters
    docs, unreadable = [], []
    for i, item in enumerate(paths_or_texts):
        if isinstance(item, (bytes, bytearray)):
            docs.append((f"<text {i}>", bytes(item)))
        elif isinstance(item, (str, os.PathLike)):
            try:
                files = text_files([item])
            except (OSError, ValueError) as e:  # name every bad input at once, not one per run
                unreadable.append(e)
                continue
            docs.extend((str(f), Path(f).read_bytes()) for f in files)
        else:
            raise TypeError(f"item {i}: expected a path (str/PathLike) or a text (bytes), got {type(item).__name__}")
    if unreadable:
        raise type(unreadable[0])("; ".join(str(e) for e in unreadable))
    return docs


def windows(data: bytes, window: int) -> list[bytes]:
    """Consecutive non-overlapping windows of `window` bytes (the last may be shorter)."""
    return [data[s:s + window] for s in range(0, len(data), window)]


def bits_per_byte(model: LoadedModel, paths_or_texts: Iterable, window: int = 1024, batch_size: int = 8) -> dict:
    """Bits per byte over documents split into windows of `window` bytes, each scored from its own BOS
    (document style, like training). `paths_or_texts`: files, folders or glob patterns (str/PathLike;
    folders contribute every non-empty text file under them) and/or raw texts as bytes."""
    if window < 1:
        raise ValueError(f"window must be >= 1 byte, got {window}")
    limit, why = _longest_text(model)
    if window > limit:  # before reading anything
        raise ValueError(f"--window {window}: more than the limit of {limit} bytes ({why}); lower --window")
    docs = _read_sources(paths_or_texts)
    if not docs:
        raise ValueError("bits_per_byte: nothing to score (no files or texts given)")
    chunks = [w for _, d in docs for w in windows(d, window)]
    if not chunks:
        raise ValueError("bits_per_byte: every document is empty")
    lps = byte_logprobs(model, chunks, batch_size=batch_size, max_bytes=window)
    total = float(sum(lp.sum() for lp in lps))
    n = sum(len(c) for c in chunks)
    return {"bits_per_byte": -total / n if n else math.nan, "bytes": n, "windows": len(chunks),
            "documents": len(docs), "window": window}
