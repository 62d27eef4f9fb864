"""The `blt` command line (also `python -m blt_jax`).

Each subcommand has a `cmd_<name>` that runs it and a `_<name>_parser` that declares its options; options
several subcommands share are declared once (`_add_config_args`, `_add_generation_args`, ...). Bad input is
refused with one line, `blt <cmd>: error: ...`, and the exit statuses are those of `blt_jax.exit_codes`.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import logging
import math
import os
import sys
import time
import typing
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

from blt_jax import exit_codes
from blt_jax.config import ConfigError, RunConfig, apply_overrides
from blt_jax.generation import constants
from blt_jax.presets import PRESETS, get_preset

# ---- option values -----------------------------------------------------------------------------------------


def finite_float(text: str) -> float:
    """A float option's value: any finite number (nan and inf would silently produce garbage)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a time limit), refused while the options are parsed, before any work."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A count: >= 1 (0 is refused, never taken to mean "the default": leave the option out for that)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (leave the option out for its default), got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def port_number(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 0-65535 (0: any free one), got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


class _DeferredChoices:
    """An option's choices read from a module that loads JAX, only when a command line uses the option or
    shows its help (`blt --help` and `blt params` never import it); the module's own list, so the two cannot
    drift. Give the option a metavar: without one, argparse lists (reads) the choices as it adds the option."""

    def __init__(self, read: Callable[[], Sequence[str]]):
        self._read = read

    def __iter__(self):
        return iter(self._read())

    def __contains__(self, value) -> bool:
        return value in self._read()


def _generation_methods() -> Sequence[str]:
    from blt_jax.generation import api  # noqa: PLC0415

    return api.METHODS


def _unmask_rules() -> Sequence[str]:
    from blt_jax.generation import api  # noqa: PLC0415

    return typing.get_args(typing.get_type_hints(api.UnmaskConfig)["rule"])


def _objectives() -> Sequence[str]:
    from blt_jax.objectives import BLT_OBJECTIVES  # noqa: PLC0415

    return BLT_OBJECTIVES


def _kinds() -> Sequence[str]:
    from blt_jax.train.loop import KINDS  # noqa: PLC0415

    return KINDS


# ---- shared option groups ----------------------------------------------------------------------------------

def _run_config(args) -> RunConfig:
    cfg = get_preset(args.preset)
    overrides = list(args.set or [])
    if getattr(args, "store", None):
        overrides.append(f"data.path={json.dumps(args.store)}")
    cfg = apply_overrides(cfg, overrides)
    objective, block_size = getattr(args, "objective", None), getattr(args, "block_size", None)
    if objective == "next-byte" and block_size is not None:
        raise ValueError("--block-size: only the blt-d objective has blocks")
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


def _add_objective_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--objective", choices=_DeferredChoices(_objectives), metavar="OBJECTIVE",
                   help="next-byte: plain BLT; blt-d: BLT plus the block masked-diffusion loss of Fast BLT "
                        "(default: the config's model.diffusion.block_size decides)")
    p.add_argument("--block-size", type=int, choices=(4, 8, 16),
                   help="BLT-D block size B (implies --objective blt-d; default: the config's, else 4)")


# Defaults of the generation options (and --seed) that some settings do not read: the generation code's own
# (generation/constants.py, which loads no JAX). The options themselves default to None, and these fill in after
# the checks below, so a value given on the command line is told apart from one left out
# (`--method ar --alpha 0.7` is refused too, not only `--alpha 0.5`).
GENERATION_DEFAULTS = {"draft_len": constants.DRAFT_LEN, "unmask": constants.UNMASK_RULE, "alpha": constants.ALPHA,
                       "gamma": constants.GAMMA, "temperature": constants.TEMPERATURE, "top_k": constants.TOP_K,
                       "top_p": constants.TOP_P, "seed": constants.SEED}
