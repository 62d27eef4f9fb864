"""Generation diversity (Fast BLT Fig. 8 style): entropy-bounded unmasking gamma x top-p, word type-token
ratio against decoder NFEs.

    python experiments/diversity.py                    # the cpu-xl BLT-D-4 run of experiments/scaling.py
    python experiments/diversity.py --size fast-blt-3b --block 4 --new-bytes 1000 --workdir /gcs/BUCKET/experiments

The paper samples from BOS; our samplers need at least one prompt byte, so every sample starts from a newline
(the closest thing to "nothing" in this corpus). --samples sequences per setting, each with its own key,
temperature 1 with top-p, BLT-D with the entropy-bounded rule, on the paper's 4 x 4 grid (512 bytes here, the
paper's 1000 by flag). TTR: distinct whitespace-separated words over words, per sequence, averaged.
Writes experiments/results/diversity.{md,json,png}.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import DEFAULT_WORKDIR, enable_compilation_cache, environment, load_run, figure, table, write_results

from blt_jax.generation import api
from blt_jax.generation.unmasking import UnmaskConfig


def type_token_ratio(text: str) -> float:
    words = text.split()
    return len(set(words)) / len(words) if words else 0.0


def correlation(rows: list[dict]) -> str:
    ttr, nfe = np.array([r["ttr"] for r in rows]), np.array([r["decoder_nfe_per_seq"] for r in rows])
    if len(rows) < 3 or ttr.std() == 0 or nfe.std() == 0:
        return "undefined (fewer than 3 settings, or no spread)"
    return f"{np.corrcoef(ttr, nfe)[0, 1]:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="cpu-xl")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR)
    p.add_argument("--block", type=int, default=4, choices=(4, 8, 16))
    p.add_argument("--gammas", type=float, nargs="+", default=[0.5, 0.8, 1.0, 1.2])
    p.add_argument("--top-ps", type=float, nargs="+", default=[0.8, 0.9, 0.95, 1.0])
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--new-bytes", type=int, default=512, help="the paper: 1000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="diversity")
    args = p.parse_args()
    enable_compilation_cache(args.workdir)
    t0 = time.time()
    model = load_run(args.workdir, args.size, f"d-{args.block}")
    rows = []
    for gamma in args.gammas:
        for top_p in args.top_ps:
            results = api.generate(model, ["\n"] * args.samples, max_new_bytes=args.new_bytes, method="d",
                                   block_size=args.block, unmask=UnmaskConfig(rule="entropy", gamma=gamma),
                                   sampling=api.SamplingConfig(temperature=1.0, top_p=top_p), seed=args.seed,
                                   stop_at_eos=False)
            rows.append({"gamma": gamma, "top_p": top_p,
                         "ttr": float(np.mean([type_token_ratio(r.text) for r in results])),
                         "decoder_nfe_per_seq": float(np.mean([r.cost["decoder_calls"] for r in results])),
                         "new_bytes": float(np.mean([r.cost["new_bytes"] for r in results])),
                         "sample": results[0].text[:200]})
            print({k: v for k, v in rows[-1].items() if k != "sample"}, flush=True)
    seconds = time.time() - t0
    md = (f"# Diversity: BLT-D-{args.block} ({args.size}), entropy-bounded gamma x top-p, {args.samples} samples of "
          f"{args.new_bytes} bytes per setting\n\n"
          + table(["gamma", "top-p", "word TTR", "decoder NFEs / seq"],
                  [[r["gamma"], r["top_p"], r["ttr"], r["decoder_nfe_per_seq"]] for r in rows])
          + f"\n\nPearson correlation of TTR and decoder NFEs over the settings: {correlation(rows)}"
          + f"\n\nwall time: {seconds:.0f} s on {environment()['device']} ({environment()['cpus']} CPUs)\n")
    print(md)
    plt = figure()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for top_p in args.top_ps:
        pts = [r for r in rows if r["top_p"] == top_p]
        ax.scatter([r["decoder_nfe_per_seq"] for r in pts], [r["ttr"] for r in pts], label=f"top-p {top_p}")
        for r in pts:
            ax.annotate(f"γ={r['gamma']}", (r["decoder_nfe_per_seq"], r["ttr"]), fontsize=6)
    ax.set_xlabel(f"decoder NFEs per {args.new_bytes}-byte sequence")
    ax.set_ylabel("word type-token ratio")
    ax.set_title(f"BLT-D-{args.block}: diversity vs decoder calls")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    write_results(args.name, md, {"env": environment(), "args": vars(args), "seconds": seconds, "rows": rows}, fig)


if __name__ == "__main__":
    main()
