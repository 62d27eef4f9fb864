"""`blt prepare`: corpus files -> tensorstore token arrays; then, given a trained entropy model, the
precomputed next-byte entropies (as BLT precomputes them for training) and a patching threshold
calibrated on the held-out split to the target mean patch length."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np
from flax import nnx

from blt_jax import model as model_lib
from blt_jax.config import ConfigError, PatchingConfig
from blt_jax.data import corpus, store
from blt_jax.model.entropy_model import entropies
from blt_jax.patching import calibrate_threshold
from blt_jax.train import checkpoint as ckpt

ENTROPY_CHUNK = 1024  # new tokens per row; dense attention cost grows with (context + chunk)^2
ENTROPY_BATCH = 16


def prepare_corpus(root: str, data: Optional[Sequence[str]] = None, heldout_fraction: float = 0.02,
                   max_train_bytes: Optional[int] = None) -> dict:
    """Tokenise the embedded default corpus (CPython's standard library source and docs text), or the
    user's files/folders, into a store at `root` with a held-out split by file.

    `max_train_bytes` keeps a deterministic pseudo-random subset of the training files (ordered by a hash
    of their names, so the subset spans the whole corpus) up to that many bytes; the held-out split is never
    truncated."""
    if data:
        files = corpus.collect_files(data)
        base = corpus.common_root(files)
        description = "user files: " + ", ".join(str(d) for d in data)
    else:
        files = corpus.default_corpus_files()
        base = corpus.stdlib_root()
        description = corpus.default_corpus_description()
    train, heldout = corpus.split_files(files, base, heldout_fraction)
    if max_train_bytes is not None:
        kept, total = set(), 0
        for f in sorted(train, key=lambda f: hashlib.sha256(f.as_posix().encode()).digest()):
            if total >= max_train_bytes:
                break
            kept.add(f)
            total += f.stat().st_size
        train = [f for f in train if f in kept]
        description += f" (training split capped at {max_train_bytes} bytes)"
    return store.prepare_tokens(root, train, heldout, base, description=description)


def make_entropy_fn(run_dir: str | Path):
    """A jitted (1, L) tokens -> (1, L) entropies function from an entropy-model run."""
    from blt_jax.train.checkpoint import load_trained_params  # noqa: PLC0415

    kind, cfg, _ = ckpt.load_run_config(run_dir)
    if kind != "entropy":
        raise ConfigError(f"entropy_run: {run_dir} holds a {kind!r} run, not an entropy model")
    em_cfg = cfg.model.entropy_model
    params = load_trained_params(run_dir, expect_kind="entropy")
    graphdef, _ = model_lib.abstract_state(em_cfg)

    @jax.jit
    def fn(p, tokens):
        return entropies(nnx.merge(graphdef, p)(tokens)[0])

    stack = em_cfg.stack
    # receptive field n_layers * window, but training never showed the model more than seq_len tokens
    context = min(stack.n_layers * (stack.window or cfg.data.seq_len), cfg.data.seq_len)
    return (lambda tokens: np.asarray(fn(params, tokens))), context


def add_entropies(root: str, entropy_run: str | Path, progress: bool = True) -> None:
    """Precompute entropies for both splits with the given entropy model and record it in the manifest."""
    fn, context = make_entropy_fn(entropy_run)
    for split in store.SPLITS:
        store.compute_and_write_entropies(root, split, fn, ENTROPY_CHUNK, context, ENTROPY_BATCH, progress=progress)
    store.update_manifest(root, entropy_run=str(Path(entropy_run).absolute()), patching_threshold=None)


def calibrate(root: str, patching: PatchingConfig, seq_len: int, target: Optional[float] = None,
              max_windows: int = 4096) -> tuple[float, float]:
    """Calibrate the global entropy threshold on held-out windows (shaped like training windows) to the
    target mean patch length; store it in the manifest. Returns (threshold, achieved mean patch length)."""
    if patching.mode != "entropy":
        raise ConfigError(f"model.patching.mode: calibration applies to entropy patching, not {patching.mode!r}")
    if not store.has_array(root, "heldout", "entropies"):
        raise ConfigError(f"{root}: no entropies; run `blt prepare --entropy-run RUN` first")
    tokens = np.asarray(store.open_array(root, "heldout", "tokens").read().result()).astype(np.int32)
    ent = np.asarray(store.open_array(root, "heldout", "entropies").read().result())
    n = min((len(tokens) - 1) // seq_len, max_windows)
    if n < 1:
        raise ValueError(f"{root}: the held-out split has {len(tokens)} tokens, fewer than one {seq_len}-byte window")
    tok_w = tokens[: n * seq_len].reshape(n, seq_len)
    ent_w = ent[: n * seq_len].reshape(n, seq_len)
    threshold, achieved = calibrate_threshold(patching, tok_w, ent_w, target)
    store.update_manifest(root, patching_threshold=threshold, patching_target=target or patching.target_patch_length,
                          patching_achieved=achieved, patching_rule=patching.rule,
                          patching_max_patch_length=patching.max_patch_length)
    return threshold, achieved
