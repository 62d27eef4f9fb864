"""The GPU recipe: one run, inside a time budget, of
  (1) the training-step MFU of the Fast BLT 1B model (`fast-blt-1b`, bfloat16, 8192-byte windows, hash tables
      of 65,536 rows): model FLOP/s, bytes/s, MFU against the chip's bf16 peak (flops.PEAK_FLOPS_PER_DEVICE) and
      a measured 8192^3 bf16 matmul; the target is 40% of the chip's peak;
  (2) a short scaling ladder (`sizes.GPU_LADDER`: ~0.1B, ~0.4B and the 1B shape at 1e16, 3e16 and 1e17 training
      FLOPs), each point a real `blt train` run with held-out bits/byte, plus a BLT-D-8 twin of the smallest
      (trained second);
  (3) the generation ladder (experiments/generation_ladder.py's rows through `api.generate`) on the largest
      model it trained, and on the BLT-D-8 if there is one.
Everything lands in <out>/<name>.{md,json,png} (default experiments/results/gpu_run.*), rewritten after each
phase and each ladder point.

    python experiments/gpu_run.py --minutes 9 --out $OUT      # on a GPU, inside 9 minutes
    python experiments/gpu_run.py --smoke                     # CPU, tiny models, every phase (~2 min idle)

Time: phase (1) runs first (one compile, a few steps); a quarter of the budget is held back for (3). Each ladder point
is sized from the throughput measured so far: one that does not fit the time left is shrunk to what fits
(its FLOPs say so), or skipped below a quarter of its budget; a run still going at the phase's deadline is
stopped there (SIGTERM to itself: the trainer checkpoints), its checkpoint evaluated and reported as stopped.
Generation settings stop being started once the time is out. What did not run says why in the report.

Data: the ladder trains on Python source of the machine it runs on (the interpreter's standard library and
installed packages, `*.py`), capped at what the largest point reads, held-out files by the usual hash split;
static patches of 4 (an entropy model and its pass over the corpus would not fit a few minutes).

On the device machine (nvidia-h200 here) the image has jax, flax, optax, orbax, tensorstore and sacrebleu but
not grain (nor its array-record and portpicker) or tensorboardX. Carry them as wheels, made once here:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5

and run, carrying `.whl` (about 4.5 MB):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \\
    PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 experiments/gpu_run.py --minutes 9 --out $OUT

then copy $OUT's gpu_run.{md,json,png} into experiments/results/. An existing result is never overwritten
without --overwrite.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import signal
import sys
import sysconfig
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import jax
import sizes
from common import RESULTS, environment, figure, table, write_results

from blt_jax import flops
from blt_jax.config import apply_overrides, get_preset

# --smoke: one tiny ladder point (and its BLT-D-8 twin), the same code path as the GPU run's
SMOKE_LADDER = {"smoke-s": sizes.Size(local_dim=32, global_dim=64, global_layers=1, decoder_layers=1,
                                      budget_flops=2e9)}
SMOKE_COMMON = {"model.patching.mode": "static", "model.patching.patch_size": 4, "model.patching.max_patches": 40,
                "model.patching.max_patch_length": None, "data.seq_len": 128, "data.batch_size": 4,
                "train.log_every": 5, "train.checkpoint_every": 100_000, "train.keep_checkpoints": 1,
                "train.eval_batches": 1, "train.compute_dtype": "bfloat16", "train.async_checkpoint": False}


class Clock:
    """The run's budget: seconds left before the whole run's end and before a phase's end."""

    def __init__(self, minutes: float, reserve_s: float):
        self.start = time.time()
        self.end = self.start + 60 * minutes - reserve_s  # the report needs the rest

    def left(self, until: Optional[float] = None) -> float:
        return (self.end if until is None else min(until, self.end)) - time.time()


_deadline_hit = threading.Event()


def _on_sigterm(signum, frame):  # outside the trainer (which handles SIGTERM itself): note it, stop later
    _deadline_hit.set()


