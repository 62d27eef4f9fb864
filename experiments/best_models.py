"""The best small models this CPU trains for generation: a BLT and BLT-D-8 (then BLT-D-4 and -16) of one
shape and schedule (`sizes.BEST`), on the scaling study's data store and entropy model.

    python experiments/best_models.py                      # BLT, then BLT-D-8 (~40 + ~90 min on an idle 2-vCPU VM)
    python experiments/best_models.py --models d-4 d-16    # the other block sizes
    python experiments/best_models.py --report             # rebuild the results from finished runs, no training

Runs go to `<workdir>/<model>/run` (default runs/best/blt/run, runs/best/d-8/run, ...): load them with
`blt generate --checkpoint runs/best/blt/run ...` or `api.load`. Each is resumable: rerunning the same
command continues a run from its last checkpoint (every 100 steps); SIGINT/SIGTERM save one first, and
SIGSTOP/SIGCONT pause it. A finished run keeps its held-out result next to it (`result.json`) and is never
trained again. The store and entropy model are `<store-workdir>/data` and `<store-workdir>/entropy`
(experiments/scaling.py prepares them; this script does too if they are missing).

Writes experiments/results/best_models.{md,json}: held-out bits per byte of each finished model over the
whole held-out split (BLT-D scored as a causal decoder) next to the unigram baseline, and the progress of
unfinished ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import sizes
from common import (DEFAULT_WORKDIR, cached_run, ensure_store, environment, library_version, median_train_rate, table,
                    write_results)

from blt_jax import flops
from blt_jax.data import store
from blt_jax.model import param_counts

DEFAULT_BEST_WORKDIR = "runs/best"
LABELS = {"blt": "BLT", "d-4": "BLT-D-4", "d-8": "BLT-D-8", "d-16": "BLT-D-16"}


def run_path(workdir: str | Path, name: str) -> Path:
    return Path(workdir) / name / "run"


def command(name: str) -> str:
    """The command that trains (or resumes) one model."""
    return f"python experiments/best_models.py --models {name}"


def train_one(name: str, workdir: Path, store_root: str, entropy_run: str) -> dict:
    from blt_jax.train.loop import train  # noqa: PLC0415

    cfg = sizes.best_config(name, store_root)
    run = run_path(workdir, name)
    t = time.time()

    def fit():
        summary = train("blt", cfg, run, entropy_run=entropy_run, progress=False)
        if summary["interrupted"]:
            sys.exit(f"{name}: interrupted at step {summary['step']}; the checkpoint is saved, rerun "
                     f"`{command(name)}` to resume")
        return {"heldout": summary["heldout"], "seconds": time.time() - t, "last_train": summary.get("last_train", {}),
                "blt_jax": library_version()}

    return cached_run(run.parent, cfg, fit)


def progress_of(run: Path) -> dict:
    """The last logged step of an unfinished run (metrics.jsonl), for the report."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return {}
    last = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == "train":
            last = rec
    return last


def row_for(name: str, workdir: Path, store_root: str) -> dict:
    cfg = sizes.best_config(name, store_root)
    counts = param_counts(cfg.model)
    fpb = flops.train_flops_per_byte(cfg.model, cfg.data.seq_len, cfg.model.patching.target_patch_length)
    train_bytes = cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len
    row = {"model": name, "label": LABELS[name], "run": str(run_path(workdir, name)), "command": command(name),
           "params_non_embedding": counts["encoder"] + counts["global"] + counts["decoder"],
           "params_hash": counts["hash_embeddings"], "steps": cfg.train.steps, "seq_len": cfg.data.seq_len,
           "batch": cfg.data.batch_size, "train_bytes": train_bytes, "train_flops": train_bytes * fpb,
           "finished": False}
    result_path = run_path(workdir, name).parent / "result.json"
    if result_path.exists():
        saved = json.loads(result_path.read_text())
        if saved["config"] != json.loads(cfg.to_json()):
            row["note"] = "the run directory holds another configuration"
            return row
        res = saved["result"]
        rate = median_train_rate(run_path(workdir, name))
        row.update(finished=True, heldout_bpb=res["heldout"]["bits_per_byte"],
                   mean_patch_length=res["heldout"].get("mean_patch_length"), last_session_seconds=res["seconds"],
                   bytes_per_second=rate, seconds=None if rate is None else train_bytes / rate,
                   blt_jax=res.get("blt_jax"), masked_accuracy=res["last_train"].get("masked_accuracy"))
    else:
        last = progress_of(run_path(workdir, name))
        row["progress_step"] = last.get("step", 0)
        row["train_bpb_last"] = last.get("bits_per_byte")
    return row