# The options only some methods read: dest -> (those methods, the --unmask rule that reads it (None: any), what
# it is for). Given with another method or rule it would be ignored, so it is refused.
METHOD_OPTIONS = {
    "draft_len": (("s",), None, "speculative drafting"),
    "block_size": (("d", "dv"), None, "block diffusion"),
    "unmask": (("d", "dv"), None, "block diffusion"),
    "alpha": (("d", "dv"), "confidence", "confidence unmasking"),
    "gamma": (("d", "dv"), "entropy", "entropy unmasking"),
}
SAMPLING_OPTIONS = ("top_k", "top_p")  # read only when --temperature > 0 (--seed too, where it draws nothing else)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    """How text is generated: one declaration for `blt generate` and the generating `blt eval` tasks."""
    d = GENERATION_DEFAULTS
    g = p.add_argument_group("generation")
    g.add_argument("--method", default="ar", choices=_DeferredChoices(_generation_methods), metavar="METHOD",
                   help="ar: cached autoregressive; ar-nocache: a full forward per byte; s: BLT-S speculative "
                        "(any BLT); d: BLT-D block diffusion; dv: BLT-D draft + autoregressive verify "
                        "(d and dv need a model trained with --objective blt-d)")
    g.add_argument("--draft-len", type=positive_int,
                   help=f"BLT-S: bytes drafted per round (k; default {d['draft_len']})")
    g.add_argument("--block-size", type=positive_int,
                   help="BLT-D/DV: block size B, at most the model's trained one (default)")
    g.add_argument("--unmask", choices=_DeferredChoices(_unmask_rules), metavar="RULE",
                   help=f"BLT-D/DV unmasking rule: %(choices)s (default {d['unmask']})")
    g.add_argument("--alpha", type=finite_float,
                   help=f"confidence rule: commit cells with p > alpha (default {d['alpha']})")
    g.add_argument("--gamma", type=finite_float, help=f"entropy rule: cumulative entropy bound (default {d['gamma']})")
    g.add_argument("--temperature", type=finite_float, help="0 (the default): greedy")
    g.add_argument("--top-k", type=non_negative_int, help="sampling (--temperature > 0): 0 (the default): off")
    g.add_argument("--top-p", type=finite_float, help="sampling (--temperature > 0): 1 (the default): off")
    g.add_argument("--no-eos-stop", action="store_true", help="always generate the whole byte budget")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights and caches during generation (bfloat16 halves the bytes a step reads)")


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _generation_value(args, dest: str):
    value = getattr(args, dest)
    return GENERATION_DEFAULTS.get(dest) if value is None else value


def _refuse_unread_generation_options(args, *, method_fixed: bool = True, sampling_fixed: bool = True,
                                      seed_samples_only: bool = False) -> None:
    """Refuse a generation option given on the command line that the chosen method, unmasking rule or
    temperature never reads. `method_fixed` False (`blt serve`: a request names its method) checks only the
    unmasking rule; `sampling_fixed` False (a request or record may set its own temperature) skips top-k/p;
    `seed_samples_only` (--seed draws nothing but samples) checks --seed with them."""
    rule = _generation_value(args, "unmask")
    for dest, (methods, rule_reads, what) in METHOD_OPTIONS.items():
        if getattr(args, dest) is None:
            continue
        if method_fixed and args.method not in methods:
            raise ValueError(f"{_option(dest)} is an option of --method {'/'.join(methods)} ({what}); "
                             f"--method {args.method} does not read it")
        if rule_reads is not None and rule != rule_reads:
            raise ValueError(f"{_option(dest)} is an option of --unmask {rule_reads}; --unmask {rule} does not "
                             "read it")
    sampling = SAMPLING_OPTIONS + (("seed",) if seed_samples_only else ())
    given = [_option(dest) for dest in sampling if getattr(args, dest) is not None]
    if sampling_fixed and given and _generation_value(args, "temperature") == 0:
        them = "it" if len(given) == 1 else "them"
        raise ValueError(f"{' and '.join(given)}: only sampling reads {them}, but --temperature is 0 (greedy: the "
                         f"likeliest byte, always); set --temperature > 0 or drop {them}")


def _generation_kwargs(args) -> dict:
    """The options of `_add_generation_args` as `api.generate` keyword arguments (defaults filled in)."""
    from blt_jax.generation import api  # noqa: PLC0415

    v = lambda dest: _generation_value(args, dest)  # noqa: E731
    return dict(method=args.method, draft_len=v("draft_len"), block_size=args.block_size,
                sampling=api.SamplingConfig(temperature=v("temperature"), top_k=v("top_k"), top_p=v("top_p")),
                unmask=api.UnmaskConfig(rule=v("unmask"), alpha=v("alpha"), gamma=v("gamma")),
                stop_at_eos=not args.no_eos_stop)


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process", "TPU pods need none of these (jax finds the pod itself)")
    g.add_argument("--coordinator", help="host:port of process 0 (env BLT_COORDINATOR)")
    g.add_argument("--num-processes", type=positive_int, help="processes in the job (env BLT_NUM_PROCESSES)")
    g.add_argument("--process-id", type=non_negative_int, help="this process's index (env BLT_PROCESS_ID)")
    g.add_argument("--local-cpu-devices", type=positive_int,
                   help="virtual CPU devices in this process (CPU-only runs; env BLT_LOCAL_CPU_DEVICES)")


def _start_distributed(args) -> None:
    from blt_jax import distributed  # noqa: PLC0415

    distributed.initialize(distributed.DistributedConfig.from_env(
        coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
        local_cpu_devices=args.local_cpu_devices))


def _print_result(result: dict, compact: bool) -> None:
    print(json.dumps(result, default=float) if compact else json.dumps(result, indent=2, default=float))


# ---- quickstart --------------------------------------------------------------------------------------------

def cmd_quickstart(args) -> int:
    from blt_jax.quickstart import run_quickstart  # noqa: PLC0415

    cfg = _run_config(args)
    report = run_quickstart(cfg, Path(args.out), data=args.data, progress=not args.no_progress)
    return exit_codes.INTERRUPTED if report.get("interrupted") else exit_codes.OK


