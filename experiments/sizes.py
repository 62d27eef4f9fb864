"""The experiments' models, as data: the CPU scaling study's sizes (each with its FLOP budget), the entropy
model they share, the best small models trained for generation, and the GPU recipe's ladder. Every model is
a preset (`quickstart` on CPU, `fast-blt-1b` on GPU) with `--set` overrides, so any of them is also one
`blt train --preset ... --set ...` command (`as_set_args(...overrides())` gives the list). The CPU sizes are
sized from throughput measured on the 2-vCPU VM (experiments/README.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

from blt_jax.config import RunConfig, apply_overrides, get_preset

BASE_PRESET = "quickstart"

# The entropy model every study run and best model patches with (the quickstart's: 2 layers of 96, 64-byte
# windows), trained on the whole training split for longer than the quickstart does.
ENTROPY_MODEL = {
    "entropy_train.steps": 1500, "entropy_train.warmup_steps": 100, "entropy_train.learning_rate": 3e-3,
    "entropy_train.checkpoint_every": 500, "entropy_train.keep_checkpoints": 1, "entropy_train.eval_batches": 64,
}

# Shared by every study size: 256-byte windows of 16, enough patch slots for static patches of 4, small hash
# tables, the whole held-out split in the final evaluation, a checkpoint every 200 steps (a killed run
# resumes from it), and a cosine schedule with 10% warm-up (steps are set from the FLOP budget).
STUDY_COMMON = {
    "data.seq_len": 256, "data.batch_size": 16, "model.patching.max_patches": 96, "model.hash_vocab": 4096,
    "train.learning_rate": 3e-3, "train.log_every": 25, "train.checkpoint_every": 200, "train.keep_checkpoints": 1,
    "train.eval_batches": 64,
}


@dataclass(frozen=True)
class Size:
    """One model shape: local (encoder/decoder) width, global width and depth; SwiGLU widths are 3x the width,
    and there are width // 128 heads, at least 2 (XLA:CPU pays per attention-score tensor: few, wide heads)."""

    local_dim: int
    global_dim: int
    global_layers: int
    budget_flops: Optional[float] = None  # the study's training FLOPs per run at this size
    decoder_layers: Optional[int] = None  # None: the base preset's

    def overrides(self) -> dict:
        heads = lambda d: max(2, d // 128)  # noqa: E731
        layers = {} if self.decoder_layers is None else {"model.decoder.n_layers": self.decoder_layers}
        return {**layers,
                "model.encoder.dim": self.local_dim, "model.encoder.ffn_dim": 3 * self.local_dim,
                "model.encoder.n_heads": heads(self.local_dim),
                "model.decoder.dim": self.local_dim, "model.decoder.ffn_dim": 3 * self.local_dim,
                "model.decoder.n_heads": heads(self.local_dim),
                "model.global_model.dim": self.global_dim, "model.global_model.ffn_dim": 3 * self.global_dim,
                "model.global_model.n_heads": heads(self.global_dim),
                "model.global_model.n_layers": self.global_layers}


# The scaling study: each size at its own budget (about 2.4x apart), all seven variants FLOP-matched per size.
STUDY: dict[str, Size] = {
    "cpu-s": Size(local_dim=64, global_dim=128, global_layers=2, budget_flops=3e12),
    "cpu-m": Size(local_dim=96, global_dim=192, global_layers=3, budget_flops=7e12),
    "cpu-l": Size(local_dim=128, global_dim=256, global_layers=4, budget_flops=1.7e13),
    "cpu-xl": Size(local_dim=160, global_dim=320, global_layers=5, budget_flops=4e13),
}


@dataclass(frozen=True)
class BestModel:
    """A model trained for generation: the same shape and schedule for BLT and every BLT-D."""

    size: Size
    steps: int
    block_size: int = 0  # 0: plain BLT; B: BLT-D-B

    def overrides(self) -> dict:
        return {**self.size.overrides(), **BEST_COMMON, "train.steps": self.steps,
                "train.warmup_steps": max(1, self.steps // 20), "model.diffusion.block_size": self.block_size}


# 1024-byte windows (few-shot translation prompts run to 600 bytes; generation reads past them), patch slots
# for entropy patches of 4 on average and at most 8 bytes, a checkpoint every ~5 minutes.
BEST_COMMON = {
    "data.seq_len": 1024, "data.batch_size": 8, "model.patching.max_patches": 320, "model.hash_vocab": 8192,
    "train.learning_rate": 2e-3, "train.log_every": 25, "train.checkpoint_every": 100, "train.keep_checkpoints": 2,
    "train.eval_batches": 32,
}
# quickstart's local models (they run once per byte in generation), a 6-layer global model of 320; 1500
# steps of 8 x 1024 bytes = 12.3M bytes, about one pass over the training split. Measured here (idle-machine
# estimate from MFU against the matmul peak): BLT ~40 min, BLT-D-8 ~90 min.
BEST_SIZE = Size(local_dim=128, global_dim=320, global_layers=6)
BEST_STEPS = 1500
BEST: dict[str, BestModel] = {
    "blt": BestModel(BEST_SIZE, BEST_STEPS),
    "d-8": BestModel(BEST_SIZE, BEST_STEPS, block_size=8),
    "d-4": BestModel(BEST_SIZE, BEST_STEPS, block_size=4),
    "d-16": BestModel(BEST_SIZE, BEST_STEPS, block_size=16),
}


def as_set_args(overrides: dict) -> list[str]:
    """`key=value` strings, as `blt train --set` and `apply_overrides` take them."""
    return [f"{k}={v}" for k, v in overrides.items()]


def build(overrides: dict, store_root: Optional[str] = None, name: Optional[str] = None,
          preset: str = BASE_PRESET) -> RunConfig:
    """A preset (the CPU models': quickstart with the shared entropy model's schedule) with these overrides,
    on a data store."""
    extra = {"data.path": json.dumps(store_root)} if store_root else {}
    shared = ENTROPY_MODEL if preset == BASE_PRESET else {}
    cfg = apply_overrides(get_preset(preset), as_set_args({**shared, **overrides, **extra}))
    return dataclasses.replace(cfg, name=name) if name else cfg


def study_config(name: str, store_root: Optional[str] = None) -> RunConfig:
    """A study size's entropy-patched BLT (steps are set per variant from the budget by scaling.py)."""
    return build({**STUDY[name].overrides(), **STUDY_COMMON}, store_root, name=name)


def best_config(name: str, store_root: Optional[str] = None) -> RunConfig:
    return build(BEST[name].overrides(), store_root, name=f"best-{name}")


# ---- the GPU recipe (experiments/gpu_run.py): the Fast BLT 1B preset and smaller shapes of it ------------
GPU_PRESET = "fast-blt-1b"
# static patches of 4 (no entropy model to train and run over the corpus inside a few minutes of device
# time), 4096-byte windows of 16, bfloat16 compute, smaller hash tables, a checkpoint only at the end (or
# at the deadline)
GPU_LADDER_COMMON = {
    "model.patching.mode": "static", "model.patching.patch_size": 4, "model.patching.max_patches": 1032,
    "data.seq_len": 4096, "data.batch_size": 16, "model.hash_vocab": 65536, "train.compute_dtype": "bfloat16",
    "train.learning_rate": 1e-3, "train.log_every": 20, "train.checkpoint_every": 100_000,
    "train.keep_checkpoints": 1, "train.eval_batches": 8,
}
GPU_LADDER: dict[str, Size] = {
    "gpu-s": Size(local_dim=512, global_dim=768, global_layers=12, decoder_layers=4, budget_flops=1e16),
    "gpu-m": Size(local_dim=768, global_dim=1280, global_layers=16, decoder_layers=6, budget_flops=3e16),
    "gpu-l": Size(local_dim=1024, global_dim=2048, global_layers=25, decoder_layers=9, budget_flops=1e17),
}


def gpu_ladder_config(name: str, store_root: Optional[str] = None) -> RunConfig:
    return build({**GPU_LADDER[name].overrides(), **GPU_LADDER_COMMON}, store_root, name=name, preset=GPU_PRESET)