@contextmanager
def stop_at(deadline: float):
    """SIGTERM to this process at `deadline`: the trainer saves a checkpoint and returns `interrupted`."""
    timer = threading.Timer(max(0.0, deadline - time.time()), lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# ---- (1) MFU ---------------------------------------------------------------------------------------------

def mfu_phase(args, report: dict) -> None:
    import jax.numpy as jnp  # noqa: PLC0415
    from train_throughput import matmul_peak, measure  # noqa: PLC0415

    if args.smoke:  # one global and one decoder layer: the path is under test, not depth (compiles faster)
        cfg = apply_overrides(get_preset("tiny"), ["train.compute_dtype=\"bfloat16\"", "data.batch_size=4",
                                                   "model.global_model.n_layers=1", "model.decoder.n_layers=1"])
    else:  # hash tables of 65,536 rows (their lookups count no FLOPs; 500K rows' optimizer state would crowd
        # out activations on one chip)
        cfg = apply_overrides(get_preset(sizes.GPU_PRESET), ["train.compute_dtype=\"bfloat16\"",
                                                              f"data.batch_size={args.mfu_batch}",
                                                              "model.hash_vocab=65536"])
    matmul_n = 512 if args.smoke else 8192
    peak = matmul_peak(jnp.bfloat16, n=matmul_n)
    batch = cfg.data.batch_size
    while True:
        try:
            row = measure(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch)), "blt",
                          steps=2 if args.smoke else args.mfu_steps, peak_n=256 if args.smoke else 2048)
            break
        except Exception as e:  # noqa: BLE001 (XLA reports out-of-memory as a generic runtime error)
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower() or batch == 1:
                report["mfu_error"] = error_line(e)
                print(f"mfu: failed: {error_line(e)}", flush=True)
                return
            print(f"mfu: batch {batch} does not fit ({error_line(e)}); halving", flush=True)
            batch //= 2
    row.update(preset=cfg.name, bf16_matmul_peak=peak, bf16_matmul_n=matmul_n, target_mfu=0.40,
               mfu_vs_bf16_matmul_peak=row["model_flops_per_second"] / peak)
    report["mfu"] = row
    print(f"mfu: {row['model_flops_per_second'] / 1e12:.1f} TFLOP/s, {row['bytes_per_second']:,.0f} bytes/s, "
          f"MFU {fmt_pct(row['mfu_vs_chip_peak'])} of the chip's peak, {row['mfu_vs_bf16_matmul_peak']:.1%} of "
          f"the measured bf16 matmul", flush=True)


# ---- (2) the ladder --------------------------------------------------------------------------------------

def ladder_sizes(args) -> dict[str, sizes.Size]:
    table_ = SMOKE_LADDER if args.smoke else sizes.GPU_LADDER
    return {n: table_[n] for n in (args.ladder or table_)}


def ladder_config(args, name: str, store_root: str, block_size: int = 0):
    if args.smoke:
        cfg = sizes.build({**SMOKE_LADDER[name].overrides(), **SMOKE_COMMON}, store_root, name=name, preset="tiny")
    else:
        cfg = sizes.gpu_ladder_config(name, store_root)
    if block_size:
        cfg = apply_overrides(cfg, [f"model.diffusion.block_size={block_size}"])
        cfg = dataclasses.replace(cfg, name=f"{name}-d{block_size}")
    return cfg