def _quickstart_parser(sub) -> None:
    q = sub.add_parser("quickstart", help="prepare the embedded corpus, train the entropy model, calibrate "
                                          "patching, train a small BLT, evaluate and generate")
    _add_config_args(q)
    q.add_argument("--out", default="runs/quickstart", help="folder for the data store and both runs")
    q.add_argument("--data", nargs="+", help="your own text files/folders instead of the embedded corpus")
    q.add_argument("--no-progress", action="store_true")
    _add_objective_args(q)
    q.set_defaults(fn=cmd_quickstart)


# ---- prepare, calibrate ------------------------------------------------------------------------------------

def cmd_prepare(args) -> int:
    """Stopped by SIGINT/SIGTERM: the same command again finishes the job (entropies resume where they stopped;
    tokenising starts over, since the manifest is written last)."""
    with sigterm_as_interrupt():
        try:
            return _prepare(args)
        except KeyboardInterrupt:
            print("blt prepare: stopped; run the same command again to finish (the entropies written so far are "
                  "kept)", file=sys.stderr)
            return exit_codes.INTERRUPTED


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's stop) raises KeyboardInterrupt like Ctrl-C, so one handler reports both."""
    import signal  # noqa: PLC0415

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _prepare(args) -> int:
    import jax  # noqa: PLC0415

    from blt_jax import prepare  # noqa: PLC0415
    from blt_jax.data import store  # noqa: PLC0415

    cfg = _run_config(args)
    root = cfg.data.path
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)  # one report per job, not per process
    if not args.entropy_run or args.data or not _has_tokens(root):
        t = time.time()
        plan = prepare.plan_corpus(args.data, args.heldout_fraction, args.max_train_bytes, args.text_field,
                                   args.shard_tokens, store_root=root)
        if plan.matches(_manifest(root)) and not args.overwrite:
            store.check_tokens(root)
            say(f"{root} already holds this corpus (same files and options): nothing to do (--overwrite "
                "prepares it again)")
        else:
            m = prepare.write_corpus(root, plan, strict=args.strict, overwrite=args.overwrite,
                                     progress=not args.no_progress)
            say(f"prepared {root}: train {m['train']['num_docs']:,} docs / {m['train']['num_tokens']:,} tokens, "
                f"heldout {m['heldout']['num_docs']:,} docs / {m['heldout']['num_tokens']:,} tokens "
                f"({time.time() - t:.1f}s)")
            inputs = m["inputs"]
            if inputs["bad_records"]:
                say(f"blt prepare: skipped {inputs['bad_records']:,} bad records (--strict refuses them), e.g. "
                    + "; ".join(inputs["bad_record_examples"][:3]), file=sys.stderr)
    if args.entropy_run:
        t = time.time()
        r = prepare.ensure_entropies(root, args.entropy_run, cfg.model.patching, cfg.data.seq_len,
                                     overwrite=args.overwrite, progress=not args.no_progress)
        done = {"computed": "entropies written", "resumed": "entropies resumed and finished",
                "complete": "entropies already complete"}[r["entropies"]]
        say(f"{done} ({time.time() - t:.1f}s)")
        how = "calibrated" if r["calibrated"] else "kept the calibrated"
        say(f"{how} threshold {r['threshold']:.4f} nats -> mean patch length {r['mean_patch_length']:.2f} bytes "
            "on held-out")
    return 0


def _manifest(root: str) -> Optional[dict]:
    from blt_jax.data import store  # noqa: PLC0415

    try:
        return store.read_manifest(root)
    except (FileNotFoundError, ValueError, OSError):
        return None


def _has_tokens(root: str) -> bool:
    return _manifest(root) is not None


def _prepare_parser(sub) -> None:
    pr = sub.add_parser("prepare", help="tokenise a corpus into a tensorstore data store; with --entropy-run, "
                                        "precompute entropies and calibrate the patching threshold")
    _add_config_args(pr)
    pr.add_argument("--data", nargs="+",
                    help="files, folders or glob patterns (quote them) to prepare: text files (one document each; "
                         "plain, .gz or .zst), JSON Lines (.jsonl, .jsonl.gz, .jsonl.zst) and Parquet (.parquet), "
                         "one document per record (default: the embedded corpus)")
    pr.add_argument("--text-field", default="text", help="the records' text field / column (default: text)")
    pr.add_argument("--strict", action="store_true",
                    help="refuse bad records (invalid JSON, no text field, not a string) instead of skipping "
                         "and counting them")
    pr.add_argument("--store", help="data store root, a local folder or tensorstore URL (sets data.path)")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace what the store holds (tokens, or another entropy model's entropies); "
                         "without it an existing store is refused, and adding entropies is the only update")
    pr.add_argument("--heldout-fraction", type=finite_float, default=0.02,
                    help="held out for evaluation: whole text files, or single records, by a hash of their path")
    pr.add_argument("--max-train-bytes", type=positive_int, default=None,
                    help="keep a deterministic subset of the training text files up to this many bytes")
    pr.add_argument("--shard-tokens", type=positive_int, default=1 << 20,
                    help="elements per stored shard: the unit of writing and of resuming (default 1048576)")
    pr.add_argument("--entropy-run", help="a trained entropy-model run directory: precompute its entropies "
                                          "(resuming an interrupted computation) and calibrate the threshold")
    pr.add_argument("--no-progress", action="store_true")
    _add_distributed_args(pr)
    pr.set_defaults(fn=cmd_prepare)


