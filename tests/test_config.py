"""Configs are validated data: bad values fail at construction with the offending field's name."""

import dataclasses

import pytest

from blt_jax.config import PRESETS, ConfigError, RunConfig, StackConfig, apply_overrides, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_roundtrip(name):
    cfg = get_preset(name)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override,field", [
    ("model.encoder.n_heads=3", "model.encoder.n_heads"),  # 32 not divisible by 3
    ("model.global_model.n_kv_heads=3", "model.global_model.n_kv_heads"),
    ("model.decoder.window=0", "model.decoder.window"),
    ("model.decoder.dim=64", "model.decoder.dim"),  # must equal the encoder's
    ("model.patching.max_patches=1", "model.patching.max_patches"),
    ("model.patching.mode=\"bpe\"", "model.patching.mode"),
    ("model.hash_vocab=16777216", "model.hash_vocab"),
    ("train.warmup_steps=1000", "train.warmup_steps"),
    ("train.compute_dtype=\"float16\"", "train.compute_dtype"),
    ("data.seq_len=1", "data.seq_len"),
    ("model.encoder.dim=\"wide\"", "model.encoder.dim"),
    ("model.encoder.widht=3", "model.encoder.widht"),
    ("model.nope.dim=3", "model.nope"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        apply_overrides(get_preset("tiny"), [override])
    assert str(e.value).startswith(field), str(e.value)


def test_max_patches_too_small_for_the_window():
    with pytest.raises(ConfigError, match="model.patching.max_patches"):
        apply_overrides(get_preset("tiny"), ["model.patching.mode=\"static\"", "model.patching.patch_size=2",
                                             "model.patching.max_patches=20"])  # 64 bytes need 33 slots
    with pytest.raises(ConfigError, match="model.patching.max_patches"):
        apply_overrides(get_preset("tiny"), ["model.patching.max_patches=8"])  # max_patch_length 8: needs 9


def test_overrides_apply_and_parse_types():
    cfg = apply_overrides(get_preset("tiny"), ["model.global_model.n_layers=3", "train.learning_rate=1e-3",
                                               "model.patching.threshold=None", "model.hash_ngram_sizes=[3,4]",
                                               "train.remat=true", "data.path=gs://bucket/data"])
    assert cfg.model.global_model.n_layers == 3 and cfg.train.learning_rate == 1e-3
    assert cfg.model.patching.threshold is None and cfg.model.hash_ngram_sizes == (3, 4)
    assert cfg.train.remat is True and cfg.data.path == "gs://bucket/data"


def test_stack_head_dim_must_be_even_for_rope():
    with pytest.raises(ConfigError, match="head_dim"):
        StackConfig(dim=12, n_layers=1, n_heads=4, ffn_dim=8).validate("s")


def test_frozen():
    cfg = get_preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.encoder.dim = 3  # type: ignore[misc]
