"""`blt prepare` on a pretraining shard as corpora ship it: throughput (MB of text per second) and peak
memory (RSS) on generated `.jsonl.zst` files of two sizes. Peak memory must not grow with the input: the
reader streams records in chunks and the store is written shard by shard.

    python experiments/prepare_throughput.py                      # 128 MB, 512 MB and 1 GB of text
    python experiments/prepare_throughput.py --sizes-mb 64 512    # other sizes

Each size: a file of JSON Lines records (text cut from CPython's standard library, 200 B to 16 KB per
record, JSON-escaped), zstd level 3, generated once into the work folder; then `blt prepare --data FILE` in
a fresh process, timed from start to exit (interpreter and jax start-up included), its peak RSS read from
the kernel's accounting of that process (`wait4`). "read only" is the same file decoded and parsed by the
reader alone (no tokenising or writing), for where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zstandard
from common import RESULTS, environment, figure, table, write_results

from blt_jax.data import corpus, sources

MB = 1 << 20


def generate(path: Path, text_bytes: int, seed: int = 0) -> dict:
    """A .jsonl.zst of records holding `text_bytes` bytes of text (UTF-8), streamed to disk."""
    rng = np.random.default_rng(seed)
    pool = b"\n".join(f.read_bytes() for f in corpus.default_corpus_files()).decode("utf-8", errors="replace")
    done = records = 0
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
        lines = []
        while done < text_bytes:
            n = int(min(16384, max(200, rng.lognormal(7.5, 1.0))))
            start = int(rng.integers(0, len(pool) - n))
            text = pool[start:start + n]
            lines.append(json.dumps({"text": text, "id": records}))
            done += len(text.encode("utf-8"))
            records += 1
            if len(lines) >= 1000:
                out.write(("\n".join(lines) + "\n").encode())
                lines = []
        if lines:
            out.write(("\n".join(lines) + "\n").encode())
    tmp.rename(path)
    return {"text_bytes": done, "records": records}


def read_only(path: Path) -> float:
    """Seconds to decode and parse every record of `path` with the prepare reader, writing nothing."""
    f = sources.input_files([path], path.parent)[0]
    t = time.perf_counter()
    for _ in sources.records(f, "text", sources.BadRecords()):
        pass
    return time.perf_counter() - t


def run_prepare(path: Path, store: Path) -> dict:
    """`blt prepare` in a child process: wall seconds and that process's peak RSS."""
    if store.exists():
        shutil.rmtree(store)
    cmd = [sys.executable, "-m", "blt_jax", "prepare", "--preset", "tiny", "--data", str(path), "--store",
           str(store), "--heldout-fraction", "0.01", "--no-progress"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ,
                                                                                         "JAX_PLATFORMS": "cpu"})
    output = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"blt prepare failed:\n{output}")
    manifest = json.loads((store / "manifest.json").read_text())
    store_bytes = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    return {"wall_seconds": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "output": output.strip(),
            "tokens": manifest["train"]["num_tokens"] + manifest["heldout"]["num_tokens"],
            "docs": manifest["train"]["num_docs"] + manifest["heldout"]["num_docs"], "store_bytes": store_bytes}