def cmd_calibrate(args) -> int:
    from blt_jax import prepare  # noqa: PLC0415

    cfg = _run_config(args)
    thr, achieved = prepare.calibrate(cfg.data.path, cfg.model.patching, cfg.data.seq_len, args.target)
    print(json.dumps({"threshold": thr, "mean_patch_length": achieved}))
    return 0


def _calibrate_parser(sub) -> None:
    c = sub.add_parser("calibrate", help="calibrate the entropy threshold to a target mean patch length")
    _add_config_args(c)
    c.add_argument("--store", help="data store root (sets data.path)")
    c.add_argument("--target", type=finite_float, default=None, help="bytes per patch (default: the config's)")
    c.set_defaults(fn=cmd_calibrate)


# ---- train -------------------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from blt_jax.model import param_counts  # noqa: PLC0415
    from blt_jax.train.loop import check_overrides, train  # noqa: PLC0415

    check_overrides(args.what, args.set or [])  # before they are applied: train.* would be checked, then unused
    cfg = _run_config(args)
    counts = param_counts(cfg.model.entropy_model if args.what == "entropy" else cfg.model)
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()), flush=True)
    summary = train(args.what, cfg, args.run, entropy_run=args.entropy_run, progress=not args.no_progress,
                    stop_after=args.stop_after)
    print(json.dumps(summary, indent=2, default=float))
    if summary["stopped_by"] == "signal":
        print(f"blt train: interrupted at step {summary['step']}, checkpoint saved; run the same command to "
              f"resume", file=sys.stderr)
        return exit_codes.INTERRUPTED
    return exit_codes.OK


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train (or resume) the entropy model or a BLT")
    _add_config_args(t)
    t.add_argument("--what", choices=_DeferredChoices(_kinds), metavar="KIND", default="blt",
                   help="the model to train: %(choices)s (default %(default)s)")
    t.add_argument("--run", required=True, help="run directory (resumes automatically if it holds checkpoints)")
    t.add_argument("--store", help="data store root, made by `blt prepare` (sets data.path)")
    t.add_argument("--entropy-run", help="entropy-model run (default: the one recorded in the data store)")
    _add_objective_args(t)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--stop-after", type=non_negative_int,
                   help="end at this step with a checkpoint, as a preemption would (the schedule still targets "
                        "train.steps; run again without it, or with a later step, to go on); the exit status is 0, "
                        "as the stop was asked for, and the summary says interrupted")
    _add_distributed_args(t)
    t.set_defaults(fn=cmd_train)


# ---- eval --------------------------------------------------------------------------------------------------

EVAL_TASKS = ("heldout", "bpb", "mc-next-line", "mc-gettext", "translate", "humaneval", "continuation")
_GENERATION = ("method", "draft_len", "block_size", "unmask", "alpha", "gamma", "temperature", "top_k", "top_p",
               "no_eos_stop")
# the options each task reads (besides --checkpoint, --task, --json): another one given is refused, not ignored
# (`--task mc-next-line --files mine.txt` used to score the embedded text, exit 0)
EVAL_OPTIONS = {
    "heldout": ("store", "split", "batches"),
    "bpb": ("files", "window", "batch_size", "dtype"),
    "mc-next-line": ("items", "seed", "batch_size", "dtype"),
    "mc-gettext": ("items", "lang", "seed", "batch_size", "dtype"),
    "translate": ("items", "lang", "shots", "max_new_bytes", "seed", "batch_size", "dtype", *_GENERATION),
    "humaneval": ("items", "samples", "k", "timeout", "workers", "max_new_bytes", "seed", "batch_size", "dtype",
                  *_GENERATION),
    "continuation": ("items", "prompt_bytes", "target_bytes", "seed", "batch_size", "dtype", *_GENERATION),
}
assert set(EVAL_OPTIONS) == set(EVAL_TASKS)
PASS_AT = (1, 10, 100)  # humaneval's default k: those up to --samples


def _pass_at_ks(args) -> tuple[int, ...]:
    """--k, refused where a k exceeds --samples (pass@k needs at least k samples per problem)."""
    if args.k is None:
        return tuple(k for k in PASS_AT if k <= args.samples)
    try:
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError:
        raise ValueError(f"--k: expected comma-separated integers, got {args.k!r}") from None
    for k in ks:
        if not 1 <= k <= args.samples:
            raise ValueError(f"--k: pass@{k} needs at least {k} samples per problem, and --samples is {args.samples} "
                             f"(raise --samples or drop k={k})")
    return ks


