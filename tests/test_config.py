"""Configs are validated data: bad values fail at construction with the offending field's name."""

import dataclasses
import typing

import pytest

from blt_jax import config
from blt_jax.config import ConfigError, RunConfig, StackConfig, apply_overrides
from blt_jax.presets import PRESETS, get_preset


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


def _fields_of_type(cls, wanted, prefix=""):
    """Dotted names of every field of `wanted` type (Optional included) in the config dataclass `cls`."""
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union \
            else [tp]
        if dataclasses.is_dataclass(inner[0]):
            yield from _fields_of_type(inner[0], wanted, f"{prefix}{f.name}.")
        elif inner[0] is wanted:
            yield f"{prefix}{f.name}"


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_every_float_field_must_be_finite(value):
    names = list(_fields_of_type(RunConfig, float))
    assert "train.learning_rate" in names and "model.patching.threshold" in names and len(names) > 20
    for name in names:
        with pytest.raises(ConfigError, match=rf"^{name}: must be a finite number"):
            apply_overrides(get_preset("tiny"), [f"{name}={value}"])


def test_constraints_live_next_to_their_fields():
    """A field's bound is data on the field (one validator reads it), and its message names the bound."""
    steps = next(f for f in dataclasses.fields(config.TrainConfig) if f.name == "steps")
    assert steps.metadata["check"].what == ">= 1"
    with pytest.raises(ConfigError, match=r"^train.steps: must be >= 1, got 0$"):
        apply_overrides(get_preset("tiny"), ["train.steps=0"])
    with pytest.raises(ConfigError, match=r"^model.encoder.window: must be None or >= 1"):
        apply_overrides(get_preset("tiny"), ["model.encoder.window=0"])
    with pytest.raises(ConfigError, match=r"^data.batch_size: expected an integer, got 2.5"):
        apply_overrides(get_preset("tiny"), ["data.batch_size=2.5"])
    bad = dataclasses.replace(get_preset("tiny").train, compute_dtype="float16")  # direct construction too
    with pytest.raises(ConfigError, match=r"^train.compute_dtype: must be one of \('float32', 'bfloat16'\)"):
        bad.validate()


def test_presets_moved_but_old_imports_still_work():
    from blt_jax.config import PRESETS as old_presets, get_preset as old_get_preset  # noqa: PLC0415

    assert old_presets is PRESETS and old_get_preset is get_preset
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        get_preset("nope")
    with pytest.raises(AttributeError):
        config.no_such_name  # noqa: B018
