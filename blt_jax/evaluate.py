"""Held-out evaluation: bits per byte of a trained run, and a unigram baseline for scale."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import numpy as np

from blt_jax import model as model_lib
from blt_jax.data import pipeline, store
from blt_jax.train import checkpoint as ckpt
from blt_jax.train.checkpoint import load_trained_params
from blt_jax.train.loop import evaluate, resolve_task
from blt_jax.train.step import make_optimizer, make_step_fns


def heldout_bpb(run_dir: str | Path, data_root: Optional[str] = None, split: str = "heldout",
                num_batches: Optional[int] = None, step: Optional[int] = None) -> dict:
    """Bits per byte of a run's checkpoint on a split of a data store (its own store by default)."""
    kind, cfg, meta = ckpt.load_run_config(run_dir)
    if data_root is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=data_root))
    elif "converted_from" in meta:  # its data.path is the config's default, not a store it was trained on
        raise FileNotFoundError(f"{run_dir}: a model imported from transformers ({meta['converted_from']}) has no "
                                "data store of its own; pass --store STORE, or score text files with --task bpb "
                                "--files ...")
    elif not Path(cfg.data.path).is_absolute() and "://" not in cfg.data.path and not Path(cfg.data.path).exists():
        raise FileNotFoundError(f"{run_dir}: its data store {cfg.data.path!r} is a path relative to the directory it "
                                f"was trained from (runs written before absolute paths); pass --store")
    task = resolve_task(kind, cfg)
    params = load_trained_params(run_dir, step=step)
    graphdef, _ = model_lib.abstract_state(task.model_cfg)
    fns = make_step_fns(kind, graphdef, make_optimizer(task.train_cfg), task.train_cfg,
                        eval_max_patches=task.eval_max_patches)
    batches = pipeline.make_eval_batches(cfg.data, split, task.eval_transform, task.fields,
                                         num_batches=num_batches or task.train_cfg.eval_batches)
    return {"kind": kind, "split": split, **evaluate(fns, params, batches)}


def unigram_bpb(data_root: str, split: str = "heldout") -> float:
    """Cross entropy (bits per byte) of a byte-frequency model fit on the train split (add-one smoothed),
    measured on the next-token targets of `split`: the floor any byte LM should beat."""
    train = np.asarray(store.open_array(data_root, "train", "tokens").read().result()).astype(np.int64)
    test = np.asarray(store.open_array(data_root, split, "tokens").read().result()).astype(np.int64)[1:]
    counts = np.bincount(train[1:], minlength=260).astype(np.float64) + 1.0
    logp = np.log2(counts / counts.sum())
    return float(-logp[test].mean()) if test.size else math.nan
