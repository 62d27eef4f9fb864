"""Bulk generation: aggregate bytes/s of batch 1, static batches of 32 and continuous batching, and peak RSS
against the number of prompts.

    nice -n 10 python experiments/bulk_generation.py --checkpoint runs/qs/blt

Workload (fixed seed): prompts cut from the embedded corpus (CPython's standard library source) at random
offsets, 16-512 bytes long, budgets of 16-256 new bytes, greedy, stopping at EOS.

- batch 1: `bulk.generate_file` with one live row (the buckets of the continuous run: compiled once);
- static 32: `api.generate` on consecutive groups of 32 prompts, each group run to its largest budget (one
  `max_new_bytes` per call, as `blt generate --file` batches), each row cut to its own budget;
- continuous 32: `bulk.generate_file` with `--batch-size 32`: a finished row's slot takes the next prompt.

Every mode runs after a warm-up that compiles its programs; bytes/s counts the bytes the prompts asked for and
got. Wall time, this process's CPU time (`time.process_time`) and the load average are recorded: other work
may share the CPU. Memory: `blt generate --input` runs in a subprocess for each count in `--rss-counts`, and
its peak RSS is read from `os.wait4`. Writes experiments/results/bulk_generation.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
from common import DEFAULT_WORKDIR, enable_compilation_cache, environment, figure, table, write_results

STATIC_BATCH = 32
RSS_PROMPT_BYTES, RSS_BUDGETS = (16, 64), (8, 16)  # the memory runs' records


def workload(n: int, seed: int = 0, lengths=(16, 512), budgets=(16, 256)) -> list[dict]:
    """n records: slices of the standard library's source at random offsets, and budgets."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 4096)
    rng = np.random.default_rng(seed)
    records = []
    while len(records) < n:
        data = files[int(rng.integers(len(files)))].read_bytes()
        size = int(rng.integers(lengths[0], lengths[1] + 1))
        start = int(rng.integers(0, len(data) - size))
        prompt = data[start:start + size].decode("utf-8", errors="ignore")
        if len(prompt.encode()) < lengths[0]:
            continue
        records.append({"id": len(records), "prompt": prompt,
                        "max_new_bytes": int(rng.integers(budgets[0], budgets[1] + 1))})
    return records


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def load_model(args):
    from blt_jax.generation import api  # noqa: PLC0415

    if args.checkpoint:
        return api.load(args.checkpoint), args.checkpoint
    import dataclasses  # noqa: PLC0415

    from blt_jax import model as model_lib  # noqa: PLC0415
    from blt_jax.config import get_preset  # noqa: PLC0415
    from blt_jax.generation.loaded import from_params  # noqa: PLC0415

    cfg = get_preset("quickstart").model
    cfg = dataclasses.replace(cfg, patching=dataclasses.replace(cfg.patching, threshold=3.0))
    _, params = model_lib.build(cfg, 0)
    _, eparams = model_lib.build(cfg.entropy_model, 1)
    return from_params(cfg, params, eparams), "random quickstart weights"


def bucket_warmup(records: list[dict], max_positions: int) -> list[dict]:
    """One short record per prompt bucket (so the timed run compiles nothing)."""
    from blt_jax.generation.bulk import prompt_buckets  # noqa: PLC0415

    out, previous = [], 1
    for bucket in prompt_buckets(max_positions - 2):
        size = min(bucket - 1, max(previous, 16))  # a prompt of `size` bytes has size + 1 ids: this bucket
        previous = bucket
        out.append({"id": f"warm{bucket}", "prompt": "x" * size, "max_new_bytes": 16})
    return out


def timed(fn) -> dict:
    load = os.getloadavg()[0]
    t, cpu = time.perf_counter(), time.process_time()
    new_bytes = fn()
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {"wall_s": wall, "cpu_s": cpu, "new_bytes": new_bytes, "bytes_per_s": new_bytes / wall,
            "bytes_per_cpu_s": new_bytes / cpu, "load_before": load, "load_after": os.getloadavg()[0]}


def run_bulk(model, records, batch_size: int, max_positions: int, work: Path) -> dict:
    from blt_jax.generation import api, bulk  # noqa: PLC0415

    mc = api.method_config(model, "ar")
    warm = write_jsonl(bucket_warmup(records, max_positions), work / f"warm{batch_size}.jsonl")
    bulk.generate_file(model, str(warm), str(warm.with_suffix(".out")), mc, batch_size=batch_size,
                       max_positions=max_positions, progress=False)
    inp = write_jsonl(records, work / f"in{batch_size}.jsonl")
    out = work / f"out{batch_size}.jsonl"

    def go():
        return bulk.generate_file(model, str(inp), str(out), mc, batch_size=batch_size, max_positions=max_positions,
                                  progress=False)["new_bytes"]

    result = timed(go)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(records) and not any("error" in o for o in lines), "every record generates"
    result["outputs"] = {o["id"]: o["text"] for o in lines}
    return result


