"""Scaling curves (BLT paper Fig. 1 style): held-out bits per byte against training FLOPs, FLOP-matched.

    python experiments/scaling.py                   # the CPU study (sizes.STUDY): ~2 h on an idle 2-vCPU VM
    python experiments/scaling.py --sizes fast-blt-1b fast-blt-3b --store gs://bucket/data \
        --workdir /gcs/BUCKET/experiments

Each size has a training-FLOP budget (the study's sizes: `sizes.STUDY`; a preset: its entropy BLT's own
schedule, train.steps x batch x seq_len bytes at its analytic FLOPs per byte), and every variant of the size
trains for that budget, its steps = budget / (its FLOPs per byte x bytes per step):

  byte        a byte-level transformer with the global model's shape (full causal attention over bytes)
  static-4/8  BLT, static patches of 4 / 8 bytes
  entropy     BLT, entropy patching (the store's calibrated threshold; patches <= max_patch_length)
  d-4/8/16    BLT-D-4/8/16: entropy BLT trained with the added block-wise masked-diffusion loss

Held-out bpb is the train loop's final evaluation over the whole held-out split (the same windows for every
run; BLT-D scored as a causal decoder). FLOPs follow the BLT paper's Appendix B conventions (blt_jax.flops).
The data store is the embedded corpus with its whole training split, prepared once under --workdir with the
entropy model (experiments/common.ensure_store).

Results land as they come: each finished run's row is written to experiments/results/<name>.{md,json,png}
at once, and a rerun skips the rows already there (a row counts only if its configuration and store match),
so a killed study resumes where it stopped; an unfinished run resumes from its last checkpoint. The script
tolerates being paused (SIGSTOP/SIGCONT); SIGINT/SIGTERM save a checkpoint and exit without a row.
`--report` rewrites the results from the rows already there without training (safe while a study runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Optional

import sizes
from common import (DEFAULT_WORKDIR, RESULTS, cached_run, ensure_store, environment, figure, library_version,
                    median_train_rate, run_dir, table, with_store, write_results)

from blt_jax import flops
from blt_jax.config import DiffusionConfig, EntropyModelConfig, RunConfig, get_preset
from blt_jax.data import store
from blt_jax.model import param_counts

VARIANTS = ("byte", "static-4", "static-8", "entropy", "d-4", "d-8", "d-16")
# the claims a scaling plot can show, each against the entropy BLT (plus static 8 against static 4)
COMPARISONS = (("byte", "entropy"), ("static-4", "entropy"), ("static-8", "entropy"), ("static-8", "static-4"),
               ("d-4", "entropy"), ("d-8", "entropy"), ("d-16", "entropy"))


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
    size: str
    variant: str
    kind: str  # what `train` trains: "blt", or "entropy" (a plain byte LM) for the byte baseline
    cfg: RunConfig
    steps: int
    flops_per_byte: float

    @property
    def train_bytes(self) -> int:
        return self.steps * self.cfg.data.batch_size * self.cfg.data.seq_len


def preset_budget(base: RunConfig, entropy_patch_length: float) -> float:
    """A preset's budget: its entropy BLT's own schedule at its analytic FLOPs per byte."""
    return base.train.steps * base.data.batch_size * base.data.seq_len * flops_per_byte("blt", base,
                                                                                        entropy_patch_length)


def plan_size(size: str, base: RunConfig, variants: list[str], entropy_patch_length: float,
              budget: Optional[float] = None) -> list[PlannedRun]:
    """Every variant of one size on the size's FLOP budget (default: the preset's own, `preset_budget`)."""
    budget = preset_budget(base, entropy_patch_length) if budget is None else budget
    bytes_per_step = base.data.batch_size * base.data.seq_len
    plans = []
    for variant in variants:
        kind, cfg = variant_config(base, variant)
        fpb = flops_per_byte(kind, cfg, entropy_patch_length)
        steps = max(1, round(budget / (fpb * bytes_per_step)))
        plans.append(PlannedRun(size, variant, kind, with_steps(kind, cfg, steps), steps, fpb))
    return plans


def size_base(size: str, store_root: str) -> tuple[RunConfig, Optional[float]]:
    """(entropy BLT config, budget) of a study size (sizes.STUDY) or a preset (budget from its schedule)."""
    if size in sizes.STUDY:
        return sizes.study_config(size, store_root), sizes.STUDY[size].budget_flops
    return with_store(get_preset(size), store_root), None


def make_plans(size_names: list[str], variants: list[str], store_root: str,
               entropy_patch_length: Optional[float]) -> list[PlannedRun]:
    """Every run of the study, small sizes first (`entropy_patch_length` None: the configs' target)."""
    plans = []
    for size in size_names:
        base, budget = size_base(size, store_root)
        patch_len = entropy_patch_length or base.model.patching.target_patch_length
        plans += plan_size(size, base, variants, patch_len, budget)
    return plans


def store_identity(store_root: str) -> dict:
    """What a run's held-out number depends on besides its config: the corpus split and the patching."""
    m = store.read_manifest(store_root)
    return {"train_tokens": m["train"]["num_tokens"], "heldout_tokens": m["heldout"]["num_tokens"],
            "threshold": m.get("patching_threshold"), "corpus": m.get("corpus")}


def fingerprint(plan: PlannedRun, identity: dict) -> str:
    """A row is reused only for the same configuration (wherever the store lives) on the same store."""
    cfg = json.loads(plan.cfg.to_json())
    cfg["data"]["path"] = None
    blob = json.dumps({"kind": plan.kind, "cfg": cfg, "store": identity}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_row(plan: PlannedRun, workdir: Path, entropy_run: str, fp: str) -> dict:
    """Train one run (or resume it, or reuse its finished result) and return its row."""
    from blt_jax.train.loop import train  # noqa: PLC0415

    run = run_dir(workdir, plan.size, plan.variant)
    t = time.time()

    def fit():
        summary = train(plan.kind, plan.cfg, run, entropy_run=entropy_run, progress=False)
        if summary["interrupted"]:
            sys.exit(f"{plan.size} {plan.variant}: interrupted at step {summary['step']}; the checkpoint is "
                     "saved, rerun the same command to resume")
        return {"heldout": summary["heldout"], "seconds": time.time() - t,
                "last_train": summary.get("last_train", {})}

    result = cached_run(run.parent, plan.cfg, fit)
    return {"size": plan.size, "variant": plan.variant, "kind": plan.kind, "fingerprint": fp, "steps": plan.steps,
            "params_non_embedding": non_embedding_params(plan.kind, plan.cfg),
            "train_flops_per_byte": plan.flops_per_byte, "train_bytes": plan.train_bytes,
            "train_flops": plan.train_bytes * plan.flops_per_byte,
            "heldout_bpb": result["heldout"]["bits_per_byte"],
            "mean_patch_length": result["heldout"].get("mean_patch_length"), "seconds": result["seconds"],
            "bytes_per_second": median_train_rate(run), "blt_jax": library_version()}


def with_logged_rate(row: dict, workdir: Path) -> dict:
    """A saved row with its training rate taken from its run's log where the run is here (rows written before
    the rate was the log's median hold their last interval's, which one slow interval can make 100x low)."""
    rate = median_train_rate(run_dir(workdir, row["size"], row["variant"]))
    return row if rate is None else {**row, "bytes_per_second": rate}


# ---- the report ----------------------------------------------------------------------------------------

def crossing_lines(rows: list[dict]) -> list[str]:
    """For each comparison: the bpb gap at each budget, and whether the curves cross (the order flips)."""
    by = {(r["size"], r["variant"]): r for r in rows}
    size_order = sorted({r["size"] for r in rows}, key=lambda s: min(r["train_flops"] for r in rows if r["size"] == s))
    lines = []
    for a, b in COMPARISONS:
        gaps = [(s, by[s, a]["heldout_bpb"] - by[s, b]["heldout_bpb"]) for s in size_order
                if (s, a) in by and (s, b) in by]
        if not gaps:
            continue
        signs = [g < 0 for _, g in gaps]
        flips = [f"between {gaps[i][0]} and {gaps[i + 1][0]}" for i in range(len(gaps) - 1) if signs[i] != signs[i + 1]]
        where = f"cross {', '.join(flips)}" if flips else (f"do not cross: {a} is {'below' if signs[0] else 'above'} "
                                                           f"{b} at every budget")
        trend = ", ".join(f"{s} {g:+.3f}" for s, g in gaps)
        lines.append(f"- **{a} vs {b}** (bpb of {a} minus {b}: {trend}): the curves {where}.")
    return lines


def markdown(rows: list[dict], planned: int, unigram: float, env: dict, trained_seconds: float) -> str:
    header = ["size", "variant", "non-emb. params", "FLOPs/byte", "steps", "bytes", "train FLOPs", "held-out bpb",
              "vs unigram", "patch len", "train B/s"]
    body = table(header, [[r["size"], r["variant"], f"{r['params_non_embedding'] / 1e6:.2f}M",
                           f"{r['train_flops_per_byte'] / 1e6:.2f}M", r["steps"], f"{r['train_bytes'] / 1e6:.2f}M",
                           f"{r['train_flops']:.3g}", r["heldout_bpb"], f"{r['heldout_bpb'] - unigram:+.3f}",
                           r["mean_patch_length"],
                           None if r.get("bytes_per_second") is None else f"{r['bytes_per_second']:.0f}"]
                          for r in rows])
    status = ("" if len(rows) == planned else
              f"**In progress: {len(rows)} of {planned} runs finished.** The rows below are final; the rest are "
              "still training.\n\n")
    out = [(f"# Scaling (FLOP-matched per size)\n\n{status}Held-out bits per byte after the same training FLOPs "
            f"per size; unigram (byte-frequency) baseline: **{unigram:.3f}** bits/byte.\n"), body, ""]
    if rows:
        top = max(r["train_flops"] for r in rows)
        top_rows = [r for r in rows if r["train_flops"] > top / 1.5]
        worst = max(top_rows, key=lambda r: r["heldout_bpb"])
        best = min(top_rows, key=lambda r: r["heldout_bpb"])
        above = [r["variant"] for r in top_rows if r["heldout_bpb"] >= unigram]
        verdict = (f"every model is below the unigram baseline, by {unigram - worst['heldout_bpb']:.2f} bits/byte "
                   "or more" if not above else f"{', '.join(above)} did not get below the unigram baseline")
        out += [(f"At the largest budget reached ({top:.2g} FLOPs), {verdict} (worst: {worst['variant']} "
                 f"{worst['heldout_bpb']:.3f}; best: {best['variant']} {best['heldout_bpb']:.3f}).\n"),
                "Where the curves cross:\n", *crossing_lines(rows), ""]
    out.append(f"training + evaluation: {trained_seconds:.0f} s summed over the runs (wall clock, including time "
               f"paused or shared with other work) on {env['device']} ({env['cpus']} CPUs); blt_jax "
               f"{env.get('blt_jax', '?')}")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], unigram: float):
    plt = figure()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted((r["train_flops"], r["heldout_bpb"]) for r in rows if r["variant"] == variant)
        ax.plot(*zip(*pts, strict=True), marker="o", label=variant, linestyle="--" if variant == "byte" else "-")
    ax.axhline(unigram, color="grey", linestyle=":", label=f"unigram {unigram:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (analytic)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("FLOP-matched scaling (embedded corpus, whole training split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def load_rows(name: str, results_dir: Path = RESULTS) -> list[dict]:
    path = results_dir / f"{name}.json"
    return json.loads(path.read_text()).get("rows", []) if path.exists() else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(sizes.STUDY),
                   help=f"study sizes ({', '.join(sizes.STUDY)}) or presets, small first")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="runs and (unless --store) the data store go here")
    p.add_argument("--store", help="a prepared data store with entropies (default: prepare the embedded corpus)")
    p.add_argument("--name", default="scaling", help="results file name under --results-dir")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--plan", action="store_true", help="print the runs (steps, bytes, FLOPs) and exit")
    p.add_argument("--report", action="store_true",
                   help="rewrite the results from the finished rows and exit; trains nothing")
    args = p.parse_args()
    t0 = time.time()
    workdir = Path(args.workdir)
    if args.plan:  # before any data exists: entropy patches at the target length
        for pl in make_plans(args.sizes, args.variants, args.store or "", None):
            print(f"{pl.size:10s} {pl.variant:9s} steps {pl.steps:6d}  {pl.train_bytes / 1e6:7.2f}M bytes  "
                  f"{pl.train_bytes * pl.flops_per_byte:.3g} FLOPs")
        return
    first = sizes.study_config(args.sizes[0]) if args.sizes[0] in sizes.STUDY else get_preset(args.sizes[0])
    store_root, entropy_run = ensure_store(first, workdir, args.store)
    identity = store_identity(store_root)
    plans = make_plans(args.sizes, args.variants, store_root,
                       float(store.read_manifest(store_root)["patching_achieved"]))
    from blt_jax.evaluate import unigram_bpb  # noqa: PLC0415

    unigram = unigram_bpb(store_root)
    env = environment()
    saved = {(r["size"], r["variant"]): r for r in load_rows(args.name, args.results_dir)}
    rows: list[dict] = []

    order = {(pl.size, pl.variant): i for i, pl in enumerate(plans)}

    def write():
        ordered = sorted(rows, key=lambda r: order[r["size"], r["variant"]])
        trained = sum(r["seconds"] for r in ordered)
        write_results(args.name, markdown(ordered, len(plans), unigram, env, trained),
                      {"env": env, "unigram_bpb": unigram, "store": identity, "planned": len(plans),
                       "finished": len(ordered), "trained_seconds": trained, "rows": ordered},
                      plot(ordered, unigram) if ordered else None, out_dir=args.results_dir)

    for plan in plans:
        fp = fingerprint(plan, identity)
        row = saved.get((plan.size, plan.variant))
        if row is not None and row.get("fingerprint") == fp:
            rows.append(with_logged_rate(row, workdir))
            continue
        if args.report:
            continue
        row = train_row(plan, workdir, entropy_run, fp)
        print(f"{plan.size:10s} {plan.variant:9s} steps {plan.steps:5d}  {row['train_flops']:.3g} FLOPs  "
              f"bpb {row['heldout_bpb']:.4f}  ({row['seconds']:.0f}s)", flush=True)
        rows.append(row)
        write()  # each finished run lands in the results at once
    write()
    print(f"{len(rows)} runs, this invocation {time.time() - t0:.0f} s; "
          f"results: {args.results_dir / (args.name + '.md')}")


if __name__ == "__main__":
    main()