def _refuse_options_of_other_tasks(args) -> None:
    reads = EVAL_OPTIONS[args.task]
    for dest, default in args.eval_option_defaults.items():
        if dest not in reads and getattr(args, dest) != default:
            users = [task for task, options in EVAL_OPTIONS.items() if dest in options]
            raise ValueError(f"--{dest.replace('_', '-')}: --task {args.task} does not use it (it applies to "
                             f"--task {', '.join(users)})")


def cmd_eval(args) -> int:
    _refuse_options_of_other_tasks(args)
    if "method" in EVAL_OPTIONS[args.task]:  # humaneval's problems are fixed: its seed only samples
        _refuse_unread_generation_options(args, seed_samples_only=args.task == "humaneval")
    args.seed = _generation_value(args, "seed")  # checked: its default fills in
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
        translation.catalog_files(args.lang)  # before loading the model: no catalogs -> an error at once
    ks = _pass_at_ks(args) if args.task == "humaneval" else ()
    if args.task == "humaneval" and args.samples > 1 and _generation_value(args, "temperature") == 0:
        raise ValueError(f"--samples {args.samples}: at --temperature 0 (greedy, the default) every sample of a "
                         "problem is the same, so pass@k would score one sample; set --temperature (e.g. 0.8)")
    model = api.load(args.checkpoint, dtype=args.dtype)
    result = _run_task(args, model, _generation_kwargs(args), ks)
    if not args.json:
        result.pop("predictions", None)
        result.pop("results", None)
    _print_result(result, args.json)
    return 0


def _run_task(args, model, gen: dict, ks: tuple[int, ...]) -> dict:
    from blt_jax.tasks import code, continuation, multiple_choice, scoring, translation  # noqa: PLC0415

    if args.task == "bpb":
        from blt_jax.train.checkpoint import load_run_config  # noqa: PLC0415

        window = args.window or load_run_config(args.checkpoint)[1].data.seq_len
        files = args.files or [str(f) for f in multiple_choice.heldout_files()]
        result = scoring.bits_per_byte(model, files, window=window, batch_size=args.batch_size)
        return {"task": "bpb", "corpus": "files" if args.files else "embedded held-out split", **result}
    if args.task in ("mc-next-line", "mc-gettext"):
        n = args.items or 100
        items = (multiple_choice.heldout_next_line_items(n, args.seed) if args.task == "mc-next-line"
                 else multiple_choice.gettext_choice_items(args.lang, n, args.seed))
        return {"task": args.task, **multiple_choice.evaluate(model, items, args.batch_size)}
    if args.task == "translate":
        return translation.evaluate(model, args.lang, n_items=args.items or 50, n_shots=args.shots, seed=args.seed,
                                    max_new_bytes=args.max_new_bytes or 96, batch_size=args.batch_size, **gen)
    if args.task == "humaneval":
        return code.evaluate(model, limit=args.items, n_samples=args.samples, max_new_bytes=args.max_new_bytes or 256,
                             ks=ks, timeout=args.timeout, workers=args.workers, batch_size=args.batch_size,
                             seed=args.seed, **gen)
    return continuation.evaluate(model, args.items or 50, args.prompt_bytes, args.target_bytes, seed=args.seed,
                                 batch_size=args.batch_size, **gen)


def _eval_parser(sub) -> None:
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
    e.add_argument("--batches", type=positive_int, default=None, help="heldout: eval batches (default: the run's)")
    e.add_argument("--files", nargs="+", help="bpb: files, folders or glob patterns to score")
    e.add_argument("--window", type=positive_int, help=f"bpb: bytes per window, each scored from BOS, at most "
                                                       f"{constants.MAX_WINDOW:,} (default: the run's training "
                                                       "sequence length)")
    e.add_argument("--items", type=positive_int, help="items (default: 100 multiple choice, 50 translate/continuation, "
                                                      "all 164 HumanEval problems)")
    e.add_argument("--lang", default="de", help="translate / mc-gettext: target language (a /usr/share/locale "
                                                "folder name: de, fr, ...)")
    e.add_argument("--shots", type=non_negative_int, default=3, help="translate: examples in the prompt")
    e.add_argument("--samples", type=positive_int, default=1, help="humaneval: completions per problem")
    e.add_argument("--k", help="humaneval: comma-separated k of pass@k, each <= --samples (default: those of "
                               "1, 10, 100 that are)")
    e.add_argument("--timeout", type=positive_float, default=3.0, help="humaneval: seconds per test run")
    e.add_argument("--workers", type=positive_int, default=2, help="humaneval: parallel test runs")
    e.add_argument("--prompt-bytes", type=positive_int, default=128, help="continuation: prompt length")
    e.add_argument("--target-bytes", type=positive_int, default=32, help="continuation: bytes to continue")
    e.add_argument("--max-new-bytes", type=positive_int,
                   help="generation budget (default: 96 translate, 256 humaneval)")
    e.add_argument("--seed", type=int, help=f"item selection and sampling (default {constants.SEED})")
    e.add_argument("--batch-size", type=positive_int, default=8)
    e.add_argument("--json", action="store_true", help="one compact JSON line, with per-item details")
    _add_generation_args(e)
    options = {dest for task_options in EVAL_OPTIONS.values() for dest in task_options}
    e.set_defaults(fn=cmd_eval, eval_option_defaults={dest: e.get_default(dest) for dest in sorted(options)})


