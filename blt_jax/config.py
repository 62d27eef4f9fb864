"""Configuration as data: frozen dataclasses, named presets and `key=value` overrides.

Every field is validated when the dataclass is built; a bad value raises `ConfigError` whose message starts
with the dotted name of the offending field (e.g. `model.encoder.n_heads`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def ffn_dim_for(dim: int, multiplier: float = 1.0, multiple_of: int = 256) -> int:
    """The reference code's SwiGLU width: round_up(multiplier * floor(2 * 4d / 3), multiple_of)."""
    hidden = int(multiplier * int(2 * 4 * dim / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class StackConfig:
    """One stack of pre-norm transformer blocks (RMSNorm, RoPE self-attention with GQA, SwiGLU)."""

    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    n_kv_heads: Optional[int] = None  # None: same as n_heads (no GQA)
    rope_theta: float = 500_000.0
    window: Optional[int] = None  # sliding causal window in positions; None: full causal
    norm_eps: float = 1e-5

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self, name: str, min_layers: int = 1) -> None:
        _check(self.dim >= 1, f"{name}.dim", f"must be positive, got {self.dim}")
        _check(self.n_layers >= min_layers, f"{name}.n_layers", f"must be >= {min_layers}, got {self.n_layers}")
        _check(self.n_heads >= 1, f"{name}.n_heads", f"must be positive, got {self.n_heads}")
        _check(self.dim % self.n_heads == 0, f"{name}.n_heads",
               f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        _check(self.head_dim % 2 == 0, f"{name}.n_heads",
               f"head_dim = dim / n_heads = {self.head_dim} must be even for RoPE")
        _check(self.kv_heads >= 1 and self.n_heads % self.kv_heads == 0, f"{name}.n_kv_heads",
               f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}")
        _check(self.ffn_dim >= 1, f"{name}.ffn_dim", f"must be positive, got {self.ffn_dim}")
        _check(self.rope_theta > 0, f"{name}.rope_theta", f"must be positive, got {self.rope_theta}")
        _check(self.window is None or self.window >= 1, f"{name}.window",
               f"must be None (full causal) or >= 1, got {self.window}")
        _check(self.norm_eps > 0, f"{name}.norm_eps", f"must be positive, got {self.norm_eps}")


@dataclass(frozen=True)
class EntropyModelConfig:
    """The small causal byte LM whose next-byte entropy places patch boundaries."""

    stack: StackConfig
    vocab_size: int = 260

    def validate(self, name: str) -> None:
        self.stack.validate(f"{name}.stack")
        _check(self.vocab_size >= 260, f"{name}.vocab_size", f"must be >= 260 (bytes + 4 specials), got {self.vocab_size}")


PatchingMode = Literal["entropy", "static", "space", "byte"]
EntropyRule = Literal["global", "monotonic", "global_and_monotonic"]


@dataclass(frozen=True)
class PatchingConfig:
    """How bytes are grouped into patches. Rules follow the reference code (see `blt_jax.patching`)."""

    mode: PatchingMode = "entropy"
    threshold: Optional[float] = None  # nats; None: use the threshold calibrated into the data store
    rule: EntropyRule = "global"
    threshold_add: Optional[float] = None  # the monotonic margin of the `global_and_monotonic` rule
    max_patch_length: Optional[int] = None
    patch_size: int = 4  # static patching only
    max_patches: int = 256  # static number of patch slots per sequence (global model length)
    target_patch_length: float = 4.0  # calibration target, bytes per patch
    # transformers splits long patches after the fact and drops empty ones, so with max_patch_length its
    # last byte never reads its own patch's latent. True reproduces that (set for converted checkpoints);
    # it makes patching non-incremental at the newest byte, so cached samplers refuse it.
    drop_trailing_patch: bool = False
    # a BOS inside a sequence starts a patch of its own (documents are patched independently); transformers
    # treats a mid-sequence BOS as an ordinary byte, so converted checkpoints turn this off
    document_starts: bool = True

    def validate(self, name: str) -> None:
        _check(self.mode in typing.get_args(PatchingMode), f"{name}.mode",
               f"must be one of {typing.get_args(PatchingMode)}, got {self.mode!r}")
        _check(self.rule in typing.get_args(EntropyRule), f"{name}.rule",
               f"must be one of {typing.get_args(EntropyRule)}, got {self.rule!r}")
        _check(self.threshold is None or math.isfinite(self.threshold), f"{name}.threshold",
               f"must be a finite number or None, got {self.threshold}")
        _check(self.rule != "global_and_monotonic" or self.threshold_add is not None, f"{name}.threshold_add",
               "is required by rule='global_and_monotonic'")
        _check(self.max_patch_length is None or self.max_patch_length >= 1, f"{name}.max_patch_length",
               f"must be None or >= 1, got {self.max_patch_length}")
        _check(self.patch_size >= 1, f"{name}.patch_size", f"must be >= 1, got {self.patch_size}")
        _check(self.max_patches >= 2, f"{name}.max_patches", f"must be >= 2 (BOS patch + one more), got {self.max_patches}")
        _check(self.target_patch_length > 1.0, f"{name}.target_patch_length",
               f"must be > 1 byte, got {self.target_patch_length}")

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
class DiffusionConfig:
    """BLT-D: the block-wise masked-diffusion objective added to next-byte prediction (block_size 0 = off)."""

    block_size: int = 0  # B bytes per block, one block per patch after the first (paper: 4, 8, 16)
    t_min: float = 1e-3  # t ~ U(t_min, 1) per example: bounds the 1/t weight of the masked loss
    weight: float = 1.0  # L = L_clean + weight * L_mask (the paper's unweighted sum: 1)

    @property
    def enabled(self) -> bool:
        return self.block_size > 0

    def validate(self, name: str) -> None:
        _check(self.block_size >= 0, f"{name}.block_size", f"must be >= 0 (0 = plain BLT), got {self.block_size}")
        _check(0.0 < self.t_min < 1.0, f"{name}.t_min", f"must lie in (0, 1), got {self.t_min}")
        _check(self.weight >= 0.0, f"{name}.weight", f"must be >= 0, got {self.weight}")


@dataclass(frozen=True)
class BLTConfig:
    """The Byte Latent Transformer; parameter layout matches transformers' `BltForCausalLM`."""

    encoder: StackConfig
    global_model: StackConfig
    decoder: StackConfig
    entropy_model: EntropyModelConfig
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    vocab_size: int = 260
    cross_attn_k: int = 2
    encoder_cross_attn_all_layers: bool = False
    decoder_cross_attn_all_layers: bool = True
    hash_ngram_sizes: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    hash_vocab: int = 500_002
    hash_functions: int = 1
    document_masking: bool = True  # attention never crosses a BOS (document start)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    @property
    def global_input_dim(self) -> int:
        return self.encoder.dim * self.cross_attn_k

    @property
    def has_global_projection(self) -> bool:
        return self.global_input_dim != self.global_model.dim

    def validate(self, name: str = "model") -> None:
        self.encoder.validate(f"{name}.encoder")
        self.global_model.validate(f"{name}.global_model")
        self.decoder.validate(f"{name}.decoder")
        self.entropy_model.validate(f"{name}.entropy_model")
        self.patching.validate(f"{name}.patching")
        self.diffusion.validate(f"{name}.diffusion")
        _check(self.decoder.dim == self.encoder.dim, f"{name}.decoder.dim",
               f"must equal encoder.dim={self.encoder.dim} (the decoder consumes encoder byte states), got {self.decoder.dim}")
        _check(self.vocab_size >= 260, f"{name}.vocab_size", f"must be >= 260, got {self.vocab_size}")
        _check(self.cross_attn_k >= 1, f"{name}.cross_attn_k", f"must be >= 1, got {self.cross_attn_k}")
        _check(len(self.hash_ngram_sizes) >= 0 and all(1 <= n <= 16 for n in self.hash_ngram_sizes),
               f"{name}.hash_ngram_sizes", f"n-gram sizes must lie in 1..16, got {self.hash_ngram_sizes}")
        _check(2 <= self.hash_vocab < 2**23, f"{name}.hash_vocab",
               f"must lie in [2, 2**23) (the exact int32 hash reduction needs it), got {self.hash_vocab}")
        _check(self.hash_functions >= 0, f"{name}.hash_functions", f"must be >= 0, got {self.hash_functions}")


@dataclass(frozen=True)
class DataConfig:
    path: str = "runs/data"  # tensorstore root: a local folder or a URL (file://, gs://, memory://, ...)
    seq_len: int = 512  # bytes per training window (N); N+1 are read so all N positions get a target
    batch_size: int = 16  # global batch, in windows
    seed: int = 0
    worker_count: int = 0  # grain worker processes; iterator state depends on it (resume with the same value)

    def validate(self, name: str = "data") -> None:
        _check(self.seq_len >= 2, f"{name}.seq_len", f"must be >= 2, got {self.seq_len}")
        _check(self.batch_size >= 1, f"{name}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.worker_count >= 0, f"{name}.worker_count", f"must be >= 0, got {self.worker_count}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    learning_rate: float = 4e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    async_checkpoint: bool = True

    def validate(self, name: str = "train") -> None:
        _check(self.steps >= 1, f"{name}.steps", f"must be >= 1, got {self.steps}")
        _check(self.learning_rate > 0, f"{name}.learning_rate", f"must be positive, got {self.learning_rate}")
        _check(0 <= self.warmup_steps <= self.steps, f"{name}.warmup_steps",
               f"must lie in [0, steps={self.steps}], got {self.warmup_steps}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"{name}.min_lr_ratio", f"must lie in [0, 1], got {self.min_lr_ratio}")
        _check(self.weight_decay >= 0, f"{name}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"{name}.b1", f"betas must lie in [0, 1), got {self.b1}, {self.b2}")
        _check(self.grad_clip > 0, f"{name}.grad_clip", f"must be positive, got {self.grad_clip}")
        _check(self.compute_dtype in ("float32", "bfloat16"), f"{name}.compute_dtype",
               f"must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        _check(self.log_every >= 1, f"{name}.log_every", f"must be >= 1, got {self.log_every}")
        _check(self.eval_every >= 0, f"{name}.eval_every", f"must be >= 0, got {self.eval_every}")
        _check(self.eval_batches >= 1, f"{name}.eval_batches", f"must be >= 1, got {self.eval_batches}")
        _check(self.checkpoint_every >= 1, f"{name}.checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        _check(self.keep_checkpoints >= 1, f"{name}.keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")


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


@dataclass(frozen=True)
class MeshConfig:
    """The device mesh (axes data, fsdp, tensor) and how logical axis names map onto it.

    `ici_parallelism` shapes the devices of one slice (one TPU slice, or one host's GPUs); `dcn_parallelism`
    shapes the slices (multi-slice over the data-centre network; on CPU and GPU every process is a slice).
    One entry of each may be -1: filled with whatever the device count leaves.
    """

    ici_parallelism: tuple[int, ...] = (1, -1, 1)
    dcn_parallelism: tuple[int, ...] = (1, 1, 1)
    logical_axis_rules: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_LOGICAL_AXIS_RULES
    # parameters at least this large must be split over some mesh axis when the mesh has > 1 device
    min_sharded_param_bytes: int = 1 << 20

    @property
    def rules(self) -> dict[str, tuple[str, ...]]:
        return dict(self.logical_axis_rules)

    def validate(self, name: str = "mesh") -> None:
        for field_name in ("ici_parallelism", "dcn_parallelism"):
            shape = getattr(self, field_name)
            _check(len(shape) == len(MESH_AXES), f"{name}.{field_name}",
                   f"needs one entry per mesh axis {MESH_AXES}, got {list(shape)}")
            _check(all(n == -1 or n >= 1 for n in shape) and list(shape).count(-1) <= 1, f"{name}.{field_name}",
                   f"entries must be >= 1, with at most one -1 (auto-fill), got {list(shape)}")
        logical = [k for k, _ in self.logical_axis_rules]
        _check(len(set(logical)) == len(logical), f"{name}.logical_axis_rules",
               f"a logical axis is listed twice: {sorted(k for k in logical if logical.count(k) > 1)}")
        for key, axes in self.logical_axis_rules:
            _check(all(a in MESH_AXES for a in axes) and len(set(axes)) == len(axes), f"{name}.logical_axis_rules",
                   f"{key!r} maps to {list(axes)}; mesh axes are {MESH_AXES}, each at most once")
        _check(self.min_sharded_param_bytes >= 0, f"{name}.min_sharded_param_bytes",
               f"must be >= 0, got {self.min_sharded_param_bytes}")


@dataclass(frozen=True)
class RunConfig:
    """Everything one `blt train` run needs: the model, its data and the two training schedules."""

    name: str
    model: BLTConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # the BLT
    entropy_train: TrainConfig = field(default_factory=TrainConfig)  # the entropy model, trained first
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")
        self.entropy_train.validate("entropy_train")
        self.mesh.validate("mesh")
        needed = self.model.patching.min_patches_needed(self.data.seq_len)
        _check(self.model.patching.max_patches >= needed, "model.patching.max_patches",
               f"{self.model.patching.max_patches} slots cannot hold a {self.data.seq_len}-byte window "
               f"under {self.model.patching.mode} patching (needs at least {needed})")
        window = self.model.entropy_model.stack.window
        _check(window is None or window <= 1 << 20, "model.entropy_model.stack.window", f"too large: {window}")

    # ---- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return _from_dict(cls, d, "")


def _resolve_type(tp: Any) -> Any:
    if isinstance(tp, str):
        tp = eval(tp, globals())  # annotations are strings under `from __future__ import annotations`
    return tp


def _from_dict(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{sorted(unknown)[0]}: unknown field of {cls.__name__}")
    kwargs = {}
    for name, value in d.items():
        tp = _resolve_type(known[name].type)
        kwargs[name] = _coerce(tp, value, f"{prefix}.{name}" if prefix else name)
    return _build(cls, kwargs, prefix)


def _build(cls: type, kwargs: dict, prefix: str) -> Any:
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None
    return obj


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, name)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: must be one of {args}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[T, ...]
            return tuple(_coerce(args[0], v, name) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{name}: expected {len(args)} items, got {value!r}")
        return tuple(_coerce(a, v, name) for a, v in zip(args, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
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


# ---- presets --------------------------------------------------------------------------------------------

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

