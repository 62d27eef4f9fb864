"""Likelihood parity (Fast BLT Tables 1-2 style): BLT-D models scored as causal decoders, next to the BLT
trained on the same FLOPs.

    python experiments/likelihood_parity.py                  # the cpu-xl runs of experiments/scaling.py
    python experiments/likelihood_parity.py --size fast-blt-1b --workdir /gcs/BUCKET/experiments

Models: `<workdir>/<size>/{entropy,d-4,d-8,d-16}/run`. Benchmarks (all offline; likelihood scoring through the
full model's causal path, exactly as a verifier would score):
  held-out bpb, Python / docs   bits per byte over the held-out files of the embedded corpus (never trained on)
  next-line choice             pick the true next line of held-out code/text among 4 (3 drawn from elsewhere)
  translation choice           pick the right gettext translation of an English UI message among 4
Multiple-choice accuracy is reported for the summed log-likelihood and per-byte normalised (the better of
the two conventions varies by task, as in lm-eval-harness's acc / acc_norm).
Writes experiments/results/likelihood_parity.{md,json,png}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import DEFAULT_WORKDIR, enable_compilation_cache, environment, load_run, figure, table, write_results

from blt_jax.tasks import multiple_choice, scoring, translation

MODELS = ("entropy", "d-4", "d-8", "d-16")
LABELS = {"entropy": "BLT", "d-4": "BLT-D-4", "d-8": "BLT-D-8", "d-16": "BLT-D-16"}
# the paper's 1B likelihood table (Table 2; accuracy %), for the README's side-by-side
PAPER_1B = {"ARC-Easy": (63.21, 60.76, 61.06, 59.83), "HellaSwag": (60.17, 59.06, 58.34, 57.13),
            "PIQA": (75.46, 74.48, 73.56, 72.36), "MMLU": (33.90, 33.60, 32.28, 32.09)}


def heldout_files_by_kind() -> dict[str, list[Path]]:
    heldout = multiple_choice.heldout_files()
    return {"Python": [f for f in heldout if f.suffix == ".py"], "docs": [f for f in heldout if f.suffix != ".py"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="cpu-xl")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--items", type=int, default=200, help="multiple-choice items per task")
    p.add_argument("--lang", default="de", help="gettext language of the translation-choice task")
    p.add_argument("--window", type=int, default=512, help="bpb windows (bytes)")
    p.add_argument("--name", default="likelihood_parity")
    args = p.parse_args()
    enable_compilation_cache(args.workdir)
    t0 = time.time()
    files = heldout_files_by_kind()
    suites = {"next-line choice": multiple_choice.heldout_next_line_items(args.items, seed=0)}
    skipped = {}
    try:
        suites["translation choice"] = multiple_choice.gettext_choice_items(args.lang, args.items, seed=0)
    except translation.NoCatalogs as e:
        skipped["translation choice"] = str(e)
        print(f"skipped translation choice: {e}")
    results: dict[str, dict] = {}
    for name in args.models:
        model = load_run(args.workdir, args.size, name)
        r = {}
        for kind, paths in files.items():
            r[f"held-out bpb, {kind}"] = scoring.bits_per_byte(model, paths, window=args.window)["bits_per_byte"]
        for suite, items in suites.items():
            acc = multiple_choice.evaluate(model, items)
            r[f"{suite} acc"] = 100 * acc["accuracy"]
            r[f"{suite} acc per byte"] = 100 * acc["accuracy_per_byte"]
        results[name] = r
        print(name, r, flush=True)
    metrics = list(next(iter(results.values())))
    md_rows = [[m] + [results[n][m] for n in args.models] for m in metrics]
    seconds = time.time() - t0
    md = (f"# Likelihood parity ({args.size} runs; BLT-D scored in causal mode)\n\n"
          + table(["benchmark"] + [LABELS[n] for n in args.models], md_rows)
          + "\n\nbpb: lower is better; accuracy in %, chance is 25%."
          + "".join(f"\n\nskipped {k}: {v}" for k, v in skipped.items())
          + f"\n\nwall time: {seconds:.0f} s on {environment()['device']} ({environment()['cpus']} CPUs)\n")
    print(md)
    plt = figure()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    bpb = [m for m in metrics if "bpb" in m]
    acc = [m for m in metrics if m.endswith(" acc")]
    for ax, group, ylabel in ((axes[0], bpb, "bits per byte"), (axes[1], acc, "accuracy (%)")):
        for m in group:
            ax.plot([LABELS[n] for n in args.models], [results[n][m] for n in args.models], marker="o", label=m)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Likelihood parity, {args.size}")
    write_results(args.name, md, {"env": environment(), "args": vars(args), "seconds": seconds, "results": results,
                                  "skipped": skipped, "paper_1b": PAPER_1B}, fig)


if __name__ == "__main__":
    main()
