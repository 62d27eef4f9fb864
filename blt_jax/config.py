"""Configuration as data: frozen dataclasses and `key=value` overrides (named presets: `blt_jax.presets`).

Every field declares its constraint next to it (`constrained(...)`, kept in the field's metadata); one
validator checks the types (a `Literal` field holds one of its values, every float is finite), those
constraints, then each class's rules between fields, when a `RunConfig` is built. A bad value raises
`ConfigError` whose message starts with the dotted name of the offending field (e.g. `model.encoder.n_heads`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterator, Literal, Optional


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


# ---- constraints declared per field ------------------------------------------------------------------------

@dataclass(frozen=True)
class Constraint:
    """What a field's value must satisfy: a test and the words after "must be" (e.g. ">= 1")."""

    holds: Callable[[Any], bool]
    what: str


def at_least(low: float, why: str = "") -> Constraint:
    return Constraint(lambda v: v >= low, f">= {low}{why}")


def positive() -> Constraint:
    return Constraint(lambda v: v > 0, "positive")


def within(low: float, high: float, *, open_low: bool = False, open_high: bool = False, why: str = "") -> Constraint:
    """low <= v <= high, each end open (strict) on request; written as the interval, e.g. [0, 1)."""
    def holds(v):
        return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
    brackets = ("(" if open_low else "[") + f"{low}, {high}" + (")" if open_high else "]")
    return Constraint(holds, f"in {brackets}{why}")


