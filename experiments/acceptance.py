"""Acceptance trends: BLT-S acceptance against the draft length k, BLT-DV acceptance against the block size B.

    python experiments/acceptance.py                     # the cpu-xl runs of experiments/scaling.py
    python experiments/acceptance.py --size fast-blt-1b --workdir /gcs/BUCKET/experiments

BLT-S drafts k bytes with the decoder alone and verifies them in one full pass (on `<size>/entropy/run`);
BLT-DV drafts a block of B bytes by diffusion (alpha 0.3, and one step) and verifies with the same weights (on
`<size>/d-B/run`). Greedy, on held-out continuation prompts. Reported: acceptance (accepted / drafted), bytes
per global-model call, and NFEs per byte. Writes experiments/results/acceptance.{md,json,png}.
"""

from __future__ import annotations

import argparse
import time

from common import DEFAULT_WORKDIR, enable_compilation_cache, environment, load_run, figure, table, write_results

from blt_jax.generation import api
from blt_jax.generation.unmasking import UnmaskConfig
from blt_jax.tasks import continuation

# the paper's 1B FR->EN acceptance (Table 3, %), for the plot
PAPER_S = {4: 96.77, 8: 91.14, 16: 76.93}
PAPER_DV_ONE_STEP = {4: 92.55, 8: 80.34, 16: 77.19}
PAPER_DV_ALPHA = {4: 93.40, 8: 83.81, 16: 82.49}


def measure(model, prompts, new_bytes: int, **kwargs) -> dict:
    results = api.generate(model, prompts, max_new_bytes=new_bytes, stop_at_eos=False, **kwargs)
    costs = [r.cost for r in results]
    new = sum(c["new_bytes"] for c in costs)
    drafted, accepted = sum(c["drafted"] for c in costs), sum(c["accepted"] for c in costs)
    # the cached engine runs the global model only where a patch closes or an open one needs its latent, so
    # global calls are counted as they ran (the paper counts two per round)
    return {"acceptance": accepted / drafted, "drafted": drafted, "accepted": accepted,
            "bytes_per_global_call": new / sum(c["global_calls"] for c in costs),
            "decoder_nfe_per_byte": sum(c["decoder_calls"] for c in costs) / new,
            "global_nfe_per_byte": sum(c["global_calls"] for c in costs) / new}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="cpu-xl")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR)
    p.add_argument("--draft-lens", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--items", type=int, default=16)
    p.add_argument("--new-bytes", type=int, default=128)
    p.add_argument("--name", default="acceptance")
    args = p.parse_args()
    enable_compilation_cache(args.workdir)
    t0 = time.time()
    prompts = [prompt for prompt, _ in continuation.heldout_items(args.items, prompt_bytes=200,
                                                                  target_bytes=args.new_bytes, seed=0)]
    rows = []
    blt = load_run(args.workdir, args.size, "entropy")
    for k in args.draft_lens:
        rows.append({"method": "BLT-S", "k_or_B": k, "draft": "AR",
                     **measure(blt, prompts, args.new_bytes, method="s", draft_len=k)})
        print(rows[-1], flush=True)
    for b in args.blocks:
        model = load_run(args.workdir, args.size, f"d-{b}")
        for label, unmask in (("alpha 0.3", UnmaskConfig(rule="confidence", alpha=0.3)),
                              ("one step", UnmaskConfig(rule="one_step"))):
            rows.append({"method": "BLT-DV", "k_or_B": b, "draft": label,
                         **measure(model, prompts, args.new_bytes, method="dv", block_size=b, unmask=unmask)})
            print(rows[-1], flush=True)
    seconds = time.time() - t0
    md = (f"# Acceptance trends ({args.size} runs, {args.items} held-out prompts, {args.new_bytes} new bytes, "
          "greedy)\n\n"
          + table(["method", "k / B", "draft", "acceptance", "bytes/global call", "dec NFE/byte", "glob NFE/byte"],
                  [[r["method"], r["k_or_B"], r["draft"], r["acceptance"], r["bytes_per_global_call"],
                    r["decoder_nfe_per_byte"], r["global_nfe_per_byte"]] for r in rows])
          + f"\n\nwall time: {seconds:.0f} s on {environment()['device']} ({environment()['cpus']} CPUs)\n")
    print(md)
    plt = figure()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    s = [r for r in rows if r["method"] == "BLT-S"]
    axes[0].plot([r["k_or_B"] for r in s], [100 * r["acceptance"] for r in s], marker="o", label="this run")
    axes[0].plot(list(PAPER_S), list(PAPER_S.values()), marker="x", linestyle=":", label="paper 1B FR-EN")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("BLT-S draft length k")
    axes[0].set_ylabel("acceptance (%)")
    for draft, paper in (("alpha 0.3", PAPER_DV_ALPHA), ("one step", PAPER_DV_ONE_STEP)):
        dv = [r for r in rows if r["method"] == "BLT-DV" and r["draft"] == draft]
        axes[1].plot([r["k_or_B"] for r in dv], [100 * r["acceptance"] for r in dv], marker="o", label=f"{draft}")
        axes[1].plot(list(paper), list(paper.values()), marker="x", linestyle=":", label=f"{draft}, paper 1B FR-EN")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("BLT-DV block size B")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    write_results(args.name, md, {"env": environment(), "args": vars(args), "seconds": seconds, "rows": rows}, fig)


if __name__ == "__main__":
    main()
