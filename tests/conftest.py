"""Shared fixtures: a small real corpus (two stdlib packages) prepared into a store, and a trained tiny
entropy model + BLT on it, built once per test session."""

import os
import sysconfig
from pathlib import Path

import jax
import pytest

from blt_jax import prepare
from blt_jax.config import apply_overrides, get_preset
from blt_jax.train.loop import train

STDLIB = Path(sysconfig.get_paths()["stdlib"])

# Tests spend most of their time compiling small programs that then run for milliseconds, so they compile them
# for compile speed: LLVM at -O0 and XLA:CPU's older emitters halve a compile-bound test's time. XLA reads this when JAX
# starts its CPU backend (first use, not import); subprocesses that tests start inherit it. The packaging check,
# the quickstart and every user run keep XLA's defaults; a developer's own XLA_FLAGS come later and win.
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{FAST_COMPILE_XLA_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()

# Broadcasting between arrays of different rank must be written out ([None], [:, None], reshape): an implicit
# rank promotion is an error in every test (the library runs with JAX's default, "allow").
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_xdist_auto_num_workers(config):
    """`--numprocesses=auto` (setup.cfg): one worker per core the process may use, at most 4. The tests are
    single-threaded (compiling dominates), and each worker trains its own session fixtures and holds its own
    compiled programs (~2 GB), so more workers buy little and cost memory."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 4))


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Free each test module's compiled programs when it ends. Every XLA:CPU kernel keeps three memory maps
    while its program lives (a generation program has ~500 kernels), and one process may hold at most
    vm.max_map_count maps (65,530 by default on Linux): past it, compiling fails and the process dies."""
    yield
    jax.clear_caches()


def tiny_config(root: str, *overrides: str):
    return apply_overrides(get_preset("tiny"), [f"data.path={root}", *overrides])


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """(cfg, data root, entropy run, BLT run): both trained by the real trainer on real text."""
    base = tmp_path_factory.mktemp("tiny")
    root = str(base / "data")
    prepare.prepare_corpus(root, [str(STDLIB / "json"), str(STDLIB / "email")])
    cfg = tiny_config(root, "data.batch_size=16", "train.steps=100", "entropy_train.steps=100",
                      "train.warmup_steps=5", "entropy_train.warmup_steps=5", "train.log_every=1",
                      "entropy_train.log_every=1", "train.checkpoint_every=50")
    train("entropy", cfg, base / "entropy", progress=False)
    prepare.add_entropies(root, base / "entropy", progress=False)
    prepare.calibrate(root, cfg.model.patching, cfg.data.seq_len)
    train("blt", cfg, base / "blt", progress=False)
    return cfg, root, base / "entropy", base / "blt"
