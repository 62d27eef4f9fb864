"""Generation for the evaluation tasks: prompts in fixed-size batches (one compiled sampler per bucket)."""

from __future__ import annotations

from typing import Sequence


def generate_in_batches(model, prompts: Sequence[str | bytes], max_new_bytes: int, batch_size: int = 8,
                        seed: int = 0, **generate_kwargs) -> list:
    """`api.generate` over `prompts`, `batch_size` at a time; batch b uses seed + b, so sampled rows of
    different batches draw independent streams. Returns one GenerationResult per prompt, in order."""
    from blt_jax.generation import api  # noqa: PLC0415

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        results += api.generate(model, list(prompts[start:start + batch_size]), max_new_bytes=max_new_bytes,
                                seed=seed + b, **generate_kwargs)
    return results