# ---- generate ----------------------------------------------------------------------------------------------

def _read_prompts(args) -> list[bytes]:
    """Prompts as bytes (a byte model takes any): arguments as the OS passed them, files and stdin raw. Stdin
    is read with --stdin, or when it is piped and no other prompt is given (never behind --file's back: in a
    shell loop or under cron it holds something else)."""
    prompts = [os.fsencode(p) for p in args.prompts or []]  # undecodable argv bytes come back exactly
    piped = not prompts and not args.file and not sys.stdin.isatty()
    sources = ([Path(args.file).read_bytes()] if args.file else []) + \
        ([sys.stdin.buffer.read()] if args.stdin or piped else [])
    for data in sources:
        # a CRLF file's lines lose their \r too
        prompts += [ln for ln in data.replace(b"\r\n", b"\n").split(b"\n") if ln] if args.one_per_line else [data]
    return prompts


def cmd_generate(args) -> int:
    from blt_jax.generation import api, bulk  # noqa: PLC0415

    bulk_mode = any(getattr(args, option) for option in bulk.BULK_OPTIONS)
    # a record's own temperature reads --top-k/--top-p/--seed (the records' defaults), even at --temperature 0
    _refuse_unread_generation_options(args, sampling_fixed=not bulk_mode, seed_samples_only=True)
    args.seed = _generation_value(args, "seed")  # checked: its default fills in
    if bulk_mode:  # a JSON Lines file, continuous batching
        with sigterm_as_interrupt():  # a scheduler's stop ends it like Ctrl-C: finished records kept, exit 75
            code = bulk.command(args, **_generation_kwargs(args))
        # a stopped process of a multi-process job leaves it at once: a peer that finished its share waits in a
        # barrier for this one, and jax's shutdown would wait for that peer (a probe: both hung until killed)
        return _leave_the_job_if_distributed(code) if code == exit_codes.INTERRUPTED else code
    prompts = _read_prompts(args)
    model = api.load(args.checkpoint, dtype=args.dtype)
    if args.sharded:
        from blt_jax import sharding  # noqa: PLC0415
        from blt_jax.train.checkpoint import load_run_config  # noqa: PLC0415

        mesh_cfg = load_run_config(args.checkpoint)[1].mesh
        model = api.on_mesh(model, sharding.make_mesh(mesh_cfg), mesh_cfg)
    kwargs = dict(max_new_bytes=args.max_new_bytes, seed=args.seed, **_generation_kwargs(args))
    if args.stream:
        if len(prompts) != 1 or args.json:
            raise ValueError("--stream: give exactly one prompt, without --json")
        # one incremental decoder for the prompt and every piece: a character may be split between them
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sys.stdout.write(text.decode(prompts[0]))
        for piece in api.stream(model, prompts[0], **kwargs):
            sys.stdout.write(text.decode(piece))
            sys.stdout.flush()
        sys.stdout.write(text.decode(b"", final=True) + "\n")
        return 0
    for r in api.generate(model, prompts, **kwargs):
        if args.json:
            print(json.dumps(r.to_json()))
        else:
            print(r.prompt + r.text)
            print("-" * 40)
    return 0


def _generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a BLT run")
    g.add_argument("--checkpoint", required=True, help="BLT run directory")
    g.add_argument("prompts", nargs="*", help="prompt strings")
    g.add_argument("--file", help="read prompts from a file")
    g.add_argument("--stdin", action="store_true", help="read prompts from standard input (also read, without this "
                   "flag, when it is piped and no prompt or --file is given)")
    g.add_argument("--one-per-line", action="store_true", help="each line of --file/--stdin is a prompt")
    g.add_argument("--max-new-bytes", type=positive_int, default=128)
    g.add_argument("--seed", type=int, help=f"sampling (--temperature > 0; default {constants.SEED})")
    g.add_argument("--stream", action="store_true", help="print bytes as they are generated (one prompt)")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    g.add_argument("--sharded", action="store_true",
                   help="split parameters over all local devices by the run's mesh config, and the prompt batch "
                        "(and every cache) over its batch axes")
    b = g.add_argument_group("bulk", "many prompts from a JSON Lines file, continuously batched (--input)")
    b.add_argument("--input", metavar="FILE",
                   help="records {\"id\", \"prompt\"} (optional per record: max_new_bytes, temperature, top_k, top_p, "
                        "seed), one per line; '-': stdin")
    b.add_argument("--output", metavar="FILE",
                   help="one JSON line per record as it finishes ('-' or left out: stdout); an existing file is "
                        "continued: records already in it are skipped")
    b.add_argument("--batch-size", type=positive_int, help="rows generated at once (default: 32)")
    b.add_argument("--max-positions", type=positive_int,
                   help="positions per row: prompt + max_new_bytes + the method's lookahead; a record that needs "
                        "more gets an error line (default: 2048)")
    b.add_argument("--ordered", action="store_true", help="write records in input order")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_generation_args(g)
    _add_distributed_args(g)
    g.set_defaults(fn=cmd_generate)