def run_prefill(model, records, max_positions: int) -> dict:
    """The prompts' prefills alone (one row each, the bulk runs' buckets): the part batching does not share."""
    import jax  # noqa: PLC0415

    from blt_jax.generation import api, bulk  # noqa: PLC0415
    from blt_jax.generation.sampling import SamplingConfig  # noqa: PLC0415
    from blt_jax.tokenizer import encode  # noqa: PLC0415

    batcher = bulk.ContinuousBatcher(model, api.method_config(model, "ar"), 1, max_positions)
    requests = [bulk.Request(encode(r["prompt"].encode(), bos=True), r["max_new_bytes"], SamplingConfig(),
                             bulk.request_key(0)) for r in records]

    def go():
        for r in requests:
            jax.block_until_ready(batcher._prefill(r))
        return 0

    go()  # compiled (every bucket) before timing
    result = timed(go)
    result.pop("bytes_per_s"), result.pop("bytes_per_cpu_s")
    return result


def run_static(model, records) -> dict:
    """api.generate on groups of 32; the groups' distinct shapes are compiled (run once) before timing."""
    from blt_jax.generation import api  # noqa: PLC0415
    from blt_jax.generation.prompts import prepare_prompts  # noqa: PLC0415

    groups = [records[i:i + STATIC_BATCH] for i in range(0, len(records), STATIC_BATCH)]
    lookahead = api.method_config(model, "ar").lookahead

    def shape(group):
        b = prepare_prompts([r["prompt"] for r in group], max(r["max_new_bytes"] for r in group), lookahead)
        return b.bucket, b.prompt_len

    seen = {}
    for g in groups:
        seen.setdefault(shape(g), g)
    for g in seen.values():
        api.generate(model, [r["prompt"] for r in g], max_new_bytes=max(r["max_new_bytes"] for r in g))
    outputs = {}

    def go():
        total = 0
        for g in groups:
            results = api.generate(model, [r["prompt"] for r in g], max_new_bytes=max(r["max_new_bytes"] for r in g))
            for r, res in zip(g, results, strict=True):
                kept = res.new_bytes[:r["max_new_bytes"]]
                total += len(kept)
                outputs[r["id"]] = kept.decode("utf-8", errors="replace")
        return total

    result = timed(go)
    result["shapes"] = len(seen)
    result["outputs"] = outputs
    return result