def status(row: dict) -> str:
    if row["finished"]:
        return "finished"
    if row.get("note"):
        return row["note"]
    return f"training: step {row['progress_step']} of {row['steps']}" if row["progress_step"] else "not started"


def report(names: list[str], workdir: Path, store_root: str, out_name: str) -> Path:
    from blt_jax.evaluate import unigram_bpb  # noqa: PLC0415

    unigram = unigram_bpb(store_root)
    rows = [row_for(n, workdir, store_root) for n in names]
    cfg = sizes.best_config(names[0], store_root)
    size = sizes.BEST[names[0]].size
    finished = [r for r in rows if r["finished"]]
    passes = rows[0]["train_bytes"] / store.read_manifest(store_root)["train"]["num_tokens"]
    md = [(f"# Best small models for generation\n\nOne shape for all: local models {size.local_dim} wide "
           f"({cfg.model.encoder.n_layers} encoder, {cfg.model.decoder.n_layers} decoder layers), global model "
           f"{size.global_layers} x {size.global_dim}, {cfg.data.seq_len}-byte windows of {cfg.data.batch_size}, "
           f"{cfg.train.steps} steps ({rows[0]['train_bytes'] / 1e6:.1f}M bytes, {passes:.2f} passes over the "
           "training split), entropy patches (the scaling study's entropy model). "
           f"Held-out bits per byte over the whole held-out split; unigram baseline **{unigram:.3f}**.\n"),
          table(["model", "non-emb. params", "train FLOPs", "held-out bpb", "patch len", "masked acc.", "hours",
                 "train B/s", "status", "command"],
                [[r["label"], f"{r['params_non_embedding'] / 1e6:.2f}M", f"{r['train_flops']:.3g}",
                  r.get("heldout_bpb"), r.get("mean_patch_length"), r.get("masked_accuracy"),
                  None if r.get("seconds") is None else f"{r['seconds'] / 3600:.2f}",
                  None if r.get("bytes_per_second") is None else f"{r['bytes_per_second']:.0f}",
                  status(r), f"`{r['command']}`"] for r in rows]),
          "",
          (f"{len(finished)} of {len(rows)} finished. Train B/s is the median over every logged interval of "
           f"every session of the run, on {environment()['device']} ({environment()['cpus']} CPUs) shared with "
           "other work; hours are the training bytes at that rate (compiles, evaluation and pauses excluded). "
           "BLT-D is scored as a causal decoder; its masked accuracy is the last training batch's (masked cells "
           "predicted exactly).")]
    return write_results(out_name, "\n".join(md) + "\n",
                         {"env": environment(), "unigram_bpb": unigram, "rows": rows,
                          "overrides": {n: sizes.BEST[n].overrides() for n in names}})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["blt", "d-8"], choices=list(sizes.BEST))
    p.add_argument("--workdir", default=DEFAULT_BEST_WORKDIR)
    p.add_argument("--store-workdir", default=DEFAULT_WORKDIR,
                   help="where the scaling study keeps its data store and entropy model")
    p.add_argument("--name", default="best_models", help="results file name under experiments/results/")
    p.add_argument("--report", action="store_true", help="rebuild the results from the runs; train nothing")
    args = p.parse_args()
    workdir = Path(args.workdir)
    listed = [n for n in sizes.BEST if n in args.models or (run_path(workdir, n).parent / "result.json").exists()
              or run_path(workdir, n).exists()]  # the report lists every model started so far
    if args.report:
        store_root = str(Path(args.store_workdir) / "data")
        if store.read_manifest(store_root).get("patching_threshold") is None:
            sys.exit(f"{store_root}: no calibrated entropies yet; run experiments/scaling.py first")
        print(report(listed, workdir, store_root, args.name).read_text())
        return
    store_root, entropy_run = ensure_store(sizes.study_config(next(iter(sizes.STUDY))), args.store_workdir)
    for name in args.models:
        report(listed, workdir, store_root, args.name)  # shows this run as in progress
        res = train_one(name, workdir, store_root, entropy_run)
        print(f"{LABELS[name]}: held-out {res['heldout']['bits_per_byte']:.4f} bits/byte "
              f"({res['seconds'] / 3600:.2f} h in this session)", flush=True)
    print(report(listed, workdir, store_root, args.name).read_text())


if __name__ == "__main__":
    main()