# ---- serve -------------------------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    from blt_jax import serve  # noqa: PLC0415

    # the options are the requests' defaults: a request names its method and may set a temperature
    _refuse_unread_generation_options(args, method_fixed=False, sampling_fixed=False)
    return serve.command(args, **_generation_kwargs(args))


def _serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve a BLT run over HTTP: OpenAI-style /v1/completions (streaming as "
                                     "server-sent events), concurrent requests continuously batched")
    s.add_argument("--checkpoint", required=True, help="BLT run directory")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    s.add_argument("--port", type=port_number, default=8000, help="TCP port (default 8000; 0: any free one)")
    s.add_argument("--batch-size", type=positive_int, default=32, help="rows generated at once (per method)")
    s.add_argument("--max-positions", type=positive_int, default=2048,
                   help="positions per row: prompt + max_tokens + the method's lookahead; longer requests get a 400")
    s.add_argument("--max-new-bytes", type=positive_int, default=128, help="max_tokens of requests without one")
    s.add_argument("--model-name", help="the model id in answers (default: the checkpoint folder's name)")
    s.add_argument("--no-warmup", action="store_true", help="compile on the first request, not before serving")
    _add_generation_args(s)
    s.set_defaults(fn=cmd_serve)


# ---- convert -----------------------------------------------------------------------------------------------

def cmd_convert(args) -> int:
    from blt_jax import convert  # noqa: PLC0415

    if args.from_hf:
        cfg = convert.import_hf(args.src, args.dst, overwrite=args.overwrite)
        print(f"imported {args.src} -> {args.dst} (patching {cfg.patching.mode}, threshold {cfg.patching.threshold})")
    elif args.params_only:
        convert.export_params(args.src, args.dst, overwrite=args.overwrite)
        print(f"exported the parameters of {args.src} -> {args.dst} (for `blt generate` / `blt eval`)")
    else:
        convert.export_hf(args.src, args.dst, overwrite=args.overwrite)
        print(f"exported {args.src} -> {args.dst} (load with transformers' BltForCausalLM.from_pretrained)")
    return 0


def _convert_parser(sub) -> None:
    cv = sub.add_parser("convert", help="import a transformers Blt checkpoint, or export a run to one")
    direction = cv.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", action="store_true", help="SRC is a transformers save_pretrained folder")
    direction.add_argument("--to-hf", action="store_true", help="SRC is a blt_jax BLT run directory")
    direction.add_argument("--params-only", action="store_true",
                           help="SRC is a BLT run: write its parameters alone (no optimizer state) to DST")
    cv.add_argument("src")
    cv.add_argument("dst", help="a new (or empty) folder")
    cv.add_argument("--overwrite", action="store_true",
                    help="replace DST if it holds anything (it is replaced whole, once the new one is complete)")
    cv.set_defaults(fn=cmd_convert)


# ---- aot, params -------------------------------------------------------------------------------------------

def cmd_aot(args) -> int:
    import jax  # noqa: PLC0415

    if args.local_cpu_devices is not None:  # before jax starts its backends
        jax.config.update("jax_num_cpu_devices", args.local_cpu_devices)
    from blt_jax.aot import run_aot  # noqa: PLC0415

    report = run_aot(_run_config(args), topology=args.topology, num_slices=args.num_slices,
                     cpu_devices=args.local_cpu_devices)
    print(json.dumps(report, indent=2))
    return 0


def _aot_parser(sub) -> None:
    a = sub.add_parser("aot", help="compile the train step ahead of time for a target topology and report "
                                   "per-device memory (does the config fit?)")
    _add_config_args(a)
    _add_objective_args(a)
    a.add_argument("--topology", help="a TPU accelerator type, e.g. v5p-256, v6e-256 (needs libtpu: "
                                      "pip install 'jax[tpu]'); default: this machine's devices")
    a.add_argument("--num-slices", type=positive_int,
                   help="with --topology: TPU slices (multi-slice; set mesh.dcn_parallelism; default 1)")
    a.add_argument("--local-cpu-devices", type=positive_int, help="compile for this many virtual CPU devices instead")
    a.set_defaults(fn=cmd_aot)


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


def _params_parser(sub) -> None:
    pa = sub.add_parser("params", help="parameter counts per component and FLOPs per byte of a preset")
    _add_config_args(pa)
    pa.set_defaults(fn=cmd_params)


# ---- the command -------------------------------------------------------------------------------------------

