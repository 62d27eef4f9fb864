"""High-level generation: prompts in, text and cost records out. Every method runs as one jitted
`lax.while_loop` per (batch, length) bucket."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blt_jax.generation.model import LoadedModel, load_run
from blt_jax.generation.nocache import generate_nocache
from blt_jax.generation.prompts import prepare_prompts
from blt_jax.generation.sampling import SamplingConfig
from blt_jax.tokenizer import decode_bytes

__all__ = ["SamplingConfig", "GenerationResult", "load", "generate", "METHODS"]

METHODS = ("ar-nocache",)


@dataclass
class GenerationResult:
    prompt: str
    text: str
    new_bytes: bytes
    seconds: float  # wall time of the whole batch this prompt ran in
    cost: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["new_bytes"] = len(self.new_bytes)
        return d


def load(run_dir: str, step: Optional[int] = None) -> LoadedModel:
    return load_run(run_dir, step)


def generate(model: LoadedModel, prompts: Sequence[str], max_new_bytes: int = 128, method: str = "ar-nocache",
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             stop_at_eos: bool = True) -> list[GenerationResult]:
    if method not in METHODS:
        raise ValueError(f"method: unknown generation method {method!r}; choose one of {METHODS}")
    batch = prepare_prompts(prompts, max_new_bytes)
    B = batch.tokens.shape[0]
    rngs = jax.vmap(lambda i: jax.random.fold_in(jax.random.key_data(jax.random.key(seed)), i))(jnp.arange(B))
    max_new = np.full((B,), max_new_bytes, np.int32)
    max_new[batch.num_prompts:] = 0
    t = time.time()
    out = generate_nocache(model.spec, sampling, model.pytrees(), jnp.asarray(batch.tokens),
                           jnp.asarray(batch.lengths), jnp.asarray(max_new), rngs, stop_at_eos=stop_at_eos)
    out = jax.device_get(out)
    seconds = time.time() - t
    results = []
    for i, p in enumerate(prompts):
        new = decode_bytes(out.tokens[i, batch.lengths[i]:out.lengths[i]])
        n = int(out.lengths[i] - batch.lengths[i])
        calls = int(out.forward_calls[i])
        cost = {"method": method, "new_bytes": n, "decoder_calls": calls, "encoder_global_calls": calls,
                "entropy_model_calls": calls}
        results.append(GenerationResult(prompt=p if isinstance(p, str) else p.decode("utf-8", "replace"),
                                        text=new.decode("utf-8", errors="replace"), new_bytes=new,
                                        seconds=seconds, cost=cost))
    return results
