"""Held-out continuation: a prompt cut from a held-out file, the model continues it, the output is compared
with the file's true next bytes (exact match of the whole target, matched-prefix length, chrF)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def heldout_items(n: int, prompt_bytes: int = 128, target_bytes: int = 32, seed: int = 0,
                  files: Optional[Sequence[Path]] = None) -> list[tuple[bytes, bytes]]:
    """`n` (prompt, target) pairs: `prompt_bytes` bytes starting at a line start of a held-out file and the
    `target_bytes` bytes that follow them (the target holds some non-space text). Deterministic for a seed
    and a set of files (default: the embedded corpus's held-out split)."""
    from blt_jax.tasks.multiple_choice import heldout_files  # noqa: PLC0415

    if n < 1 or prompt_bytes < 1 or target_bytes < 1:
        raise ValueError(f"n, prompt_bytes and target_bytes must be >= 1, got {n}, {prompt_bytes}, {target_bytes}")
    files = sorted(files if files is not None else heldout_files(), key=lambda p: str(p))
    docs = [Path(f).read_bytes() for f in files]
    span = prompt_bytes + target_bytes
    starts = []
    for fi, d in enumerate(docs):
        for off in [0] + [i + 1 for i in range(len(d)) if d[i] == 0x0A]:
            if off + span <= len(d) and d[off:off + prompt_bytes].strip() and \
                    d[off + prompt_bytes:off + span].strip():
                starts.append((fi, off))
    if len(starts) < n:
        raise ValueError(f"only {len(starts)} places in {len(files)} files fit {span} bytes; asked for {n} items")
    rng = random.Random(seed)
    picked = rng.sample(starts, n)
    return [(docs[fi][o:o + prompt_bytes], docs[fi][o + prompt_bytes:o + span]) for fi, o in picked]


def matched_prefix(a: bytes, b: bytes) -> int:
    """Length of the common prefix of two byte strings."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.frombuffer(a[:n], np.uint8) != np.frombuffer(b[:n], np.uint8))
    return int(diff[0]) if diff.size else n


def score(outputs: Sequence[bytes], references: Sequence[bytes]) -> dict:
    """exact_match: the output starts with the whole target; mean_prefix_bytes: bytes matched before the
    first difference; chrf: sacrebleu corpus chrF of the outputs cut to their target's length (0-100)."""
    import sacrebleu  # noqa: PLC0415

    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs for {len(references)} references")
    if not references:
        raise ValueError("score: no outputs given")
    prefixes = [matched_prefix(o, r) for o, r in zip(outputs, references, strict=True)]
    hyps = [o[:len(r)].decode("utf-8", "replace") for o, r in zip(outputs, references, strict=True)]
    refs = [r.decode("utf-8", "replace") for r in references]
    return {"items": len(references),
            "exact_match": float(np.mean([p == len(r) for p, r in zip(prefixes, references, strict=True)])),
            "mean_prefix_bytes": float(np.mean(prefixes)),
            "chrf": float(sacrebleu.corpus_chrf(hyps, [refs]).score)}


def evaluate(model, n: int = 50, prompt_bytes: int = 128, target_bytes: int = 32, seed: int = 0,
             batch_size: int = 8, files: Optional[Sequence[Path]] = None, **generate_kwargs) -> dict:
    from blt_jax.tasks.batching import generate_in_batches  # noqa: PLC0415

    items = heldout_items(n, prompt_bytes, target_bytes, seed, files)
    outputs = [r.new_bytes for r in generate_in_batches(model, [p for p, _ in items], target_bytes, batch_size,
                                                        seed, **generate_kwargs)]
    res = score(outputs, [t for _, t in items])
    return {"task": "continuation", "prompt_bytes": prompt_bytes, "target_bytes": target_bytes, **res,
            "example": {"prompt": items[0][0].decode("utf-8", "replace"),
                        "target": items[0][1].decode("utf-8", "replace"),
                        "output": outputs[0].decode("utf-8", "replace")}}