# What to lower when a command runs out of memory (jax's RESOURCE_EXHAUSTED), in options it has: `blt eval`'s
# by task ("eval <task>"); the commands not named take a config, so the config's sizes (--set, --preset).
OUT_OF_MEMORY_ADVICE = {
    "eval heldout": "--task heldout runs the run's own batches (data.batch_size), which no option lowers; "
                    "--task bpb scores text in smaller ones",
    "eval bpb": "lower --batch-size or --window",
    "eval mc-next-line": "lower --batch-size",
    "eval mc-gettext": "lower --batch-size",
    "eval translate": "lower --batch-size, --max-new-bytes or --shots",
    "eval humaneval": "lower --batch-size or --max-new-bytes",
    "eval continuation": "lower --batch-size, --prompt-bytes or --target-bytes",
    "generate": "lower --max-new-bytes or the prompts given at once (with --input: --batch-size or --max-positions)",
    "serve": "lower --batch-size, --max-positions or --max-new-bytes",
    "prepare": "the entropy model runs a fixed number of rows per device, which no option lowers",
    "convert": "the whole model is held at once, which no option lowers",
}
CONFIG_OUT_OF_MEMORY_ADVICE = ("lower the batch size, the sequence length or the model's size (--set data.batch_size="
                               "..., --set data.seq_len=..., --preset)")

SUBCOMMANDS = (_quickstart_parser, _prepare_parser, _calibrate_parser, _train_parser, _eval_parser,
               _generate_parser, _serve_parser, _convert_parser, _aot_parser, _params_parser)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blt", description="Byte Latent Transformer in JAX: train, evaluate, generate.")
    sub = p.add_subparsers(dest="command", required=True)
    for add_parser in SUBCOMMANDS:
        add_parser(sub)
    return p


class _NoBackgroundTracebacks(logging.Filter):
    """A failed checkpoint write fails every array write in flight: orbax logs a traceback for each background
    thread and asyncio one for each abandoned future (hundreds of lines for one full disk). The command
    reports the failure itself in one line, so these records keep their message and lose the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio" or "orbax" in record.pathname:
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_background_tracebacks() -> None:
    # absl's logger must be its own (an ABSLLogger names the caller's file, which the filter reads): asked for
    # here before absl is imported, "absl" would be a plain logger, and every record would name absl's file
    import absl.logging  # noqa: F401, PLC0415

    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoBackgroundTracebacks) for f in logger.filters):
            logger.addFilter(_NoBackgroundTracebacks())


def _one_line_warnings(command: str) -> None:
    """blt_jax's own warnings (e.g. a damaged checkpoint skipped) as one `blt <cmd>: warning: ...` line."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("blt_jax"):
            print(f"blt {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = _run(args)
    except KeyboardInterrupt:  # commands with work to resume (train, prepare, bulk generate) catch it: exit 75
        print(f"blt {args.command}: stopped (Ctrl-C)", file=sys.stderr)
        return _leave_the_job_if_distributed(exit_codes.CANCELLED)
    except Exception:
        _leave_the_job_if_distributed(1, traceback=True)
        raise
    return code if code in (exit_codes.OK, exit_codes.INTERRUPTED) else _leave_the_job_if_distributed(code)


def _run(args) -> int:
    previous = warnings.showwarning
    _one_line_warnings(args.command)
    _quiet_background_tracebacks()
    try:
        if hasattr(args, "coordinator"):  # before any other jax call
            _start_distributed(args)
        return args.fn(args)
    except (ConfigError, ValueError, OSError, FloatingPointError) as e:
        # refused input, missing or damaged files, a failed save, a diverged loss: one line, not a traceback
        if os.environ.get("BLT_DEBUG"):
            raise
        lines = str(e).strip().splitlines() or [type(e).__name__]
        more = " (BLT_DEBUG=1 shows the rest)" if len(lines) > 1 else ""
        print(f"blt {args.command}: error: {lines[0]}{more}", file=sys.stderr)
        return exit_codes.ERROR
    except RuntimeError as e:  # jax's errors are RuntimeErrors; only running out of memory is the user's to fix
        if "RESOURCE_EXHAUSTED" not in str(e) or os.environ.get("BLT_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0]
        key = f"eval {args.task}" if args.command == "eval" else args.command
        advice = OUT_OF_MEMORY_ADVICE.get(key, CONFIG_OUT_OF_MEMORY_ADVICE)
        print(f"blt {args.command}: error: out of memory ({first}); {advice}", file=sys.stderr)
        return exit_codes.ERROR
    finally:
        warnings.showwarning = previous


def _leave_the_job_if_distributed(code: int, traceback: bool = False) -> int:
    """A process of a jax.distributed job that fails exits at once, without jax's shutdown: that waits in a
    barrier for every peer, and a peer waiting for this process would hold the whole job until a timeout (a
    probe: one process's unreadable input kept both running past 250 s). The launcher (launch/local.py), or
    the coordination service once heartbeats stop, then stops the peers. Elsewhere: returns `code`."""
    from blt_jax import distributed  # noqa: PLC0415

    if not distributed.is_initialized():
        return code
    if traceback:
        import traceback as tb  # noqa: PLC0415

        tb.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