def report(name: str, env: dict, load_before, load_after, rows: list[dict]) -> None:
    """experiments/results/<name>.{md,json,png} from the measured rows."""
    header = ["text (MB)", "file .jsonl.zst (MB)", "records", "wall (s)", "text MB/s", "read only MB/s",
              "peak RSS (MB)", "store (MB)"]
    body = [[r["text_mb"], r["file_mb"], f"{r['records']:,}", r["wall_seconds"], r["text_mb_per_s"],
             r["read_only_mb_per_s"], r["peak_rss_mb"], r["store_bytes"] / MB] for r in rows]
    rss = [r["peak_rss_mb"] for r in rows]
    md = "\n".join([
        "# `blt prepare` throughput and memory on `.jsonl.zst` shards", "",
        (f"One process, {env['cpus']} CPUs ({env['device']}), blt_jax {env['blt_jax']}, {env['date']}. "
         f"Load average before / after: {load_before[0]:.1f} / {load_after[0]:.1f} (other work shared the "
         "machine: the MB/s are lower bounds)."), "",
        table(header, body), "",
        (f"Peak RSS over input sizes from {rows[0]['text_mb']:.0f} to {rows[-1]['text_mb']:.0f} MB: "
         f"{min(rss):.0f} to {max(rss):.0f} MB (of which ~195 MB is the interpreter with jax and tensorstore "
         "loaded). Records are read in ~4 MB chunks and tokens written in whole 1M-token shards, at most two "
         "flushes of 4 shards in memory, so nothing held grows with the input."), "",
        ("Wall time is the whole `blt prepare` process, start-up included (interpreter and jax import: 2-3 s "
         "on an idle machine). \"read only\" decodes and parses the file with the same reader (zstd + the "
         "standard library's json), writing nothing; the rest of `blt prepare`'s time is the held-out split, "
         "tokenising, and compressing and writing 2 bytes of tokens per byte of text."),
    ])
    plt = figure()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    sizes = [r["text_mb"] for r in rows]
    ax1.plot(sizes, [r["text_mb_per_s"] for r in rows], "o-", label="blt prepare")
    ax1.plot(sizes, [r["read_only_mb_per_s"] for r in rows], "s--", label="read only")
    ax1.set_ylabel("MB of text / s")
    ax1.set_ylim(bottom=0)
    ax1.legend()
    ax2.plot(sizes, rss, "o-")
    ax2.set_ylabel("peak RSS (MB)")
    ax2.set_ylim(0, max(rss) * 1.15)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("input text (MB)")
        ax.minorticks_off()
        ax.set_xticks(sizes, [f"{s:.0f}" for s in sizes])
    fig.suptitle("blt prepare on .jsonl.zst")
    fig.tight_layout()
    data = {"environment": env, "load_average_before": load_before, "load_average_after": load_after,
            "rows": rows}
    print(write_results(name, md, data, fig))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[128, 512, 1024],
                   help="MB of text per generated file")
    p.add_argument("--workdir", default="runs/prepare_throughput")
    p.add_argument("--name", default="prepare_throughput")
    p.add_argument("--report-only", action="store_true", help="rewrite the md and png from the results' json")
    args = p.parse_args()
    if args.report_only:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        report(args.name, saved["environment"], saved["load_average_before"], saved["load_average_after"],
               saved["rows"])
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rows = []
    for size in args.sizes_mb:
        path = work / f"corpus-{size}mb.jsonl.zst"
        meta_path = path.with_suffix(".json")
        if not path.exists() or not meta_path.exists():
            print(f"generating {path} ({size} MB of text)", flush=True)
            meta_path.write_text(json.dumps(generate(path, size * MB, seed=size)))
        meta = json.loads(meta_path.read_text())
        print(f"reading {path}", flush=True)
        parse = read_only(path)
        print(f"preparing {path}", flush=True)
        run = run_prepare(path, work / f"store-{size}mb")
        shutil.rmtree(work / f"store-{size}mb")
        row = {"text_mb": meta["text_bytes"] / MB, "file_mb": path.stat().st_size / MB, "records": meta["records"],
               **run, "text_mb_per_s": meta["text_bytes"] / MB / run["wall_seconds"],
               "read_only_mb_per_s": meta["text_bytes"] / MB / parse, "peak_rss_mb": run["peak_rss_bytes"] / MB}
        assert row["docs"] == meta["records"], (row["docs"], meta["records"])
        print(json.dumps({k: v for k, v in row.items() if k != "output"}), flush=True)
        rows.append(row)
    report(args.name, environment(), load_before, os.getloadavg(), rows)


if __name__ == "__main__":
    main()
