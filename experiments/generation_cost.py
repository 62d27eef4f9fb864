"""Generation-cost tables in the layout of the Fast BLT paper's Tables 3-10: every method and setting on the
same prompts, with the task score, acceptance, decoder and encoder/global NFEs per output, the paper's Eq. 8
bandwidth in both accountings and its cut against BLT, measured bytes/s and the speed-up over BLT.

    python experiments/generation_cost.py                  # the best models (experiments/best_models.py)
    python experiments/generation_cost.py --runs runs/experiments --size cpu-xl     # a scaling-study size
    python experiments/generation_cost.py --size fast-blt-1b --runs /gcs/BUCKET/experiments --tasks humaneval

Models: BLT is `<runs>/blt/run` and BLT-D-B `<runs>/d-B/run` (best_models.py's layout); with --size,
`<runs>/<size>/entropy/run` and `<runs>/<size>/d-B/run` (scaling.py's). Block sizes whose run is missing
are left out (and said so). Rows (the paper's settings):
  BLT (AR), BLT-S k = 4 / 8 / 16                                    on the BLT
  BLT-D-B AR (causal mode), BLT-D-B alpha 0.5 / 0.7, gamma 0.8 / 1.0,
  BLT-DV-B alpha 0.3, gamma 1.5 / 2.0, one step                     on each BLT-D-B
Tasks: `continuation` (prompts cut at line starts of the embedded corpus's held-out Python files; chrF of the
output against the true next bytes), `translation` (few-shot English -> --lang on the machine's gettext
catalogs, blt_jax.tasks.translation; BLEU of the first generated line, chrF beside it), `humaneval` (pass@1,
executed). Greedy, a fixed number of new bytes (no EOS stop), so every method generates the same amount.

Columns: NFEs are calls per output sequence (the prompt's prefill pass included), averaged over the prompts,
as the engine ran them and (where its cost record has them) as the paper counts them.
Eq. 8 (2 bytes per parameter; decoder and encoder+global parameter counts without the hash tables) is given
in two accountings: "paper", two encoder/global passes per speculative round as the paper counts them
(`cost["eq8_bandwidth_gb_paper"]` of the engine's cost record), and "as run", from the calls the cached
engine really made (`cost["eq8_bandwidth_gb"]`); Δ is the cut against BLT (AR) on the same task. For BLT-D,
"bytes/pass" is the bytes committed per decoder pass (new bytes over decoder passes after the prefill): 1.0
means the decoder never unmasked more than one cell at a time. bytes/s: best of --repeats timed runs after a
compiling one, the whole task as one batch. Each BLT-D-B at alpha 0.7 is checked against its own AR output:
within --margin (relative) of its score, or the report says that it is not and shows bytes/pass.
Writes experiments/results/<name>.{md,json,png} (default name generation_cost).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
from common import RESULTS, enable_compilation_cache, environment, figure, run_dir, table, write_results
from generation_ladder import best_of

from blt_jax.generation import api
from blt_jax.generation.unmasking import UnmaskConfig

BLOCKS = (4, 8, 16)
TASKS = ("continuation", "translation", "humaneval")
DEFAULT_RUNS = "runs/best"


@dataclass(frozen=True)
class Setting:
    model: str  # "blt" or "d-B"
    label: str
    kwargs: dict


def settings(blocks=BLOCKS) -> list[Setting]:
    rows = [Setting("blt", "BLT (AR)", dict(method="ar"))]
    rows += [Setting("blt", f"BLT-S k={k}", dict(method="s", draft_len=k)) for k in (4, 8, 16)]
    for b in blocks:
        d = lambda rule, **kw: dict(method="d", block_size=b, unmask=UnmaskConfig(rule=rule, **kw))  # noqa: E731,B023
        dv = lambda rule, **kw: dict(method="dv", block_size=b, unmask=UnmaskConfig(rule=rule, **kw))  # noqa: E731,B023
        m = f"d-{b}"
        rows += [Setting(m, f"BLT-D-{b} AR", dict(method="ar")),
                 Setting(m, f"BLT-D-{b} a=0.5", d("confidence", alpha=0.5)),
                 Setting(m, f"BLT-D-{b} a=0.7", d("confidence", alpha=0.7)),
                 Setting(m, f"BLT-D-{b} g=0.8", d("entropy", gamma=0.8)),
                 Setting(m, f"BLT-D-{b} g=1.0", d("entropy", gamma=1.0)),
                 Setting(m, f"BLT-DV-{b} a=0.3", dv("confidence", alpha=0.3)),
                 Setting(m, f"BLT-DV-{b} g=1.5", dv("entropy", gamma=1.5)),
                 Setting(m, f"BLT-DV-{b} g=2.0", dv("entropy", gamma=2.0)),
                 Setting(m, f"BLT-DV-{b} one step", dv("one_step"))]
    return rows


@dataclass
class Task:
    name: str
    prompts: list
    new_bytes: int
    score: Callable[[list[str]], dict]  # generated texts -> {"score": ..., other metrics}
    score_name: str


def humaneval_task(n: int, new_bytes: int) -> Task:
    from blt_jax.tasks import code  # noqa: PLC0415

    problems = code.problems()
    chosen = sorted(problems.values(), key=lambda p: len(p["prompt"]))[:n]  # the shortest prompts fit a bucket

    def score(outputs):
        completions = {p["task_id"]: [code.truncate_completion(o)] for p, o in zip(chosen, outputs, strict=True)}
        result = code.execute({p["task_id"]: p for p in chosen}, completions, ks=(1,))
        return {"score": 100 * result["pass_at_k"]["pass@1"]}

    return Task("humaneval", [p["prompt"] for p in chosen], new_bytes, score, "pass@1 (%)")


def heldout_python_files() -> list[Path]:
    from blt_jax.tasks.multiple_choice import heldout_files  # noqa: PLC0415

    return [f for f in heldout_files() if Path(f).suffix == ".py"]


def continuation_task(n: int, prompt_bytes: int, new_bytes: int) -> Task:
    from blt_jax.tasks import continuation  # noqa: PLC0415

    items = continuation.heldout_items(n, prompt_bytes=prompt_bytes, target_bytes=new_bytes, seed=0,
                                       files=heldout_python_files())

    def score(outputs):
        s = continuation.score([o.encode() for o in outputs], [target for _, target in items])
        return {"score": s["chrf"], **s}

    return Task("continuation", [prompt for prompt, _ in items], new_bytes, score, "chrF")


def translation_task(lang: str, n: int, shots: int, new_bytes: int) -> Task:
    """Few-shot English -> `lang` (raises translation.NoCatalogs when the machine has no catalogs)."""
    from blt_jax.tasks import translation  # noqa: PLC0415

    pairs = translation.gettext_pairs(lang, max_pairs=n + max(shots, 1) * 20, seed=0)
    items = translation.build_prompts(pairs, lang, min(n, len(pairs) - max(shots, 1)), shots, seed=0)

    def score(outputs):
        s = translation.score([translation.hypothesis(o) for o in outputs], [ref for _, ref in items])
        return {"score": s["bleu"], **s}

    return Task("translation", [prompt for prompt, _ in items], new_bytes, score, f"BLEU (en->{lang})")


def mean_cost(costs: list[dict], key: str) -> Optional[float]:
    """The mean of a cost-record field over the outputs; None where the engine does not report it."""
    values = [c.get(key) for c in costs]
    return None if any(v is None for v in values) else float(np.mean(values))


def summarize(setting: Setting, task_name: str, results, seconds: float, scores: dict) -> dict:
    """One table row from the GenerationResults of a setting on a task."""
    costs = [r.cost for r in results]
    new = sum(c["new_bytes"] for c in costs)
    drafted = sum(c["drafted"] for c in costs)
    method = setting.kwargs["method"]
    passes = sum(c["decoder_calls"] - 1 for c in costs)  # after each output's prefill pass
    return {"task": task_name, "model": setting.model, "setting": setting.label, "method": method,
            "kwargs": {k: str(v) if k == "unmask" else v for k, v in setting.kwargs.items()}, **scores,
            "acceptance": sum(c["accepted"] for c in costs) / drafted if drafted else None,
            "decoder_nfe": mean_cost(costs, "decoder_calls"), "global_nfe": mean_cost(costs, "global_calls"),
            "decoder_nfe_paper": mean_cost(costs, "paper_decoder_calls"),
            "global_nfe_paper": mean_cost(costs, "paper_global_calls"),
            "rounds": mean_cost(costs, "rounds"), "new_bytes_per_output": new / len(costs),
            "eq8_gb": mean_cost(costs, "eq8_bandwidth_gb"), "eq8_gb_paper": mean_cost(costs, "eq8_bandwidth_gb_paper"),
            "bytes_per_decoder_pass": new / passes if method == "d" and passes > 0 else None,
            "bytes_per_s": new / seconds, "seconds": seconds,
            "outputs": [r.new_bytes.decode("utf-8", "replace") for r in results]}


def run_setting(model, setting: Setting, task: Task, repeats: int) -> dict:
    def gen():
        return api.generate(model, task.prompts, max_new_bytes=task.new_bytes, stop_at_eos=False, **setting.kwargs)

    seconds, results = best_of(gen, repeats)
    return summarize(setting, task.name, results, seconds,
                     task.score([r.new_bytes.decode("utf-8", "replace") for r in results]))


def add_reductions(rows: list[dict]) -> None:
    """Against BLT (AR) on the same task: the Eq. 8 cut in both accountings, the measured speed-up, and whether
    the output equals the AR output of the same weights (BLT-S vs BLT, BLT-DV vs BLT-D-B AR: greedy makes them
    equal)."""
    def cut(r, base, key):
        return None if r.get(key) is None or not base.get(key) else 100 * (1 - r[key] / base[key])

    for r in rows:
        base = next(b for b in rows if b["task"] == r["task"] and b["setting"] == "BLT (AR)")
        same_weights_ar = next(b for b in rows if b["task"] == r["task"] and b["model"] == r["model"]
                               and b["kwargs"]["method"] == "ar")
        r["eq8_reduction_pct"] = cut(r, base, "eq8_gb")
        r["eq8_reduction_pct_paper"] = cut(r, base, "eq8_gb_paper")
        r["speed_vs_blt"] = r["bytes_per_s"] / base["bytes_per_s"]
        r["same_output_as_ar"] = r["outputs"] == same_weights_ar["outputs"]


def blt_d_verdicts(rows: list[dict], margin: float) -> list[str]:
    """Each BLT-D-B at alpha 0.7 against its own AR output's score, per task."""
    lines = []
    for r in rows:
        if not r["setting"].endswith("a=0.7") or r["method"] != "d":
            continue
        ar = next(b for b in rows if b["task"] == r["task"] and b["model"] == r["model"] and b["method"] == "ar")
        why = (f"; its decoder commits {r['bytes_per_decoder_pass']:.2f} bytes per pass"
               if r["bytes_per_decoder_pass"] is not None else "")
        if ar["score"] == 0 and r["score"] == 0:
            verdict = "**not** comparable: both score 0"
        else:
            verdict = ("within" if r["score"] >= ar["score"] * (1 - margin) else "**not** within") + \
                f" {margin:.0%} of it"
        lines.append(f"- {r['task']}, {r['setting']}: {r['score']:.2f} against {ar['score']:.2f} for the same "
                     f"weights decoding autoregressively, {verdict}{why}.")
    return lines


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(rows: list[dict], tasks: list[Task], margin: float) -> str:
    out = []
    for task in tasks:
        trs = [r for r in rows if r["task"] == task.name]
        if not trs:
            continue
        out += [f"## {task.name} ({len(task.prompts)} prompts, {task.new_bytes} new bytes each, greedy)", "",
                table(["setting", task.score_name, "acc %", "dec NFE", "enc/glob NFE", "dec NFE paper",
                       "enc/glob NFE paper", "rounds", "Eq.8 GB paper", "Δ % paper", "Eq.8 GB as run", "Δ % as run",
                       "bytes/pass", "bytes/s", "x BLT", "= AR"],
                      [[r["setting"], r["score"], fmt(r["acceptance"] and 100 * r["acceptance"], ".1f"),
                        fmt(r["decoder_nfe"], ".1f"), fmt(r["global_nfe"], ".1f"),
                        fmt(r.get("decoder_nfe_paper"), ".1f"), fmt(r.get("global_nfe_paper"), ".1f"),
                        fmt(r["rounds"], ".1f"),
                        fmt(r["eq8_gb_paper"], ".5f"), fmt(r["eq8_reduction_pct_paper"], ".1f"),
                        fmt(r["eq8_gb"], ".5f"), fmt(r["eq8_reduction_pct"], ".1f"),
                        fmt(r["bytes_per_decoder_pass"], ".2f"), f"{r['bytes_per_s']:.0f}",
                        f"{r['speed_vs_blt']:.2f}", "yes" if r["same_output_as_ar"] else "no"] for r in trs]), ""]
        verdicts = blt_d_verdicts(trs, margin)
        if verdicts:
            out += ["BLT-D at α = 0.7 against its own AR output:", "", *verdicts, ""]
    return "\n".join(out)


