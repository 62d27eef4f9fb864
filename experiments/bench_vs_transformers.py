"""blt_jax against transformers' BltForCausalLM on the same weights, the same CPU and the same thread count.

Builds transformers' reference test model (docs/transformers.md §6: 3.4M parameters, random init with seed 0, patcher
head scaled by 6), converts it with `blt convert --from-hf`, then times, in separate processes pinned with
`taskset` to 1 and to 2 cores:
  - greedy generation of 128 bytes from the 56-byte prompt at batch 1 and batch 8: transformers'
    `generate(use_cache=False)` vs blt_jax's jitted no-cache generation (and any faster methods available);
  - a training step (forward + backward + AdamW) on 8 x 512 bytes: bytes/s.
Best of N after warm-up. Prints a markdown table and writes JSON.

    python experiments/bench_vs_transformers.py --out experiments/results/bench_vs_transformers.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

PROMPT = b"The quick brown fox jumps over the lazy dog. 0123456789 "
NEW_BYTES = 128
TRAIN_BATCH, TRAIN_LEN = 8, 512


def prompts(batch: int) -> list[bytes]:
    return [PROMPT[7 * i % len(PROMPT):] + PROMPT[:7 * i % len(PROMPT)] for i in range(batch)]


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (compilation)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def worker_transformers(folder: str, threads: int, repeats: int) -> dict:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = {}
    for batch in (1, 8):
        ids = torch.tensor([[1] + [b + 4 for b in p] for p in prompts(batch)])

        def gen(ids=ids):
            with torch.no_grad():
                model.generate(ids, max_new_tokens=NEW_BYTES, min_new_tokens=NEW_BYTES, do_sample=False,
                               use_cache=False, eos_token_id=None, pad_token_id=0)

        out[f"generate_b{batch}_bytes_per_s"] = batch * NEW_BYTES / best_of(gen, repeats)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.integers(4, 260, (TRAIN_BATCH, TRAIN_LEN + 1)))
    x[:, 0] = 1
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step():
        opt.zero_grad()
        loss = model(x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        opt.step()

    out["train_bytes_per_s"] = TRAIN_BATCH * TRAIN_LEN / best_of(step, repeats)
    return out


def worker_jax(run: str, threads: int, repeats: int) -> dict:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from blt_jax.generation import api  # noqa: PLC0415
    from blt_jax.generation.forward import compute_patch_starts  # noqa: PLC0415
    from blt_jax.model import build  # noqa: PLC0415
    from blt_jax.config import TrainConfig  # noqa: PLC0415
    from blt_jax.train.step import init_train_state, make_optimizer, make_step_fns  # noqa: PLC0415

    model = api.load(run)
    out = {}
    for method in ("ar-nocache", "ar"):  # the faster methods: experiments/generation_ladder.py
        for batch in (1, 8):
            ps = prompts(batch)
            t = best_of(lambda ps=ps, method=method: api.generate(model, ps, max_new_bytes=NEW_BYTES, method=method,
                                                                  stop_at_eos=False),
                        repeats)
            out[f"{method}_generate_b{batch}_bytes_per_s"] = batch * NEW_BYTES / t
    rng = np.random.default_rng(0)
    x = rng.integers(4, 260, (TRAIN_BATCH, TRAIN_LEN + 1)).astype(np.int32)
    x[:, 0] = 1
    tokens = jnp.asarray(x[:, :-1])
    starts = compute_patch_starts(model.spec, model.all_params(), tokens, jnp.full((TRAIN_BATCH,), TRAIN_LEN))
    batch = {"tokens": tokens, "targets": jnp.asarray(x[:, 1:]), "loss_mask": jnp.ones((TRAIN_BATCH, TRAIN_LEN)),
             "patch_starts": starts}
    # static patch slots sized to the batch (rounded up to 64), as transformers sizes its patch axis per batch
    slots = -(-int(jnp.max(jnp.sum(starts, axis=1))) // 64) * 64
    cfg = dataclasses.replace(model.cfg, patching=dataclasses.replace(model.cfg.patching, max_patches=slots))
    tc = TrainConfig(steps=10, learning_rate=1e-4, warmup_steps=0)
    graphdef, _ = build(cfg)
    tx = make_optimizer(tc)
    fns = make_step_fns("blt", graphdef, tx, tc)
    state = [init_train_state(model.params, tx)]

    def step():
        state[0], m = fns.train_step(state[0], batch)
        jax.block_until_ready(m)

    out["train_bytes_per_s"] = TRAIN_BATCH * TRAIN_LEN / best_of(step, repeats)
    out["train_patch_slots"] = slots
    out["note"] = "training step uses precomputed patch starts (transformers' step also runs its patcher)"
    return out


def run_pinned(args: list[str], threads: int) -> dict:
    cpus = ",".join(str(i) for i in range(threads))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(HERE.parent))
    res = subprocess.run(["taskset", "-c", cpus, sys.executable, __file__, *args, "--threads", str(threads)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=("transformers", "jax"))
    p.add_argument("--path")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.worker == "transformers":
        print(json.dumps(worker_transformers(args.path, args.threads, args.repeats)))
        return
    if args.worker == "jax":
        print(json.dumps(worker_jax(args.path, args.threads, args.repeats)))
        return

    import hf_models  # noqa: PLC0415
    from blt_jax import convert  # noqa: PLC0415

    tmp = Path(tempfile.mkdtemp(prefix="bench_hf_"))
    hf = hf_models.build(hf_models.variant(), seed=0)
    hf_models.save(hf, tmp / "hf")
    convert.import_hf(tmp / "hf", tmp / "ours")
    results = {}
    for threads in (1, 2):
        results[threads] = {
            "transformers": run_pinned(["--worker", "transformers", "--path", str(tmp / "hf"),
                                        "--repeats", str(args.repeats)], threads),
            "blt_jax": run_pinned(["--worker", "jax", "--path", str(tmp / "ours"), "--repeats", str(args.repeats)],
                                  threads),
        }
    rows = ["| threads | measurement | transformers | blt_jax | ratio |", "|---|---|---|---|---|"]
    for threads, r in results.items():
        hf_r, ours = r["transformers"], r["blt_jax"]
        for key, val in ours.items():
            if not key.endswith("_per_s"):
                continue
            base = hf_r["train_bytes_per_s"] if key == "train_bytes_per_s" else hf_r[key.split("_", 1)[1]]
            label = key.replace("_bytes_per_s", "").replace("_", " ")
            rows.append(f"| {threads} | {label} (bytes/s) | {base:,.0f} | {val:,.0f} | {val / base:.1f}x |")
    table = "\n".join(rows)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"results": results, "table": table}, indent=2))


if __name__ == "__main__":
    main()