def constrained(default: Any = dataclasses.MISSING, check: Optional[Constraint] = None, *,
                default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose value must satisfy `check` (None passes when the field is Optional)."""
    return field(default=default, default_factory=default_factory, metadata={"check": check})


def choices(literal_type: Any) -> tuple:
    """The values of a `Literal[...]` type, e.g. for a command-line option's `choices`."""
    return typing.get_args(literal_type)


# ---- the one validator -------------------------------------------------------------------------------------

@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> its resolved annotation (annotations are strings under `from __future__ import annotations`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _check_type(tp: Any, value: Any, name: str) -> None:
    """`value` fits the annotation `tp`; floats must be finite, a `Literal` one of its values."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return
        return _check_type(next(a for a in args if a is not type(None)), value, name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: must be one of {args}, got {value!r}")
    elif origin is tuple:
        if not isinstance(value, tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise ConfigError(f"{name}: expected {len(item_types)} items, got {list(value)}")
        for item_type, item in zip(item_types, value, strict=True):
            _check_type(item_type, item, name)
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name}: must be a finite number, got {value}")
    elif tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    elif tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    elif tp is str and not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    elif dataclasses.is_dataclass(tp) and not isinstance(value, tp):
        raise ConfigError(f"{name}: expected a {tp.__name__}, got {type(value).__name__}")


def validate(cfg: Any, name: str = "") -> None:
    """Check every field of the config dataclass `cfg` (recursively), then its rules between fields.
    `name` is the dotted path of `cfg` itself (messages start with the field's full path)."""
    types = _field_types(type(cfg))
    for f in fields(cfg):
        path = f"{name}.{f.name}" if name else f.name
        value = getattr(cfg, f.name)
        _check_type(types[f.name], value, path)
        check = f.metadata.get("check")
        if check is not None and value is not None and not check.holds(value):
            optional = type(None) in typing.get_args(types[f.name])
            raise ConfigError(f"{path}: must be {'None or ' if optional else ''}{check.what}, got {value!r}")
        if dataclasses.is_dataclass(value):
            validate(value, path)
    for field_name, holds, message in cfg.cross_field_checks():
        if not holds:
            raise ConfigError(f"{name}.{field_name}: {message}" if name else f"{field_name}: {message}")


class Validated:
    """Config dataclasses: `cross_field_checks()` yields (field, holds, message) for constraints between
    fields, checked in order after every field's own (so a check may rely on them); `validate()` runs the
    one validator."""

    section: ClassVar[str] = ""  # the dotted name this config usually has inside a RunConfig

    def cross_field_checks(self) -> Iterator[tuple[str, bool, str]]:
        return iter(())

    def validate(self, name: Optional[str] = None) -> None:
        validate(self, self.section if name is None else name)


def ffn_dim_for(dim: int, multiplier: float = 1.0, multiple_of: int = 256) -> int:
    """The reference code's SwiGLU width: round_up(multiplier * floor(2 * 4d / 3), multiple_of)."""
    hidden = int(multiplier * int(2 * 4 * dim / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# ---- the schema --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StackConfig(Validated):
    """One stack of pre-norm transformer blocks (RMSNorm, RoPE self-attention with GQA, SwiGLU)."""

    dim: int = constrained(check=positive())
    n_layers: int = constrained(check=at_least(1))
    n_heads: int = constrained(check=at_least(1))
    ffn_dim: int = constrained(check=positive())
    n_kv_heads: Optional[int] = constrained(None, at_least(1))  # None: same as n_heads (no GQA)
    rope_theta: float = constrained(500_000.0, positive())
    window: Optional[int] = constrained(None, at_least(1, " (None: full causal)"))  # sliding causal window
    norm_eps: float = constrained(1e-5, positive())

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def cross_field_checks(self):
        yield "n_heads", self.dim % self.n_heads == 0, f"dim={self.dim} is not divisible by n_heads={self.n_heads}"
        yield "n_heads", self.head_dim % 2 == 0, f"head_dim = dim / n_heads = {self.head_dim} must be even for RoPE"
        yield ("n_kv_heads", self.n_heads % self.kv_heads == 0,
               f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}")


@dataclass(frozen=True)
class EntropyModelConfig(Validated):
    """The small causal byte LM whose next-byte entropy places patch boundaries."""

    stack: StackConfig
    vocab_size: int = constrained(260, at_least(260, " (bytes + 4 specials)"))


PatchingMode = Literal["entropy", "static", "space", "byte"]
EntropyRule = Literal["global", "monotonic", "global_and_monotonic"]


@dataclass(frozen=True)
class PatchingConfig(Validated):
    """How bytes are grouped into patches. Rules follow the reference code (see `blt_jax.patching`)."""

    mode: PatchingMode = "entropy"
    threshold: Optional[float] = None  # nats; None: use the threshold calibrated into the data store
    rule: EntropyRule = "global"
    threshold_add: Optional[float] = None  # the monotonic margin of the `global_and_monotonic` rule
    max_patch_length: Optional[int] = constrained(None, at_least(1))
    patch_size: int = constrained(4, at_least(1))  # static patching only
    # static number of patch slots per sequence (global model length)
    max_patches: int = constrained(256, at_least(2, " (BOS patch + one more)"))
    target_patch_length: float = constrained(4.0, Constraint(lambda v: v > 1.0, "> 1 byte"))  # calibration target
    # transformers splits long patches after the fact and drops empty ones, so with max_patch_length its
    # last byte never reads its own patch's latent. True reproduces that (set for converted checkpoints);
    # it makes patching non-incremental at the newest byte, so cached samplers refuse it.
    drop_trailing_patch: bool = False
    # a BOS inside a sequence starts a patch of its own (documents are patched independently); transformers
    # treats a mid-sequence BOS as an ordinary byte, so converted checkpoints turn this off
    document_starts: bool = True

    def cross_field_checks(self):
        yield ("threshold_add", self.rule != "global_and_monotonic" or self.threshold_add is not None,
               "is required by rule='global_and_monotonic'")

    def min_patches_needed(self, seq_len: int) -> int:
        """Fewest patch slots that can hold `seq_len` bytes (+ the virtual next byte) under this config.

        Exact for static and byte patching; a lower bound for entropy and space patching.
        """
        if self.mode == "byte":
            return seq_len + 1
        if self.mode == "static":
            # BOS patch, then ceil((seq_len - 1) / k) patches, plus a trailing empty patch when the grid closes.
            return 1 + (seq_len - 1) // self.patch_size + 1
        if self.max_patch_length is not None:  # forced starts every max_patch_length bytes after BOS
            return 1 + (seq_len - 1) // self.max_patch_length + 1
        return 2


@dataclass(frozen=True)
class DiffusionConfig(Validated):
    """BLT-D: the block-wise masked-diffusion objective added to next-byte prediction (block_size 0 = off)."""

    # B bytes per block, one block per patch after the first (paper: 4, 8, 16)
    block_size: int = constrained(0, at_least(0, " (0 = plain BLT)"))
    # t ~ U(t_min, 1) per example: bounds the 1/t weight of the masked loss
    t_min: float = constrained(1e-3, within(0.0, 1.0, open_low=True, open_high=True))
    weight: float = constrained(1.0, at_least(0.0))  # L = L_clean + weight * L_mask (the paper's sum: 1)

    @property
    def enabled(self) -> bool:
        return self.block_size > 0


@dataclass(frozen=True)
class BLTConfig(Validated):
    """The Byte Latent Transformer; parameter layout matches transformers' `BltForCausalLM`."""

    section: ClassVar[str] = "model"

    encoder: StackConfig
    global_model: StackConfig
    decoder: StackConfig
    entropy_model: EntropyModelConfig
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    vocab_size: int = constrained(260, at_least(260))
    cross_attn_k: int = constrained(2, at_least(1))
    encoder_cross_attn_all_layers: bool = False
    decoder_cross_attn_all_layers: bool = True
    hash_ngram_sizes: tuple[int, ...] = constrained((3, 4, 5, 6, 7, 8), Constraint(
        lambda sizes: all(1 <= n <= 16 for n in sizes), "n-gram sizes in 1..16"))
    # the exact int32 hash reduction needs hash_vocab < 2**23
    hash_vocab: int = constrained(500_002, within(2, 2**23, open_high=True, why=" (the int32 hash reduction)"))
    hash_functions: int = constrained(1, at_least(0))
    document_masking: bool = True  # attention never crosses a BOS (document start)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    @property
    def global_input_dim(self) -> int:
        return self.encoder.dim * self.cross_attn_k

    @property
    def has_global_projection(self) -> bool:
        return self.global_input_dim != self.global_model.dim

    def cross_field_checks(self):
        yield ("decoder.dim", self.decoder.dim == self.encoder.dim,
               (f"must equal encoder.dim={self.encoder.dim} (the decoder consumes encoder byte states), "
                f"got {self.decoder.dim}"))


@dataclass(frozen=True)
class DataConfig(Validated):
    section: ClassVar[str] = "data"

    path: str = "runs/data"  # tensorstore root: a local folder or a URL (file://, gs://, memory://, ...)
    # bytes per training window (N); N+1 are read so all N positions get a target
    seq_len: int = constrained(512, at_least(2))
    batch_size: int = constrained(16, at_least(1))  # global batch, in windows
    seed: int = 0
    # grain worker processes; iterator state depends on it (resume with the same value)
    worker_count: int = constrained(0, at_least(0))


ComputeDtype = Literal["float32", "bfloat16"]


@dataclass(frozen=True)
class TrainConfig(Validated):
    section: ClassVar[str] = "train"

    steps: int = constrained(1000, at_least(1))
    learning_rate: float = constrained(4e-4, positive())
    warmup_steps: int = constrained(100, at_least(0))
    min_lr_ratio: float = constrained(0.0, within(0.0, 1.0))  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = constrained(0.1, at_least(0.0))
    b1: float = constrained(0.9, within(0.0, 1.0, open_high=True))
    b2: float = constrained(0.95, within(0.0, 1.0, open_high=True))
    eps: float = constrained(1e-8, at_least(0.0))
    grad_clip: float = constrained(1.0, positive())
    compute_dtype: ComputeDtype = "float32"
    remat: bool = False
    seed: int = 0
    log_every: int = constrained(10, at_least(1))
    eval_every: int = constrained(0, at_least(0, " (0: only at the end)"))
    eval_batches: int = constrained(8, at_least(1))
    checkpoint_every: int = constrained(200, at_least(1))
    keep_checkpoints: int = constrained(3, at_least(1))
    async_checkpoint: bool = True

    def cross_field_checks(self):
        yield ("warmup_steps", self.warmup_steps <= self.steps,
               f"must lie in [0, steps={self.steps}], got {self.warmup_steps}")


MESH_AXES = ("data", "fsdp", "tensor")

# One table for every logical axis name a parameter or activation carries -> the mesh axes it is split over.
# A dimension takes each listed mesh axis that is still free and divides it evenly; otherwise that axis is
# skipped (the dimension stays replicated over it, which `sharding.check_params_sharded` reports for large
# parameters). Parameters: FSDP over the model dimension, tensor parallelism over heads / MLP / vocabulary.
# Activations: the batch over data and fsdp.
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # parameters
    ("embed", ("fsdp",)),
    ("q_heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("latent", ("tensor",)),
    ("hash_vocab", ("tensor",)),
    ("norm", ()),
    # activations and caches
    ("batch", ("data", "fsdp")),
    ("length", ()),
    ("act_embed", ()),
)

# one entry per mesh axis, each >= 1 or a single -1 that is filled with whatever the device count leaves
MESH_SHAPE = Constraint(lambda shape: len(shape) == len(MESH_AXES) and all(n == -1 or n >= 1 for n in shape)
                        and list(shape).count(-1) <= 1,
                        f"one entry per mesh axis {MESH_AXES}, each >= 1, with at most one -1 (auto-fill)")


@dataclass(frozen=True)
class MeshConfig(Validated):
    """The device mesh (axes data, fsdp, tensor) and how logical axis names map onto it.

    `ici_parallelism` shapes the devices of one slice (one TPU slice, or one host's GPUs); `dcn_parallelism`
    shapes the slices (multi-slice over the data-centre network; on CPU and GPU every process is a slice).
    One entry of each may be -1: filled with whatever the device count leaves.
    """

    section: ClassVar[str] = "mesh"

    ici_parallelism: tuple[int, ...] = constrained((1, -1, 1), MESH_SHAPE)
    dcn_parallelism: tuple[int, ...] = constrained((1, 1, 1), MESH_SHAPE)
    logical_axis_rules: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_LOGICAL_AXIS_RULES
    # parameters at least this large must be split over some mesh axis when the mesh has > 1 device
    min_sharded_param_bytes: int = constrained(1 << 20, at_least(0))

    @property
    def rules(self) -> dict[str, tuple[str, ...]]:
        return dict(self.logical_axis_rules)

    def cross_field_checks(self):
        logical = [k for k, _ in self.logical_axis_rules]
        yield ("logical_axis_rules", len(set(logical)) == len(logical),
               f"a logical axis is listed twice: {sorted(k for k in logical if logical.count(k) > 1)}")
        for key, axes in self.logical_axis_rules:
            yield ("logical_axis_rules", all(a in MESH_AXES for a in axes) and len(set(axes)) == len(axes),
                   f"{key!r} maps to {list(axes)}; mesh axes are {MESH_AXES}, each at most once")


@dataclass(frozen=True)
class RunConfig(Validated):
    """Everything one `blt train` run needs: the model, its data and the two training schedules."""

    name: str
    model: BLTConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # the BLT
    entropy_train: TrainConfig = field(default_factory=TrainConfig)  # the entropy model, trained first
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def __post_init__(self):
        self.validate()

    def cross_field_checks(self):
        needed = self.model.patching.min_patches_needed(self.data.seq_len)
        yield ("model.patching.max_patches", self.model.patching.max_patches >= needed,
               (f"{self.model.patching.max_patches} slots cannot hold a {self.data.seq_len}-byte window "
                f"under {self.model.patching.mode} patching (needs at least {needed})"))
        window = self.model.entropy_model.stack.window
        yield "model.entropy_model.stack.window", window is None or window <= 1 << 20, f"too large: {window}"

    # ---- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return _from_dict(cls, d, "")


# ---- parsing: JSON-like data and `--set key=value` -> configs ----------------------------------------------

def _from_dict(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(d).__name__}")
    types = _field_types(cls)
    unknown = set(d) - set(types)
    if unknown:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{min(unknown)}: unknown field of {cls.__name__}")
    kwargs = {name: _coerce(types[name], value, f"{prefix}.{name}" if prefix else name) for name, value in d.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """JSON values -> the annotated type where JSON cannot say it (tuples, nested dataclasses, an int for a
    float); anything else passes through unchanged for the validator to judge."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, name)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, name)
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[T, ...]
            return tuple(_coerce(args[0], v, name) for v in value)
        if len(args) != len(value):
            return tuple(value)
        return tuple(_coerce(a, v, name) for a, v in zip(args, value, strict=True))
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _parse_literal(text: str) -> Any:
    """`--set` values: JSON (numbers, true/false/null, lists, quoted strings), else a bare string."""
    low = text.strip()
    if low in ("None", "none"):
        return None
    if low in ("True", "False"):
        return low == "True"
    try:
        return json.loads(low)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `a.b.c=value` overrides; unknown keys and bad values raise `ConfigError` naming the key."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: an override must look like key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        node = d
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node, dict) or p not in node or not isinstance(node[p], dict):
                raise ConfigError(f"{'.'.join(parts[:i + 1])}: unknown config section (in override {item!r})")
            node = node[p]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"{key}: unknown config field")
        node[parts[-1]] = _parse_literal(text)
    return RunConfig.from_dict(d)


def __getattr__(name: str) -> Any:
    """`PRESETS` and `get_preset` moved to `blt_jax.presets`; these names keep older imports working."""
    if name in ("PRESETS", "get_preset"):
        from blt_jax import presets  # noqa: PLC0415 (presets import this module)

        return getattr(presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