def plot(rows: list[dict], task_names: list[str]):
    plt = figure()
    fig, axes = plt.subplots(1, len(task_names), figsize=(6 * len(task_names), 4.5), squeeze=False)
    families = list(dict.fromkeys(r["setting"].split(" ")[0] for r in rows))
    colors = dict(zip(families, plt.get_cmap("tab10").colors, strict=False))
    key = "eq8_reduction_pct_paper" if all(r.get("eq8_reduction_pct_paper") is not None for r in rows) \
        else "eq8_reduction_pct"
    for ax, name in zip(axes[0], task_names, strict=True):
        for family in families:
            pts = [r for r in rows if r["task"] == name and r["setting"].split(" ")[0] == family]
            ax.scatter([r[key] for r in pts], [r["speed_vs_blt"] for r in pts], s=25, color=colors[family],
                       label=family)
            for r in pts:
                ax.annotate(r["setting"].split(" ", 1)[-1], (r[key], r["speed_vs_blt"]), fontsize=6)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel(f"Eq. 8 bandwidth reduction vs BLT (%, {'paper' if key.endswith('paper') else 'as run'})")
        ax.set_ylabel("measured bytes/s relative to BLT")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def model_runs(runs: Path, size: Optional[str], blocks) -> dict[str, Path]:
    """model name -> run directory, for the finished runs (their result.json is written when training ends)."""
    def path(model):
        if size is None:
            return runs / model / "run"
        return run_dir(runs, size, "entropy" if model == "blt" else model)

    return {m: path(m) for m in ["blt", *(f"d-{b}" for b in blocks)] if (path(m).parent / "result.json").exists()}


