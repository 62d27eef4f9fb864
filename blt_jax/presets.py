"""Named configurations: `blt train --preset NAME` (and `get_preset(NAME)` in code).

`tiny` (tests), `quickstart` (the README's first command), `scaling-{s,m,l}` (the CPU scaling ladder of
experiments/scaling.py), `blt-1b` (the released shape), `fast-blt-1b` and `fast-blt-3b` (the Fast BLT paper's
models) and their BLT-D variants `fast-blt-{1b,3b}-d{4,8,16}`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from blt_jax.config import (BLTConfig, ConfigError, DataConfig, DiffusionConfig, EntropyModelConfig, PatchingConfig,
                            RunConfig, StackConfig, TrainConfig, ffn_dim_for)

def _entropy(dim: int, layers: int, heads: int, ffn: int, window: int = 512) -> EntropyModelConfig:
    return EntropyModelConfig(StackConfig(dim=dim, n_layers=layers, n_heads=heads, ffn_dim=ffn,
                                          rope_theta=10_000.0, window=window))


def preset_tiny() -> RunConfig:
    """Smallest useful model: unit tests on CPU (about 0.2M parameters without hash tables)."""
    local = dict(dim=32, n_heads=2, ffn_dim=64, window=64)
    model = BLTConfig(
        encoder=StackConfig(n_layers=1, **local),
        global_model=StackConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=128),
        decoder=StackConfig(n_layers=2, **local),
        entropy_model=_entropy(32, 1, 2, 64, window=64),
        patching=PatchingConfig(mode="entropy", threshold=None, max_patches=40, max_patch_length=8),
        hash_vocab=97,
    )
    return RunConfig(
        name="tiny", model=model,
        data=DataConfig(seq_len=64, batch_size=4),
        train=TrainConfig(steps=20, learning_rate=3e-3, warmup_steps=2, log_every=5, checkpoint_every=10),
        entropy_train=TrainConfig(steps=20, learning_rate=3e-3, warmup_steps=2, log_every=5, checkpoint_every=10),
    )


def preset_quickstart() -> RunConfig:
    """The README's first command: entropy model + small BLT trained on 2 CPU cores in minutes.

    Sized for XLA:CPU, where attention scores cost far more than their FLOPs: two heads per stack and
    64-byte local windows (block-local attention) keep the score tensors small."""
    local = dict(dim=128, n_heads=2, ffn_dim=384, window=64)
    model = BLTConfig(
        encoder=StackConfig(n_layers=1, **local),
        global_model=StackConfig(dim=256, n_layers=4, n_heads=2, ffn_dim=768),
        decoder=StackConfig(n_layers=2, **local),
        entropy_model=_entropy(96, 2, 2, 256, window=64),
        patching=PatchingConfig(mode="entropy", threshold=None, max_patches=160, max_patch_length=8),
        hash_vocab=8192,
    )
    return RunConfig(
        name="quickstart", model=model,
        data=DataConfig(seq_len=512, batch_size=16),
        train=TrainConfig(steps=260, learning_rate=3e-3, warmup_steps=20, log_every=10, checkpoint_every=100,
                          eval_batches=12),
        entropy_train=TrainConfig(steps=200, learning_rate=3e-3, warmup_steps=20, log_every=10,
                                  checkpoint_every=200, eval_batches=12),
    )


def _scaling_preset(name: str, local_dim: int, global_dim: int, global_layers: int, steps: int) -> RunConfig:
    """One size of the CPU scaling ladder (experiments/scaling.py): quickstart-shaped, 256-byte windows.

    `train.steps` of the entropy-patched BLT sets the size's FLOP budget; every other variant of the size
    (byte transformer, static patches, BLT-D) trains for the same FLOPs."""
    local = dict(dim=local_dim, n_heads=2, ffn_dim=3 * local_dim, window=64)
    model = BLTConfig(
        encoder=StackConfig(n_layers=1, **local),
        global_model=StackConfig(dim=global_dim, n_layers=global_layers, n_heads=2, ffn_dim=3 * global_dim),
        decoder=StackConfig(n_layers=2, **local),
        entropy_model=_entropy(96, 2, 2, 256, window=64),
        patching=PatchingConfig(mode="entropy", threshold=None, max_patches=96, max_patch_length=8),
        hash_vocab=4096,
    )
    schedule = dict(learning_rate=3e-3, log_every=10, eval_batches=24, checkpoint_every=1000, keep_checkpoints=1)
    return RunConfig(
        name=name, model=model,
        data=DataConfig(seq_len=256, batch_size=16),
        train=TrainConfig(steps=steps, warmup_steps=max(1, steps // 10), **schedule),
        entropy_train=TrainConfig(steps=300, warmup_steps=30, **schedule),
    )


def preset_scaling_s() -> RunConfig:
    return _scaling_preset("scaling-s", local_dim=48, global_dim=96, global_layers=2, steps=50)


def preset_scaling_m() -> RunConfig:
    return _scaling_preset("scaling-m", local_dim=64, global_dim=128, global_layers=3, steps=90)


def preset_scaling_l() -> RunConfig:
    return _scaling_preset("scaling-l", local_dim=80, global_dim=160, global_layers=3, steps=90)


def _blt_1b_model(global_window: Optional[int], max_patch_length: Optional[int], global_dim: int = 2048,
                  global_heads: int = 16, global_ffn: int = 5632) -> BLTConfig:
    local = dict(dim=1024, n_heads=16, ffn_dim=ffn_dim_for(1024), window=512)
    return BLTConfig(
        encoder=StackConfig(n_layers=1, **local),
        global_model=StackConfig(dim=global_dim, n_layers=25, n_heads=global_heads, ffn_dim=global_ffn,
                                 window=global_window),
        decoder=StackConfig(n_layers=9, **local),
        entropy_model=_entropy(768, 14, 12, 2048, window=512),
        patching=PatchingConfig(mode="entropy", threshold=1.335442066192627, max_patches=2048,
                                max_patch_length=max_patch_length),
    )


def preset_blt_1b() -> RunConfig:
    """The released BLT-1B shape (facebook/blt-1b; transformers' BltConfig defaults)."""
    return RunConfig(name="blt-1b", model=_blt_1b_model(None, None),
                     data=DataConfig(seq_len=8192, batch_size=64),
                     train=TrainConfig(steps=240_000, warmup_steps=2000))


def preset_fast_blt_1b() -> RunConfig:
    """Fast BLT paper, 1B: 1.28B global + 19M encoder + 160M decoder; windows of 512; patches <= 8 bytes."""
    return RunConfig(name="fast-blt-1b", model=_blt_1b_model(512, 8),
                     data=DataConfig(seq_len=8192, batch_size=256),
                     train=TrainConfig(steps=240_000, warmup_steps=2000))


def preset_fast_blt_3b() -> RunConfig:
    """Fast BLT paper, 3B: 2.82B global (25 x 3072, FFN 8192) + 26M encoder + 160M decoder (a consistent guess)."""
    return RunConfig(name="fast-blt-3b",
                     model=_blt_1b_model(512, 8, global_dim=3072, global_heads=24, global_ffn=8192),
                     data=DataConfig(seq_len=8192, batch_size=512),
                     train=TrainConfig(steps=480_000, warmup_steps=4000))


PRESETS = {
    "tiny": preset_tiny,
    "quickstart": preset_quickstart,
    "scaling-s": preset_scaling_s,
    "scaling-m": preset_scaling_m,
    "scaling-l": preset_scaling_l,
    "blt-1b": preset_blt_1b,
    "fast-blt-1b": preset_fast_blt_1b,
    "fast-blt-3b": preset_fast_blt_3b,
}


def _blt_d_variant(base: str, block_size: int):
    def preset() -> RunConfig:
        cfg = PRESETS[base]()
        model = dataclasses.replace(cfg.model, diffusion=DiffusionConfig(block_size=block_size))
        return dataclasses.replace(cfg, name=f"{base}-d{block_size}", model=model)

    preset.__doc__ = f"{base} trained as BLT-D-{block_size} (next-byte + block-wise masked diffusion)."
    return preset


for _base in ("fast-blt-1b", "fast-blt-3b"):
    for _block in (4, 8, 16):
        PRESETS[f"{_base}-d{_block}"] = _blt_d_variant(_base, _block)


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()