def peak_rss(checkpoint: str, records: list[dict], max_positions: int, work: Path) -> dict:
    """`blt generate --input` over these records in a subprocess: its peak RSS (MiB) and wall time."""
    inp = write_jsonl(records, work / f"rss{len(records)}.jsonl")
    out = work / f"rss{len(records)}.out"
    out.unlink(missing_ok=True)
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(Path(DEFAULT_WORKDIR, "jax_cache").absolute()),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"}
    log = work / f"rss{len(records)}.log"
    t = time.perf_counter()
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "blt_jax", "generate", "--checkpoint", checkpoint, "--input",
                                 str(inp), "--output", str(out), "--batch-size", str(STATIC_BATCH),
                                 "--max-positions", str(max_positions), "--no-progress"], env=env, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"blt generate failed:\n{log.read_text()[-2000:]}")
    return {"records": len(records), "peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": time.perf_counter() - t,
            "lines": len(out.read_text().splitlines())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/qs/blt", help="a BLT run ('' for random quickstart weights)")
    p.add_argument("--prompts", type=int, default=1000)
    p.add_argument("--max-positions", type=int, default=1024, help="positions per row of the bulk runs")
    p.add_argument("--modes", nargs="+", default=["continuous", "static", "batch1"],
                   choices=["continuous", "static", "batch1"])
    p.add_argument("--rss-counts", type=int, nargs="*", default=[100, 300, 1000, 3000])
    p.add_argument("--name", default="bulk_generation", help="results file name")
    args = p.parse_args(argv)
    enable_compilation_cache()
    if args.checkpoint and not Path(args.checkpoint).exists():
        raise SystemExit(f"--checkpoint {args.checkpoint}: no such run (train it with `blt quickstart --out runs/qs`)")
    model, model_name = load_model(args)
    timed_records = workload(args.prompts)
    # memory against the count needs many records, not long ones: short prompts and budgets keep those runs quick
    rss_records = workload(max(args.rss_counts, default=0), seed=1, lengths=RSS_PROMPT_BYTES, budgets=RSS_BUDGETS)
    asked = sum(r["max_new_bytes"] for r in timed_records)
    print(f"{len(timed_records)} prompts, {sum(len(r['prompt'].encode()) for r in timed_records):,} prompt bytes, "
          f"{asked:,} bytes asked for", flush=True)
    modes = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for mode in args.modes:
            if mode == "continuous":
                modes[mode] = run_bulk(model, timed_records, STATIC_BATCH, args.max_positions, work)
            elif mode == "batch1":
                modes[mode] = run_bulk(model, timed_records, 1, args.max_positions, work)
            else:
                modes[mode] = run_static(model, timed_records)
            m = modes[mode]
            print(f"{mode}: {m['new_bytes']:,} bytes in {m['wall_s']:.1f} s wall / {m['cpu_s']:.1f} s CPU: "
                  f"{m['bytes_per_s']:,.0f} B/s (load {m['load_before']:.1f} -> {m['load_after']:.1f})", flush=True)
        prefill = run_prefill(model, timed_records, args.max_positions) if "continuous" in modes else None
        if prefill:
            print(f"prefills alone: {prefill['wall_s']:.1f} s wall / {prefill['cpu_s']:.1f} s CPU", flush=True)
        rss = []
        for n in sorted(args.rss_counts):
            if args.checkpoint:
                rss.append(peak_rss(args.checkpoint, rss_records[:n], args.max_positions, work))
                print(f"rss: {n} prompts: {rss[-1]['peak_rss_mib']:.0f} MiB peak, {rss[-1]['wall_s']:.0f} s",
                      flush=True)
    same = None
    if {"continuous", "batch1"} <= set(modes):
        a, b = modes["continuous"]["outputs"], modes["batch1"]["outputs"]
        same = sum(a[k] == b[k] for k in a) / len(a)
    if {"continuous", "static"} <= set(modes):
        a, b = modes["continuous"]["outputs"], modes["static"]["outputs"]
        same_static = sum(a[k] == b[k] for k in a) / len(a)
    else:
        same_static = None
    for m in modes.values():
        m.pop("outputs")
    base = modes.get("batch1", {}).get("bytes_per_s")
    data = {"environment": environment(), "model": model_name, "prompts": len(timed_records),
            "prompt_bytes": [16, 512], "budgets": [16, 256], "bytes_asked": asked,
            "prompt_bytes_total": sum(len(r["prompt"].encode()) for r in timed_records),
            "max_positions": args.max_positions, "modes": modes,
            "speedup_vs_batch1": {k: m["bytes_per_s"] / base for k, m in modes.items()} if base else None,
            "identical_outputs": {"continuous_vs_batch1": same, "continuous_vs_static": same_static},
            "prefill_only": prefill, "rss": rss}
    write_results(args.name, report(data), data, plot(data))
    return 0


def _shared(d: dict) -> bool:
    """Whether other work ran beside the timed modes: a load above this process's own one core."""
    return max(max(m["load_before"], m["load_after"]) for m in d["modes"].values()) > 1.5


def report(d: dict) -> str:
    names = {"batch1": "batch 1 (one live row)", "static": f"static batches of {STATIC_BATCH}",
             "continuous": f"continuous, --batch-size {STATIC_BATCH}"}
    rows = [[names[k], m["new_bytes"], m["wall_s"], m["cpu_s"], m["bytes_per_s"], m["bytes_per_cpu_s"],
             (d["speedup_vs_batch1"] or {}).get(k), f"{m['load_before']:.1f} / {m['load_after']:.1f}"]
            for k, m in d["modes"].items()]
    env = d["environment"]
    lines = [
        "# Bulk generation: continuous batching vs batch 1 and static batches",
        "",
        f"`python experiments/bulk_generation.py` on {env['cpus']} CPUs ({env['device']}), {env['date']}, blt_jax "
        f"{env['blt_jax']}; model: {d['model']}. {d['prompts']} prompts cut from the standard library's source "
        f"({d['prompt_bytes'][0]}-{d['prompt_bytes'][1]} bytes), budgets {d['budgets'][0]}-{d['budgets'][1]} new "
        f"bytes ({d['bytes_asked']:,} asked for), greedy, stopping at EOS; `ar`, {d['max_positions']} positions "
        "per row for the bulk runs. Each mode was compiled before it was timed.",
        "",
        table(["mode", "new bytes", "wall s", "CPU s", "bytes/s (wall)", "bytes per CPU s", "x batch 1",
               "load avg before / after"], rows),
        "",
        ("The machine was shared with other jobs while this ran (load average in the last column; "
         f"{env['cpus']} cores), so the wall-clock rates are lower bounds; bytes per CPU second (this process's own "
         "CPU time) is the steadier comparison." if _shared(d) else
         "Nothing else ran on the machine (a load average of about 1 is this process), so wall and CPU time agree."),
    ]
    same = d["identical_outputs"]
    if same["continuous_vs_batch1"] is not None:
        lines += ["", f"Continuous and batch-1 outputs are identical for {100 * same['continuous_vs_batch1']:.1f}% of "
                      "the prompts (a row's bytes do not depend on its batch or slot)."]
    if same["continuous_vs_static"] is not None:
        lines += [f"Against `api.generate` in static batches: {100 * same['continuous_vs_static']:.1f}% identical "
                  "(those buffers and prefill chunks differ in size, so float sums may round differently where "
                  "two bytes are nearly tied)."]
    modes = d["modes"]
    if {"continuous", "batch1"} <= set(modes):
        cont, one = modes["continuous"], modes["batch1"]
        wall, cpu = cont["bytes_per_s"] / one["bytes_per_s"], cont["bytes_per_cpu_s"] / one["bytes_per_cpu_s"]
        lines += ["", f"Continuous batching against batch 1: {wall:.2f}x per wall second, {cpu:.2f}x per CPU second "
                      f"(target: 3x; {'met' if min(wall, cpu) >= 3 else 'not met in this run'}). Batching shares a "
                      "generation round among the live rows, not the prefills: every prompt is prefilled once, as "
                      f"one row, in every bulk mode ({d['prompt_bytes_total']:,} prompt bytes here against "
                      f"{d['bytes_asked']:,} new bytes)."]
    if d.get("prefill_only") and "continuous" in modes:
        pre = d["prefill_only"]
        lines += [f"Prefilling every prompt alone (one row each, the same buckets) took {pre['cpu_s']:.1f} s CPU, "
                  f"{100 * pre['cpu_s'] / modes['continuous']['cpu_s']:.0f}% of the continuous run's CPU time."]
        if "batch1" in modes:
            one, prefills = modes["batch1"]["cpu_s"], pre["cpu_s"]
            gen_one, gen_cont = one - prefills, modes["continuous"]["cpu_s"] - prefills
            lines += [f"Without the prefills, generation alone took {gen_one:.1f} CPU s at batch 1 and {gen_cont:.1f} "
                      f"at --batch-size {STATIC_BATCH} ({gen_one / gen_cont:.2f}x). The prefills bound what batching "
                      "the rounds can give on this workload: even free generation would make continuous batching "
                      f"{one / prefills:.2f}x batch 1 per CPU second, not 3x."]
    if d["rss"]:
        lines += ["", "## Peak memory against the number of prompts", "",
                  f"`blt generate --input --batch-size {STATIC_BATCH}` in a fresh process per count (peak RSS from "
                  "the kernel's rusage; the compiled programs come from the on-disk cache), on records of "
                  f"{RSS_PROMPT_BYTES[0]}-{RSS_PROMPT_BYTES[1]} prompt bytes and {RSS_BUDGETS[0]}-{RSS_BUDGETS[1]} "
                  "new bytes (what is measured is whether memory grows with the count, so short records keep "
                  "these runs quick):", "",
                  table(["prompts", "peak RSS MiB", "wall s"],
                        [[r["records"], r["peak_rss_mib"], r["wall_s"]] for r in d["rss"]])]
    return "\n".join(lines)


def plot(d: dict):
    plt = figure()
    fig, axes = plt.subplots(1, 2 if d["rss"] else 1, figsize=(11 if d["rss"] else 6, 4), squeeze=False)
    ax = axes[0][0]
    names = list(d["modes"])
    ax.bar(names, [d["modes"][k]["bytes_per_s"] for k in names], color="tab:blue", label="per wall second")
    ax.bar(names, [d["modes"][k]["bytes_per_cpu_s"] for k in names], color="none", edgecolor="tab:red",
           label="per CPU second")
    ax.set_ylabel("generated bytes/s")
    ax.set_title(f"{d['prompts']} prompts, ar, greedy")
    ax.legend()
    if d["rss"]:
        ax = axes[0][1]
        ax.plot([r["records"] for r in d["rss"]], [r["peak_rss_mib"] for r in d["rss"]], "o-")
        ax.set_xscale("log")
        ax.set_ylim(0, max(r["peak_rss_mib"] for r in d["rss"]) * 1.3)
        ax.set_xlabel("prompts in the input file")
        ax.set_ylabel("peak RSS (MiB)")
        ax.set_title("blt generate --input --batch-size 32")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
