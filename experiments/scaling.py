"""Scaling curves (BLT paper Fig. 1 style): held-out bits per byte against training FLOPs, FLOP-matched.

    python experiments/scaling.py                      # scaling-s/m/l on this machine (~30 min, 2 CPU cores)
    python experiments/scaling.py --sizes fast-blt-1b fast-blt-3b --store gs://bucket/data --workdir /gcs/BUCKET/experiments

For each size (a preset) the entropy-patched BLT's own schedule (train.steps x batch x seq_len bytes) times
its analytic training FLOPs per byte sets the size's budget; every variant of that size then trains for the
same FLOPs, its steps = budget / (its FLOPs per byte x bytes per step):

  byte        a byte-level transformer with the global model's shape (full causal attention over bytes)
  static-4/8  BLT, static patches of 4 / 8 bytes
  entropy     BLT, entropy patching (the store's calibrated threshold; patches <= max_patch_length)
  d-4/8/16    BLT-D-4/8/16: entropy BLT trained with the added block-wise masked-diffusion loss

Held-out bpb is the train loop's final evaluation (the same held-out windows for every run; BLT-D scored as
a causal decoder). FLOPs follow the BLT paper's Appendix B conventions (blt_jax.flops). Finished runs are
kept under --workdir with their config; a rerun reuses them, so the table is rebuilt without training.
Writes experiments/results/scaling.{md,json,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from common import (DEFAULT_WORKDIR, cached_run, ensure_store, environment, figure, run_dir, table, with_store,
                    write_results)

from blt_jax import flops
from blt_jax.config import DiffusionConfig, EntropyModelConfig, RunConfig, get_preset
from blt_jax.data import store
from blt_jax.model import param_counts

VARIANTS = ("byte", "static-4", "static-8", "entropy", "d-4", "d-8", "d-16")


def variant_config(base: RunConfig, variant: str) -> tuple[str, RunConfig]:
    """(train kind, config) of one variant of a size; steps are set later from the FLOP budget."""
    model = base.model
    if variant == "byte":
        stack = dataclasses.replace(model.global_model, window=None)
        cfg = dataclasses.replace(base, model=dataclasses.replace(model, entropy_model=EntropyModelConfig(stack)),
                                  entropy_train=base.train)
        return "entropy", cfg
    if variant.startswith("static-"):
        patching = dataclasses.replace(model.patching, mode="static", patch_size=int(variant.split("-")[1]))
        # enough patch slots for a whole window of static patches (entropy presets size them for ~4-byte patches)
        patching = dataclasses.replace(patching, max_patches=max(patching.max_patches,
                                                                 patching.min_patches_needed(base.data.seq_len)))
        return "blt", dataclasses.replace(base, model=dataclasses.replace(model, patching=patching))
    if variant == "entropy":
        return "blt", base
    if variant.startswith("d-"):
        diffusion = DiffusionConfig(block_size=int(variant.split("-")[1]))
        return "blt", dataclasses.replace(base, model=dataclasses.replace(model, diffusion=diffusion))
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def flops_per_byte(kind: str, cfg: RunConfig, entropy_patch_length: float) -> float:
    if kind == "entropy":
        return flops.train_flops_per_byte(cfg.model.entropy_model, cfg.data.seq_len)
    patching = cfg.model.patching
    patch_len = patching.patch_size if patching.mode == "static" else entropy_patch_length
    return flops.train_flops_per_byte(cfg.model, cfg.data.seq_len, patch_len)


def with_steps(kind: str, cfg: RunConfig, steps: int) -> RunConfig:
    field = "entropy_train" if kind == "entropy" else "train"
    tc = dataclasses.replace(getattr(cfg, field), steps=steps, warmup_steps=max(1, steps // 10))
    return dataclasses.replace(cfg, **{field: tc})


def non_embedding_params(kind: str, cfg: RunConfig) -> int:
    if kind == "entropy":
        return param_counts(cfg.model.entropy_model)["entropy_model"]
    c = param_counts(cfg.model)
    return c["encoder"] + c["global"] + c["decoder"]


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    variant: str
    kind: str  # what `train` trains: "blt", or "entropy" (a plain byte LM) for the byte baseline
    cfg: RunConfig
    steps: int
    flops_per_byte: float

    @property
    def train_bytes(self) -> int:
        return self.steps * self.cfg.data.batch_size * self.cfg.data.seq_len


def plan_size(base: RunConfig, variants: list[str], entropy_patch_length: float) -> list[PlannedRun]:
    """Every variant of one size on the size's FLOP budget: the entropy BLT's `train.steps` windows at its
    analytic FLOPs per byte (with the store's measured mean patch length)."""
    bytes_per_step = base.data.batch_size * base.data.seq_len
    budget = base.train.steps * bytes_per_step * flops_per_byte("blt", base, entropy_patch_length)
    plans = []
    for variant in variants:
        kind, cfg = variant_config(base, variant)
        fpb = flops_per_byte(kind, cfg, entropy_patch_length)
        steps = max(1, round(budget / (fpb * bytes_per_step)))
        plans.append(PlannedRun(variant, kind, with_steps(kind, cfg, steps), steps, fpb))
    return plans


def run_size(size: str, variants: list[str], workdir: Path, store_root: str, entropy_run: str) -> list[dict]:
    from blt_jax.train.loop import train  # noqa: PLC0415

    base = with_store(get_preset(size), store_root)
    patch_len = float(store.read_manifest(store_root)["patching_achieved"])
    rows = []
    for plan in plan_size(base, variants, patch_len):
        run = run_dir(workdir, size, plan.variant)
        t = time.time()

        def fit(plan=plan, run=run, t=t):
            summary = train(plan.kind, plan.cfg, run, entropy_run=entropy_run, progress=False)
            return {"heldout": summary["heldout"], "seconds": time.time() - t}

        result = cached_run(run.parent, plan.cfg, fit)
        row = {"size": size, "variant": plan.variant, "kind": plan.kind, "steps": plan.steps,
               "params_non_embedding": non_embedding_params(plan.kind, plan.cfg),
               "train_flops_per_byte": plan.flops_per_byte, "train_bytes": plan.train_bytes,
               "train_flops": plan.train_bytes * plan.flops_per_byte,
               "heldout_bpb": result["heldout"]["bits_per_byte"],
               "mean_patch_length": result["heldout"].get("mean_patch_length"), "seconds": result["seconds"]}
        print(f"{size:10s} {plan.variant:9s} steps {plan.steps:5d}  {row['train_flops']:.3g} FLOPs  "
              f"bpb {row['heldout_bpb']:.4f}  ({row['seconds']:.0f}s)", flush=True)
        rows.append(row)
    return rows


def plot(rows: list[dict]):
    plt = figure()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted((r["train_flops"], r["heldout_bpb"]) for r in rows if r["variant"] == variant)
        ax.plot(*zip(*pts), marker="o", label=variant, linestyle="--" if variant == "byte" else "-")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (analytic)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("FLOP-matched scaling (embedded corpus)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["scaling-s", "scaling-m", "scaling-l"], help="presets, small first")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="runs and (unless --store) the data store go here")
    p.add_argument("--store", help="a prepared data store with entropies (default: prepare the embedded corpus)")
    p.add_argument("--name", default="scaling", help="results file name under experiments/results/")
    args = p.parse_args()
    t = time.time()
    workdir = Path(args.workdir)
    store_root, entropy_run = ensure_store(get_preset(args.sizes[0]), workdir, args.store)
    rows = [r for size in args.sizes for r in run_size(size, args.variants, workdir, store_root, entropy_run)]
    header = ["size", "variant", "non-emb. params", "FLOPs/byte", "steps", "bytes", "train FLOPs", "held-out bpb",
              "patch len"]
    md = table(header, [[r["size"], r["variant"], f"{r['params_non_embedding'] / 1e6:.2f}M",
                         f"{r['train_flops_per_byte'] / 1e6:.2f}M", r["steps"], f"{r['train_bytes'] / 1e6:.2f}M",
                         f"{r['train_flops']:.3g}", r["heldout_bpb"], r["mean_patch_length"]] for r in rows])
    seconds = time.time() - t
    trained = sum(r["seconds"] for r in rows)
    md = (f"# Scaling (FLOP-matched per size)\n\n{md}\n\ntraining + evaluation: {trained:.0f} s summed over the "
          f"runs (this invocation: {seconds:.0f} s; finished runs are reused) on {environment()['device']} "
          f"({environment()['cpus']} CPUs)\n")
    print(md)
    write_results(args.name, md, {"env": environment(), "seconds": seconds, "trained_seconds": trained, "rows": rows},
                  plot(rows))


if __name__ == "__main__":
    main()