def make_tasks(args) -> tuple[list[Task], list[str]]:
    from blt_jax.tasks.translation import NoCatalogs  # noqa: PLC0415

    tasks, notes = [], []
    for name in args.tasks:
        if name == "continuation":
            tasks.append(continuation_task(args.items, args.prompt_bytes, args.new_bytes))
        elif name == "translation":
            try:
                tasks.append(translation_task(args.lang, args.items, args.shots, args.translation_new_bytes))
            except NoCatalogs as e:
                notes.append(f"translation skipped: {e}")
        else:
            tasks.append(humaneval_task(args.items, args.new_bytes))
    return tasks, notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path(DEFAULT_RUNS), help="where the trained runs are")
    p.add_argument("--size", help="a scaling-study size under --runs (default: best_models.py's layout)")
    p.add_argument("--blocks", type=int, nargs="+", default=list(BLOCKS), choices=BLOCKS)
    p.add_argument("--tasks", nargs="+", default=["continuation", "translation"], choices=TASKS)
    p.add_argument("--items", type=int, default=16, help="prompts per task")
    p.add_argument("--prompt-bytes", type=int, default=200, help="continuation prompt length")
    p.add_argument("--new-bytes", type=int, default=128, help="new bytes per output (continuation, humaneval)")
    p.add_argument("--translation-new-bytes", type=int, default=64)
    p.add_argument("--lang", default="fr")
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--margin", type=float, default=0.10, help="BLT-D alpha 0.7 vs its AR: relative score margin")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--name", default="generation_cost")
    p.add_argument("--replot", action="store_true", help="redraw the PNG from the saved JSON (no generation)")
    args = p.parse_args()
    if args.replot:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        tasks = list(dict.fromkeys(r["task"] for r in saved["rows"]))
        plot(saved["rows"], tasks).savefig(RESULTS / f"{args.name}.png", dpi=120, bbox_inches="tight")
        return
    runs = model_runs(args.runs, args.size, args.blocks)
    if "blt" not in runs:
        raise SystemExit(f"{args.runs}: no trained BLT there (train it: python experiments/best_models.py)")
    missing = [f"d-{b}" for b in args.blocks if f"d-{b}" not in runs]
    enable_compilation_cache(args.runs)
    t0 = time.time()
    tasks, notes = make_tasks(args)
    notes += [f"{m}: no trained run under {args.runs}; its rows are left out" for m in missing]
    models, rows = {}, []
    for setting in settings([b for b in args.blocks if f"d-{b}" in runs]):
        if setting.model not in models:
            models[setting.model] = api.load(str(runs[setting.model]))
        for task in tasks:
            r = run_setting(models[setting.model], setting, task, args.repeats)
            print(f"{task.name:12s} {setting.label:22s} score {r['score']:7.2f}  dec NFE {r['decoder_nfe']:.1f}  "
                  f"glob NFE {r['global_nfe']:.1f}  acc {r['acceptance']}  {r['bytes_per_s']:.0f} B/s", flush=True)
            rows.append(r)
        # free the setting's compiled programs: each holds memory maps (about 3 per kernel) and a process may
        # hold only vm.max_map_count (65,530 by default) of them; the whole table compiles far more
        jax.clear_caches()
    add_reductions(rows)
    seconds = time.time() - t0
    where = args.size or str(args.runs)
    md = (f"# Generation cost ({where})\n\n" + "".join(f"- {n}\n" for n in notes) + ("\n" if notes else "")
          + markdown(rows, tasks, args.margin)
          + f"\nwall time: {seconds:.0f} s on {environment()['device']} ({environment()['cpus']} CPUs)\n")
    print(md)
    write_results(args.name, md, {"env": environment(), "args": {k: str(v) for k, v in vars(args).items()},
                                  "notes": notes, "seconds": seconds, "rows": rows},
                  plot(rows, [t.name for t in tasks]))


if __name__ == "__main__":
    main()
