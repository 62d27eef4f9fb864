"""The `blt` command line (also `python -m blt_jax`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from blt_jax.config import PRESETS, ConfigError, RunConfig, apply_overrides, get_preset


def _run_config(args) -> RunConfig:
    cfg = get_preset(args.preset)
    overrides = list(args.set or [])
    if getattr(args, "store", None):
        overrides.append(f"data.path={json.dumps(args.store)}")
    cfg = apply_overrides(cfg, overrides)
    objective, block_size = getattr(args, "objective", None), getattr(args, "block_size", None)
    if objective == "next-byte" and block_size is not None:
        raise ConfigError("--block-size: only the blt-d objective has blocks")
    if objective == "next-byte":
        block_size = 0
    elif objective == "blt-d" and block_size is None:
        block_size = cfg.model.diffusion.block_size or 4  # the config's blocks, else BLT-D-4
    if block_size is None:
        return cfg
    return apply_overrides(cfg, [f"model.diffusion.block_size={block_size}"])


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="quickstart", choices=sorted(PRESETS), help="named configuration")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.global_model.n_layers=4 (repeatable)")


def cmd_prepare(args) -> int:
    from blt_jax import prepare  # noqa: PLC0415

    cfg = _run_config(args)
    root = cfg.data.path
    if not args.entropy_run or args.data or not _has_tokens(root):
        t = time.time()
        m = prepare.prepare_corpus(root, args.data, args.heldout_fraction, args.max_train_bytes)
        print(f"prepared {root}: train {m['train']['num_docs']} docs / {m['train']['num_tokens']:,} tokens, "
              f"heldout {m['heldout']['num_docs']} docs / {m['heldout']['num_tokens']:,} tokens "
              f"({time.time() - t:.1f}s)")
    if args.entropy_run:
        t = time.time()
        prepare.add_entropies(root, args.entropy_run, progress=not args.no_progress)
        print(f"entropies written ({time.time() - t:.1f}s)")
        thr, achieved = prepare.calibrate(root, cfg.model.patching, cfg.data.seq_len)
        print(f"calibrated threshold {thr:.4f} nats -> mean patch length {achieved:.2f} bytes on held-out")
    return 0


def _has_tokens(root: str) -> bool:
    from blt_jax.data import store  # noqa: PLC0415

    try:
        store.read_manifest(root)
        return True
    except (FileNotFoundError, ValueError, OSError):
        return False


def cmd_calibrate(args) -> int:
    from blt_jax import prepare  # noqa: PLC0415

    cfg = _run_config(args)
    thr, achieved = prepare.calibrate(cfg.data.path, cfg.model.patching, cfg.data.seq_len, args.target)
    print(json.dumps({"threshold": thr, "mean_patch_length": achieved}))
    return 0


def cmd_train(args) -> int:
    from blt_jax.train.loop import train  # noqa: PLC0415

    from blt_jax.model import param_counts  # noqa: PLC0415

    cfg = _run_config(args)
    counts = param_counts(cfg.model.entropy_model if args.what == "entropy" else cfg.model)
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()), flush=True)
    summary = train(args.what, cfg, args.run, entropy_run=args.entropy_run, progress=not args.no_progress,
                    stop_after=args.stop_after)
    print(json.dumps(summary, indent=2, default=float))
    return 0


EVAL_TASKS = ("heldout", "bpb", "mc-next-line", "mc-gettext", "translate", "humaneval", "continuation")


def _print_result(result: dict, compact: bool) -> None:
    print(json.dumps(result, default=float) if compact else json.dumps(result, indent=2, default=float))


def cmd_eval(args) -> int:
    if args.task == "heldout":
        from blt_jax.evaluate import heldout_bpb, unigram_bpb  # noqa: PLC0415
        from blt_jax.train.checkpoint import load_run_config  # noqa: PLC0415

        result = heldout_bpb(args.checkpoint, args.store, args.split, args.batches)
        data_root = args.store or load_run_config(args.checkpoint)[1].data.path
        result["unigram_bits_per_byte"] = unigram_bpb(data_root, args.split)
        _print_result(result, args.json)
        return 0

    from blt_jax.generation import api  # noqa: PLC0415
    from blt_jax.tasks import translation  # noqa: PLC0415

    if args.task in ("translate", "mc-gettext"):
        try:  # before loading the model: a machine without catalogs skips at once
            translation.catalog_files(args.lang)
        except translation.NoCatalogs as e:
            return _skip(args, str(e))
    gen = dict(method=args.method,
               sampling=api.SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p),
               draft_len=args.draft_len, block_size=args.block_size)
    model = api.load(args.checkpoint)
    try:
        result = _run_task(args, model, gen)
    except translation.NoCatalogs as e:
        return _skip(args, str(e))
    if not args.json:
        result.pop("predictions", None)
        result.pop("results", None)
    _print_result(result, args.json)
    return 0


def _skip(args, why: str) -> int:
    print(f"blt eval: skipped: {why}", file=sys.stderr)
    _print_result({"task": args.task, "skipped": why}, args.json)
    return 0


def _run_task(args, model, gen: dict) -> dict:
    from blt_jax.tasks import code, continuation, multiple_choice, scoring, translation  # noqa: PLC0415

    n = args.items
    if args.task == "bpb":
        from blt_jax.train.checkpoint import load_run_config  # noqa: PLC0415

        window = args.window or load_run_config(args.checkpoint)[1].data.seq_len
        files = args.files or [str(f) for f in multiple_choice.heldout_files()]
        result = scoring.bits_per_byte(model, files, window=window, batch_size=args.batch_size)
        return {"task": "bpb", "corpus": "files" if args.files else "embedded held-out split", **result}
    if args.task in ("mc-next-line", "mc-gettext"):
        items = (multiple_choice.heldout_next_line_items(n or 100, args.seed) if args.task == "mc-next-line"
                 else multiple_choice.gettext_choice_items(args.lang, n or 100, args.seed))
        return {"task": args.task, **multiple_choice.evaluate(model, items, args.batch_size)}
    if args.task == "translate":
        return translation.evaluate(model, args.lang, n_items=n or 50, n_shots=args.shots, seed=args.seed,
                                    max_new_bytes=args.max_new_bytes or 96, batch_size=args.batch_size, **gen)
    if args.task == "humaneval":
        ks = tuple(int(k) for k in args.k.split(","))
        return code.evaluate(model, limit=n, n_samples=args.samples, max_new_bytes=args.max_new_bytes or 256,
                             ks=ks, timeout=args.timeout, workers=args.workers, batch_size=args.batch_size,
                             seed=args.seed, **gen)
    return continuation.evaluate(model, n or 50, args.prompt_bytes, args.target_bytes, seed=args.seed,
                                 batch_size=args.batch_size, **gen)


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompts or [])
    if args.file:
        text = Path(args.file).read_text(encoding="utf-8")
        prompts += [line for line in text.split("\n") if line] if args.one_per_line else [text]
    if args.stdin or (not prompts and not sys.stdin.isatty()):
        text = sys.stdin.read()
        prompts += [line for line in text.split("\n") if line] if args.one_per_line else [text]
    return prompts


def cmd_generate(args) -> int:
    from blt_jax.generation import api  # noqa: PLC0415

    prompts = _read_prompts(args)
    model = api.load(args.checkpoint)
    if args.sharded:
        from blt_jax import sharding  # noqa: PLC0415
        from blt_jax.train.checkpoint import load_run_config  # noqa: PLC0415

        mesh_cfg = load_run_config(args.checkpoint)[1].mesh
        model = api.on_mesh(model, sharding.make_mesh(mesh_cfg), mesh_cfg)
    kwargs = dict(max_new_bytes=args.max_new_bytes, method=args.method, seed=args.seed,
                  sampling=api.SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p),
                  stop_at_eos=not args.no_eos_stop, draft_len=args.draft_len, block_size=args.block_size,
                  unmask=api.UnmaskConfig(rule=args.unmask, alpha=args.alpha, gamma=args.gamma))
    if args.stream:
        if len(prompts) != 1 or args.json:
            raise ConfigError("--stream: give exactly one prompt, without --json")
        sys.stdout.write(prompts[0])
        for piece in api.stream(model, prompts[0], **kwargs):
            sys.stdout.write(piece.decode("utf-8", errors="replace"))
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for r in api.generate(model, prompts, **kwargs):
        if args.json:
            print(json.dumps(r.to_json()))
        else:
            print(r.prompt + r.text)
            print("-" * 40)
    return 0


def cmd_convert(args) -> int:
    from blt_jax import convert  # noqa: PLC0415

    if args.from_hf:
        cfg = convert.import_hf(args.src, args.dst)
        print(f"imported {args.src} -> {args.dst} (patching {cfg.patching.mode}, threshold {cfg.patching.threshold})")
    elif args.params_only:
        convert.export_params(args.src, args.dst)
        print(f"exported the parameters of {args.src} -> {args.dst} (for `blt generate` / `blt eval`)")
    else:
        convert.export_hf(args.src, args.dst)
        print(f"exported {args.src} -> {args.dst} (load with transformers' BltForCausalLM.from_pretrained)")
    return 0


def cmd_params(args) -> int:
    from blt_jax import flops  # noqa: PLC0415
    from blt_jax.model import param_counts  # noqa: PLC0415

    cfg = _run_config(args)
    counts = param_counts(cfg.model)
    for name, n in counts.items():
        print(f"{name:>16}: {n:>16,d}  ({n / 1e6:,.2f}M)")
    per_byte = flops.blt_forward_flops_per_byte(cfg.model, cfg.data.seq_len, cfg.model.patching.target_patch_length)
    print(f"forward FLOPs/byte at {cfg.data.seq_len}-byte windows, patches of "
          f"{cfg.model.patching.target_patch_length}: " + ", ".join(f"{k} {v:.3g}" for k, v in per_byte.items()))
    return 0


def cmd_quickstart(args) -> int:
    from blt_jax.quickstart import run_quickstart  # noqa: PLC0415

    cfg = _run_config(args)
    run_quickstart(cfg, Path(args.out), data=args.data, progress=not args.no_progress)
    return 0


def cmd_aot(args) -> int:
    import jax  # noqa: PLC0415

    if args.local_cpu_devices is not None:  # before jax starts its backends
        jax.config.update("jax_num_cpu_devices", args.local_cpu_devices)
    from blt_jax.aot import run_aot  # noqa: PLC0415

    report = run_aot(_run_config(args), topology=args.topology, num_slices=args.num_slices,
                     cpu_devices=args.local_cpu_devices)
    print(json.dumps(report, indent=2))
    return 0


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process", "TPU pods need none of these (jax finds the pod itself)")
    g.add_argument("--coordinator", help="host:port of process 0 (env BLT_COORDINATOR)")
    g.add_argument("--num-processes", type=int, help="processes in the job (env BLT_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, help="this process's index (env BLT_PROCESS_ID)")
    g.add_argument("--local-cpu-devices", type=int,
                   help="virtual CPU devices in this process (CPU-only runs; env BLT_LOCAL_CPU_DEVICES)")


def _start_distributed(args) -> None:
    from blt_jax import distributed  # noqa: PLC0415

    distributed.initialize(distributed.DistributedConfig.from_env(
        coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
        local_cpu_devices=args.local_cpu_devices))


def _add_objective_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--objective", choices=("next-byte", "blt-d"),
                   help="next-byte: plain BLT; blt-d: BLT plus the block masked-diffusion loss of Fast BLT "
                        "(default: the config's model.diffusion.block_size decides)")
    p.add_argument("--block-size", type=int, choices=(4, 8, 16),
                   help="BLT-D block size B (implies --objective blt-d; default: the config's, else 4)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blt", description="Byte Latent Transformer in JAX: train, evaluate, generate.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quickstart", help="prepare the embedded corpus, train the entropy model, calibrate "
                                          "patching, train a small BLT, evaluate and generate")
    _add_config_args(q)
    q.add_argument("--out", default="runs/quickstart", help="folder for the data store and both runs")
    q.add_argument("--data", nargs="+", help="your own text files/folders instead of the embedded corpus")
    q.add_argument("--no-progress", action="store_true")
    _add_objective_args(q)
    q.set_defaults(fn=cmd_quickstart)

    pr = sub.add_parser("prepare", help="tokenise a corpus into a tensorstore data store; with --entropy-run, "
                                        "precompute entropies and calibrate the patching threshold")
    _add_config_args(pr)
    pr.add_argument("--data", nargs="+", help="text files/folders to prepare (default: the embedded corpus)")
    pr.add_argument("--store", help="data store root, a local folder or tensorstore URL (sets data.path)")
    pr.add_argument("--heldout-fraction", type=float, default=0.02)
    pr.add_argument("--max-train-bytes", type=int, default=None)
    pr.add_argument("--entropy-run", help="a trained entropy-model run directory")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(fn=cmd_prepare)

    c = sub.add_parser("calibrate", help="calibrate the entropy threshold to a target mean patch length")
    _add_config_args(c)
    c.add_argument("--store", help="data store root (sets data.path)")
    c.add_argument("--target", type=float, default=None, help="bytes per patch (default: the config's)")
    c.set_defaults(fn=cmd_calibrate)

    t = sub.add_parser("train", help="train (or resume) the entropy model or a BLT")
    _add_config_args(t)
    t.add_argument("--what", choices=("blt", "entropy"), default="blt")
    t.add_argument("--run", required=True, help="run directory (resumes automatically if it holds checkpoints)")
    t.add_argument("--store", help="data store root, made by `blt prepare` (sets data.path)")
    t.add_argument("--entropy-run", help="entropy-model run (default: the one recorded in the data store)")
    _add_objective_args(t)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--stop-after", type=int, help="end at this step with a checkpoint, as a preemption would "
                                                  "(the schedule still targets train.steps; run again to resume)")
    _add_distributed_args(t)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run: held-out bits per byte (and a unigram baseline) by "
                                    "default, or a task: bpb on any files, multiple choice, translation, "
                                    "HumanEval, continuation")
    e.add_argument("--checkpoint", required=True, help="run directory")
    e.add_argument("--task", default="heldout", choices=EVAL_TASKS,
                   help="heldout: bits/byte on the run's data store split + unigram baseline; bpb: bits/byte "
                        "of --files (default: the embedded held-out files) in windows; mc-next-line / "
                        "mc-gettext: multiple choice by likelihood; translate: few-shot English -> --lang on "
                        "the machine's gettext catalogs (BLEU, chrF); humaneval: pass@k; continuation: "
                        "continue held-out text (exact match, prefix, chrF)")
    e.add_argument("--store", help="heldout: data store root (default: the run's)")
    e.add_argument("--split", default="heldout", choices=("heldout", "train"), help="heldout: the split")
    e.add_argument("--batches", type=int, default=None, help="heldout: eval batches")
    e.add_argument("--files", nargs="+", help="bpb: files/folders to score")
    e.add_argument("--window", type=int, help="bpb: bytes per window, each scored from BOS (default: the "
                                              "run's training sequence length)")
    e.add_argument("--items", type=int, help="items (default: 100 multiple choice, 50 translate/continuation, "
                                             "all 164 HumanEval problems)")
    e.add_argument("--lang", default="de", help="translate / mc-gettext: target language (a /usr/share/locale "
                                                "folder name: de, fr, ...)")
    e.add_argument("--shots", type=int, default=3, help="translate: examples in the prompt")
    e.add_argument("--samples", type=int, default=1, help="humaneval: completions per problem")
    e.add_argument("--k", default="1,10,100", help="humaneval: comma-separated k of pass@k (k <= --samples)")
    e.add_argument("--timeout", type=float, default=3.0, help="humaneval: seconds per test run")
    e.add_argument("--workers", type=int, default=2, help="humaneval: parallel test runs")
    e.add_argument("--prompt-bytes", type=int, default=128, help="continuation: prompt length")
    e.add_argument("--target-bytes", type=int, default=32, help="continuation: bytes to continue")
    e.add_argument("--max-new-bytes", type=int, help="generation budget (default: 96 translate, 256 humaneval)")
    e.add_argument("--method", default="ar", choices=("ar", "ar-nocache", "s", "d", "dv"),
                   help="generation method (see `blt generate`)")
    e.add_argument("--draft-len", type=int, default=8)
    e.add_argument("--block-size", type=int)
    e.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    e.add_argument("--top-k", type=int, default=0)
    e.add_argument("--top-p", type=float, default=1.0)
    e.add_argument("--seed", type=int, default=0, help="item selection and sampling")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--json", action="store_true", help="one compact JSON line, with per-item details")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="generate text from a BLT run")
    g.add_argument("--checkpoint", required=True, help="BLT run directory")
    g.add_argument("prompts", nargs="*", help="prompt strings")
    g.add_argument("--file", help="read prompts from a file")
    g.add_argument("--stdin", action="store_true", help="read prompts from standard input")
    g.add_argument("--one-per-line", action="store_true", help="each line of --file/--stdin is a prompt")
    g.add_argument("--max-new-bytes", type=int, default=128)
    g.add_argument("--method", default="ar", choices=("ar", "ar-nocache", "s", "d", "dv"),
                   help="ar: cached autoregressive; ar-nocache: a full forward per byte; s: BLT-S speculative "
                        "(any BLT); d: BLT-D block diffusion; dv: BLT-D draft + autoregressive verify "
                        "(d and dv need a model trained with --objective blt-d)")
    g.add_argument("--draft-len", type=int, default=8, help="BLT-S: bytes drafted per round (k)")
    g.add_argument("--block-size", type=int, help="BLT-D/DV: block size B (default: the model's)")
    g.add_argument("--unmask", default="confidence", choices=("confidence", "entropy", "one_step"),
                   help="BLT-D/DV unmasking rule")
    g.add_argument("--alpha", type=float, default=0.7, help="confidence rule: commit cells with p > alpha")
    g.add_argument("--gamma", type=float, default=1.0, help="entropy rule: cumulative entropy bound")
    g.add_argument("--stream", action="store_true", help="print bytes as they are generated (one prompt)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-eos-stop", action="store_true", help="always generate max-new-bytes bytes")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    g.add_argument("--sharded", action="store_true",
                   help="split parameters over all local devices by the run's mesh config, and the prompt batch "
                        "(and every cache) over its batch axes")
    g.set_defaults(fn=cmd_generate)

    cv = sub.add_parser("convert", help="import a transformers Blt checkpoint, or export a run to one")
    direction = cv.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", action="store_true", help="SRC is a transformers save_pretrained folder")
    direction.add_argument("--to-hf", action="store_true", help="SRC is a blt_jax BLT run directory")
    direction.add_argument("--params-only", action="store_true",
                           help="SRC is a BLT run: write its parameters alone (no optimizer state) to DST")
    cv.add_argument("src")
    cv.add_argument("dst")
    cv.set_defaults(fn=cmd_convert)

    a = sub.add_parser("aot", help="compile the train step ahead of time for a target topology and report "
                                   "per-device memory (does the config fit?)")
    _add_config_args(a)
    _add_objective_args(a)
    a.add_argument("--topology", help="a TPU accelerator type, e.g. v5p-256, v6e-256 (needs libtpu: "
                                      "pip install 'jax[tpu]'); default: this machine's devices")
    a.add_argument("--num-slices", type=int, default=1, help="TPU slices (multi-slice; set mesh.dcn_parallelism)")
    a.add_argument("--local-cpu-devices", type=int, help="compile for this many virtual CPU devices instead")
    a.set_defaults(fn=cmd_aot)

    pa = sub.add_parser("params", help="parameter counts per component and FLOPs per byte of a preset")
    _add_config_args(pa)
    pa.set_defaults(fn=cmd_params)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "coordinator"):  # before any other jax call
            _start_distributed(args)
        return args.fn(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if os.environ.get("BLT_DEBUG"):
            raise
        print(f"blt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