def corpus_files(smoke: bool, max_bytes: int) -> Optional[list[str]]:
    """The ladder's corpus: None (the embedded one) for --smoke, else the machine's Python source: a
    deterministic sample (by a hash of the path) of the interpreter's stdlib and installed `*.py` files, about
    `max_bytes` of them."""
    if smoke:
        return None
    roots = dict.fromkeys(Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib", "platlib"))
    files = {p.resolve() for root in roots if root.is_dir() for p in root.rglob("*.py")
             if p.is_file() and p.stat().st_size > 0}
    chosen, total = [], 0
    for f in sorted(files, key=lambda f: hashlib.sha256(str(f).encode()).digest()):
        if total >= max_bytes:
            break
        chosen.append(str(f))
        total += f.stat().st_size
    return sorted(chosen)


def prepare_data(args, max_train_bytes: int) -> str:
    from blt_jax import prepare  # noqa: PLC0415
    from blt_jax.data import store  # noqa: PLC0415

    root = str(Path(args.workdir) / "data")
    try:
        store.read_manifest(root)
    except FileNotFoundError:
        files = corpus_files(args.smoke, int(1.1 * max_train_bytes))  # the held-out 2% come out of it too
        t = time.time()
        m = prepare.prepare_corpus(root, files, max_train_bytes=max_train_bytes)
        print(f"data: {m['train']['num_tokens']:,} training and {m['heldout']['num_tokens']:,} held-out bytes "
              f"({time.time() - t:.0f} s)", flush=True)
    return root


def steps_for(cfg, budget: float) -> tuple[int, float]:
    fpb = flops.train_flops_per_byte(cfg.model, cfg.data.seq_len, cfg.model.patching.patch_size)
    return max(1, round(budget / (fpb * cfg.data.batch_size * cfg.data.seq_len))), fpb


def plan_point(budget: float, flops_per_s: float, compile_s: float, seconds_left: float) -> tuple[float, str]:
    """(FLOPs to train, note): the planned budget if it fits the time left, else what fits (0: skip)."""
    fits = (seconds_left - compile_s) * flops_per_s
    if fits >= budget:
        return budget, ""
    if fits < budget / 4:
        return 0.0, f"skipped: needs ~{compile_s + budget / flops_per_s:.0f} s, {seconds_left:.0f} s left"
    return fits, f"shrunk from {budget:.2g} FLOPs to fit the time left"


def train_point(args, clock: Clock, name: str, cfg, budget: float, planned: float, note: str, deadline: float):
    from blt_jax.evaluate import heldout_bpb  # noqa: PLC0415
    from blt_jax.model import param_counts  # noqa: PLC0415
    from blt_jax.train.loop import train  # noqa: PLC0415

    steps, fpb = steps_for(cfg, budget)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps,
                                                             warmup_steps=max(1, steps // 20)))
    run = Path(args.workdir) / name / "run"
    t = time.time()
    with stop_at(deadline):
        summary = train("blt", cfg, run, progress=False)
    done = summary["step"]
    heldout = summary["heldout"] if not summary["interrupted"] else heldout_bpb(str(run))
    c = param_counts(cfg.model)
    bytes_per_step = cfg.data.batch_size * cfg.data.seq_len
    row = {"name": name, "run": str(run), "block_size": cfg.model.diffusion.block_size,
           "params_non_embedding": c["encoder"] + c["global"] + c["decoder"], "train_flops_per_byte": fpb,
           "planned_flops": planned, "steps": steps, "steps_done": done, "train_flops": done * bytes_per_step * fpb,
           "heldout_bpb": heldout["bits_per_byte"], "seconds": time.time() - t,
           "bytes_per_second": summary.get("last_train", {}).get("bytes_per_second"),
           "stopped_at_deadline": bool(summary["interrupted"]), "note": note}
    if row["stopped_at_deadline"]:
        row["note"] = (note + "; " if note else "") + f"stopped at the deadline after {done} of {steps} steps"
    return row


def ladder_phase(args, clock: Clock, report: dict, write) -> None:
    points = ladder_sizes(args)
    configs = {n: ladder_config(args, n, "") for n in points}
    need = max(steps_for(c, points[n].budget_flops)[0] * c.data.batch_size * c.data.seq_len for n, c in configs.items())
    store_root = prepare_data(args, max_train_bytes=int(1.05 * need))
    from blt_jax.evaluate import unigram_bpb  # noqa: PLC0415

    report["ladder_unigram_bpb"] = unigram_bpb(store_root)
    rows = report.setdefault("ladder", [])
    deadline = clock.end - (0 if args.no_generation else 0.25 * (clock.end - clock.start))
    mfu = report.get("mfu", {})
    # throughput for planning: the 1B step's measured rate (smaller models run less efficiently: 0.6x) until
    # a ladder point has measured its own
    rate = 0.6 * mfu.get("model_flops_per_second", 1e9 if args.smoke else 2e14)
    compile_s = 1.5 * mfu.get("compile_seconds", 30.0)
    order = [(n, 0) for n in points]
    if not args.no_blt_d:  # the smallest point's BLT-D-8 twin comes second: it gives generation its BLT-D rows
        order.insert(1, (order[0][0], 8))
    if args.smoke and not args.no_blt_d:  # the twin alone (the same code path; it also decodes as a BLT)
        order = [(order[0][0], 8)]
    for name, block in order:
        label = name if not block else f"{name}-d{block}"
        cfg = ladder_config(args, name, store_root, block)
        planned = points[name].budget_flops
        budget, note = plan_point(planned, rate, compile_s, clock.left(deadline))
        if budget == 0.0 or _deadline_hit.is_set():
            rows.append({"name": label, "planned_flops": planned, "note": note or "skipped: the deadline passed"})
            print(f"ladder {label}: {rows[-1]['note']}", flush=True)
            write()
            continue
        try:
            row = train_point(args, clock, label, cfg, budget, planned, note, deadline)
        except Exception as e:  # noqa: BLE001 (an out-of-memory point must not cost the rest of the run)
            rows.append({"name": label, "planned_flops": planned, "note": f"failed: {error_line(e)}"})
            print(f"ladder {label}: failed: {error_line(e)}", flush=True)
            write()
            continue
        rows.append(row)
        if row["bytes_per_second"]:  # the next point plans with this point's measured rate
            rate = 0.8 * row["bytes_per_second"] * row["train_flops_per_byte"]
        print(f"ladder {label}: {row['train_flops']:.3g} FLOPs, held-out {row['heldout_bpb']:.4f} bpb "
              f"({row['seconds']:.0f} s){' - ' + row['note'] if row['note'] else ''}", flush=True)
        write()


# ---- (3) generation --------------------------------------------------------------------------------------

def generation_phase(args, clock: Clock, report: dict, write) -> None:
    from generation_ladder import add_relative, blt_d_rows, heldout_prompts, measure  # noqa: PLC0415

    from blt_jax.generation import api  # noqa: PLC0415

    trained = [r for r in report.get("ladder", []) if "heldout_bpb" in r]
    blt = max((r for r in trained if not r["block_size"]), key=lambda r: r["train_flops"], default=None)
    blt_d = max((r for r in trained if r["block_size"]), key=lambda r: r["train_flops"], default=None)
    sections = report.setdefault("generation", {})
    batches = [1] if args.smoke else [1, 8]
    new_bytes = 16 if args.smoke else 128
    blt_settings = [("ar", dict(method="ar")), ("s k=8", dict(method="s", draft_len=8))]
    if not args.smoke:
        blt_settings += [("s k=4", dict(method="s", draft_len=4)), ("s k=16", dict(method="s", draft_len=16))]
    runs = [(blt, blt_settings)] if blt else []
    if blt_d:  # its AR, the paper's alpha 0.7 and one-step BLT-DV
        wanted = ("ar", f"d-{blt_d['block_size']} a=0.7", f"dv-{blt_d['block_size']} one-step")
        d_settings = [s for s in blt_d_rows(blt_d["block_size"]) if s[0] in wanted]
        if blt is None:  # --smoke's lone BLT-D also decodes as a BLT: AR and BLT-S, then BLT-D
            d_settings = blt_settings + [s for s in d_settings if s[0].startswith("d-")]
        runs.append((blt_d, d_settings))
    for row, settings in runs:
        model = api.load(row["run"])
        out = sections.setdefault(f"{row['name']} ({row['train_flops']:.2g} FLOPs)", [])
        last = 0.0
        for batch in batches:
            prompts = heldout_prompts(batch, 96)
            for name, kwargs in settings:
                if clock.left() < 1.5 * last or _deadline_hit.is_set():
                    out.append({"name": name, "batch": batch, "skipped": "out of time"})
                    continue
                t = time.time()
                try:
                    r = measure(model, name, kwargs, prompts, new_bytes, repeats=1 if args.smoke else 2)
                except Exception as e:  # noqa: BLE001 (one failing setting must not cost the rest of the run)
                    out.append({"name": name, "batch": batch, "skipped": f"failed: {error_line(e)}"})
                    print(f"generate {row['name']} b={batch} {name}: failed: {error_line(e)}", flush=True)
                    continue
                last = time.time() - t
                out.append(r)
                print(f"generate {row['name']} b={batch} {name}: {r['bytes_per_s']:,.0f} bytes/s, decoder calls/byte "
                      f"{r['decoder_nfe_per_byte']:.3f}, acceptance {r['acceptance']}", flush=True)
        add_relative([r for r in out if "skipped" not in r])
        write()


# ---- the report ------------------------------------------------------------------------------------------

def error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def fmt_pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def markdown(report: dict) -> str:
    env = report["env"]
    budget = "smoke test" if report["smoke"] else f"{report['minutes']} min budget"
    out = [f"# GPU run ({env['device']}, {budget})", ""]
    m = report.get("mfu")
    if report.get("mfu_error"):
        out += ["## Training-step MFU", "", f"failed: {report['mfu_error']}", ""]
    if m:
        out += ["## Training-step MFU", "",
                table(["model", "dtype", "batch x bytes", "step s", "model TFLOP/s", "bytes/s", "MFU (chip peak)",
                       "MFU (measured bf16 matmul)", "target"],
                      [[m["preset"], m["compute_dtype"], f"{m['batch']} x {m['seq_len']}", m["step_seconds_median"],
                        f"{m['model_flops_per_second'] / 1e12:.1f}", f"{m['bytes_per_second']:,.0f}",
                        fmt_pct(m["mfu_vs_chip_peak"]), fmt_pct(m["mfu_vs_bf16_matmul_peak"]),
                        fmt_pct(m["target_mfu"])]]), ""]
    if report.get("ladder"):
        out += ["## Scaling ladder", "", f"unigram baseline {report['ladder_unigram_bpb']:.3f} bits/byte", "",
                table(["run", "non-emb. params", "planned FLOPs", "trained FLOPs", "steps", "held-out bpb", "bytes/s",
                       "s", "note"],
                      [[r["name"], f"{r['params_non_embedding'] / 1e6:.2f}M" if "params_non_embedding" in r else None,
                        f"{r['planned_flops']:.2g}", f"{r['train_flops']:.3g}" if "train_flops" in r else None,
                        f"{r['steps_done']}/{r['steps']}" if "steps" in r else None, r.get("heldout_bpb"),
                        None if r.get("bytes_per_second") is None else f"{r['bytes_per_second']:,.0f}",
                        None if "seconds" not in r else f"{r['seconds']:.0f}", r.get("note") or ""]
                       for r in report["ladder"]]), ""]
    for title, rows in report.get("generation", {}).items():
        done = [r for r in rows if "skipped" not in r]
        out += [f"## Generation: {title}", "",
                table(["method", "batch", "bytes/s", "x ar", "decoder NFE/byte", "global NFE/byte", "acceptance",
                       "Eq.8 GB/seq"],
                      [[r["name"], r["batch"], f"{r['bytes_per_s']:,.0f}", r.get("speed_vs_ar"),
                        r["decoder_nfe_per_byte"], r["global_nfe_per_byte"], r["acceptance"],
                        None if r["eq8_gb_per_seq"] is None else f"{r['eq8_gb_per_seq']:.4f}"] for r in done]), ""]
        skipped = [f"{r['name']} (batch {r['batch']}): {r['skipped']}" for r in rows if "skipped" in r]
        if skipped:
            out += ["Not run: " + "; ".join(skipped) + ".", ""]
    out.append(f"wall time {report.get('seconds', 0):.0f} s; jax {env['jax']}; blt_jax {env.get('blt_jax')}")
    return "\n".join(out) + "\n"


def plot(report: dict):
    rows = [r for r in report.get("ladder", []) if "heldout_bpb" in r]
    if not rows:
        return None
    plt = figure()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for d in sorted({r["block_size"] for r in rows}):
        pts = sorted((r["train_flops"], r["heldout_bpb"]) for r in rows if r["block_size"] == d)
        ax.plot(*zip(*pts, strict=True), marker="o", label="BLT" if not d else f"BLT-D-{d}")
    ax.axhline(report["ladder_unigram_bpb"], color="grey", linestyle=":", label="unigram")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (analytic)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(f"GPU ladder ({report['env']['device']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=9.0, help="the whole run's time budget")
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU: every phase, end to end")
    p.add_argument("--out", type=Path, help="results folder (default experiments/results; --smoke: runs/gpu_smoke)")
    p.add_argument("--name", default="gpu_run", help="results file name: <out>/<name>.{md,json,png}")
    p.add_argument("--workdir", type=Path, help="runs and data (default runs/gpu; --smoke: runs/gpu_smoke)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing <out>/<name>.json")
    p.add_argument("--mfu-batch", type=int, default=4, help="8192-byte windows per MFU step (halved on OOM)")
    p.add_argument("--mfu-steps", type=int, default=8)
    p.add_argument("--ladder", nargs="+", help="ladder points (default: all of sizes.GPU_LADDER)")
    p.add_argument("--no-blt-d", action="store_true", help="no BLT-D-8 twin of the smallest ladder point")
    p.add_argument("--no-mfu", action="store_true")
    p.add_argument("--no-generation", action="store_true")
    args = p.parse_args(argv)
    args.out = args.out or (Path("runs/gpu_smoke") if args.smoke else RESULTS)
    args.workdir = args.workdir or Path("runs/gpu_smoke" if args.smoke else "runs/gpu")
    known = SMOKE_LADDER if args.smoke else sizes.GPU_LADDER
    if args.ladder and set(args.ladder) - set(known):
        p.error(f"--ladder: unknown points {sorted(set(args.ladder) - set(known))}; choose from {sorted(known)}")
    if (args.out / f"{args.name}.json").exists() and not args.overwrite:
        p.error(f"{args.out / (args.name + '.json')} exists; pass --overwrite to replace it (or another --name)")
    signal.signal(signal.SIGTERM, _on_sigterm)
    clock = Clock(args.minutes, reserve_s=5 if args.smoke else 20)
    report = {"env": environment(), "smoke": args.smoke, "minutes": args.minutes, "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}

    def write():
        report["seconds"] = time.time() - clock.start
        write_results(args.name, markdown(report), report, plot(report), out_dir=args.out)

    print(f"gpu_run on {report['env']['device']} ({jax.default_backend()}), budget {args.minutes} min", flush=True)
    if not args.no_mfu:
        mfu_phase(args, report)
        write()
    ladder_phase(args, clock, report, write)
    if not args.no_generation:
        generation_phase(args, clock, report, write)
    write()
    print(markdown(report))
    print(f"results: {args.out / args.name}.{{md,json,png}} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
