"""Interop with transformers' `BltForCausalLM` checkpoints (a `save_pretrained` folder: config.json +
safetensors), both ways, with no torch needed: weights are read and written with safetensors' NumPy API.

Names map one to one (our module tree mirrors transformers'): `a.b.weight` <-> `a/b/{kernel|embedding|scale}`,
kernels transposed ((out, in) <-> (in, out)), the entropy model under `model.patcher.`, the LM head at the top.
Config values this implementation does not support are refused, naming the field; nothing is mapped silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from blt_jax import model as model_lib
from blt_jax.config import (BLTConfig, ConfigError, DataConfig, DiffusionConfig, EntropyModelConfig, PatchingConfig,
                            RunConfig, StackConfig)


class UnsupportedConfig(ConfigError):
    """A transformers config value (or tensor) blt_jax cannot represent exactly; the message names it."""


# config.json's key for what transformers has no field for (it keeps unknown keys as attributes, unused), so an
# export imports back as the model it was: the whole patching (transformers' fields hold the mode, threshold and
# max_patch_length, not blt_jax's own rules: causal max_patch_length, document starts, patch slots), document
# masking, and a BLT-D model's diffusion settings (so the import still runs --method d/dv, cached). Not carried:
# what transformers would run differently (a global window, different encoder and decoder windows, static or
# space patching, other entropy rules): export refuses those. A config.json without the key (a transformers
# checkpoint) imports with transformers' semantics.
EXTRA_KEY = "blt_jax"
CARRIED = {"patching": PatchingConfig, "document_masking": bool, "diffusion": DiffusionConfig}


def _carried(hf: dict) -> dict:
    """config.json's `EXTRA_KEY` object, rebuilt: {name: PatchingConfig | bool | DiffusionConfig}; whatever is
    unknown or invalid is refused in one line naming the key."""
    extra = hf.get(EXTRA_KEY) or {}
    if not isinstance(extra, dict):
        raise UnsupportedConfig(f"{EXTRA_KEY}: expected an object of {', '.join(CARRIED)}, got {extra!r}")
    out = {}
    for key, value in extra.items():
        name, cls = f"{EXTRA_KEY}.{key}", CARRIED.get(key)
        if cls is None:
            raise UnsupportedConfig(f"{name}: not a setting blt_jax carries (known: {', '.join(CARRIED)})")
        if cls is bool:
            if not isinstance(value, bool):
                raise UnsupportedConfig(f"{name}: expected true/false, got {value!r}")
            out[key] = value
            continue
        if not isinstance(value, dict):
            raise UnsupportedConfig(f"{name}: expected an object of {cls.__name__} fields, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        if set(value) - known:
            raise UnsupportedConfig(f"{name}.{sorted(set(value) - known)[0]}: not a {key} setting "
                                    f"(known: {', '.join(sorted(known))})")
        try:
            out[key] = cls(**value)
            out[key].validate(name)
        except ConfigError as e:
            raise UnsupportedConfig(str(e)) from None
    return out


# ---- configs ----------------------------------------------------------------------------------------------

def _rope_theta(sub: dict, default: float, name: str) -> float:
    rope = sub.get("rope_parameters") or sub.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise UnsupportedConfig(f"{name}.rope_parameters.rope_type: only 'default' RoPE is supported, "
                                f"got {rope.get('rope_type')!r}")
    return float(rope.get("rope_theta", sub.get("rope_theta", default)))


def _stack(sub: dict, name: str, window: Optional[int], default_theta: float) -> StackConfig:
    act = sub.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedConfig(f"{name}.hidden_act: only 'silu' (SwiGLU) is supported, got {act!r}")
    d, heads = int(sub["hidden_size"]), int(sub["num_attention_heads"])
    ffn = sub.get("intermediate_size") or int(8 * d / 3)
    kv = int(sub.get("num_key_value_heads") or heads)
    return StackConfig(dim=d, n_layers=int(sub["num_hidden_layers"]), n_heads=heads,
                       n_kv_heads=kv if kv != heads else None, ffn_dim=int(ffn),  # None: no GQA, as blt_jax writes it
                       rope_theta=_rope_theta(sub, default_theta, name), window=window,
                       norm_eps=float(sub.get("rms_norm_eps", 1e-5)))


def config_from_hf(hf: dict) -> BLTConfig:
    """transformers `BltConfig` (as in config.json) -> BLTConfig."""
    if hf.get("model_type") not in (None, "blt"):
        raise UnsupportedConfig(f"model_type: expected 'blt', got {hf.get('model_type')!r}")
    if hf.get("tie_word_embeddings"):
        raise UnsupportedConfig("tie_word_embeddings: tied LM head / byte embedding is not supported")
    enc, dec, glob, pat = (hf.get(k) or {} for k in ("encoder_config", "decoder_config", "global_config",
                                                      "patcher_config"))
    window = hf.get("local_attention_window_len", 512)
    if dec.get("sliding_window") not in (None, window):
        raise UnsupportedConfig(f"decoder_config.sliding_window: transformers uses the encoder's window for the "
                                f"decoder; a different value ({dec.get('sliding_window')}) has no meaning there")
    k = int(hf.get("cross_attn_k", 2))
    for name, sub in (("encoder_config", enc), ("decoder_config", dec)):
        if int(sub.get("cross_attn_k", k)) != k:
            raise UnsupportedConfig(f"{name}.cross_attn_k: must equal the top-level cross_attn_k={k}")
        if sub.get("hidden_size_global", glob.get("hidden_size")) != glob.get("hidden_size"):
            raise UnsupportedConfig(f"{name}.hidden_size_global: must equal global_config.hidden_size")
    mode = hf.get("patching_mode", "entropy")
    patch_in_forward = hf.get("patch_in_forward", True)
    if mode == "entropy" and patch_in_forward:
        pmode = "entropy"
    elif not patch_in_forward or mode != "entropy":
        pmode = "byte"  # transformers falls back to one byte per patch
    mpl, threshold = hf.get("max_patch_length"), hf.get("patching_threshold", 1.335442066192627)
    patching = PatchingConfig(mode=pmode, threshold=None if threshold is None else float(threshold),
                              max_patch_length=int(mpl) if mpl else None, max_patches=256,
                              drop_trailing_patch=mpl is not None, document_starts=False)
    carried = _carried(hf)
    native = carried.get("patching", patching)
    # an export's own patching, unless config.json's transformers fields now say otherwise (edited by hand):
    # neither reading is then safe to guess (transformers would run one, blt_jax the other), so refuse
    for f in ("mode", "rule", "threshold", "max_patch_length"):
        if getattr(native, f) != getattr(patching, f):
            raise UnsupportedConfig(f"{EXTRA_KEY}.patching.{f}: the exported run's {getattr(native, f)!r} disagrees "
                                    f"with config.json's transformers fields ({getattr(patching, f)!r}); make them "
                                    f"agree, or delete {EXTRA_KEY}.patching to import with transformers' patching")
    sizes = hf.get("encoder_hash_byte_group_size") or [3, 4, 5, 6, 7, 8]
    cfg = BLTConfig(
        encoder=_stack(enc, "encoder_config", window, 500_000.0),
        global_model=_stack(glob, "global_config", None, 500_000.0),
        decoder=_stack(dec, "decoder_config", window, 500_000.0),
        entropy_model=EntropyModelConfig(_stack(pat, "patcher_config", pat.get("sliding_window", 512), 10_000.0),
                                         vocab_size=int(pat.get("vocab_size", 260))),
        patching=native, vocab_size=int(hf.get("vocab_size", 260)), cross_attn_k=k,
        encoder_cross_attn_all_layers=bool(enc.get("cross_attn_all_layers", False)),
        decoder_cross_attn_all_layers=bool(dec.get("cross_attn_all_layers", True)),
        hash_ngram_sizes=tuple(int(s) for s in sizes),
        hash_vocab=int(hf.get("encoder_hash_byte_group_vocab", 500_002)),
        hash_functions=int(hf.get("encoder_hash_byte_group_nb_functions", 1)),
        document_masking=carried.get("document_masking", False),  # transformers attends across BOS
        diffusion=carried.get("diffusion", DiffusionConfig()),
    )
    cfg.validate("model")
    return cfg


def config_to_hf(cfg: BLTConfig) -> dict:
    """BLTConfig -> a transformers `BltConfig` dict (config.json)."""
    if cfg.encoder.window != cfg.decoder.window:
        raise UnsupportedConfig("model.decoder.window: transformers uses one local window for encoder and decoder")
    if cfg.global_model.window is not None:
        raise UnsupportedConfig("model.global_model.window: transformers' global transformer has no window")
    if cfg.patching.mode not in ("entropy", "byte"):
        raise UnsupportedConfig(f"model.patching.mode: transformers supports entropy or byte patching, "
                                f"not {cfg.patching.mode!r}")
    if cfg.patching.rule != "global":
        raise UnsupportedConfig("model.patching.rule: transformers supports the global threshold rule only")

    def sub(s: StackConfig, **extra) -> dict:
        return {"hidden_size": s.dim, "num_hidden_layers": s.n_layers, "num_attention_heads": s.n_heads,
                "num_key_value_heads": s.kv_heads, "intermediate_size": s.ffn_dim, "rms_norm_eps": s.norm_eps,
                "rope_parameters": {"rope_type": "default", "rope_theta": s.rope_theta}, **extra}

    g = cfg.global_model.dim
    return {
        "model_type": "blt", "architectures": ["BltForCausalLM"], "vocab_size": cfg.vocab_size,
        "patch_in_forward": cfg.patching.mode == "entropy", "patching_mode": cfg.patching.mode,
        "patch_size": 4, "patching_threshold": cfg.patching.threshold,
        "max_patch_length": cfg.patching.max_patch_length, "local_attention_window_len": cfg.encoder.window,
        "cross_attn_k": cfg.cross_attn_k, "encoder_hash_byte_group_size": list(cfg.hash_ngram_sizes),
        "encoder_hash_byte_group_vocab": cfg.hash_vocab,
        "encoder_hash_byte_group_nb_functions": cfg.hash_functions, "tie_word_embeddings": False,
        "use_cache": False,
        "encoder_config": sub(cfg.encoder, cross_attn_all_layers=cfg.encoder_cross_attn_all_layers,
                              cross_attn_k=cfg.cross_attn_k, hidden_size_global=g, vocab_size=cfg.vocab_size),
        "decoder_config": sub(cfg.decoder, cross_attn_all_layers=cfg.decoder_cross_attn_all_layers,
                              cross_attn_k=cfg.cross_attn_k, hidden_size_global=g, vocab_size=cfg.vocab_size),
        "global_config": sub(cfg.global_model),
        "patcher_config": sub(cfg.entropy_model.stack, sliding_window=cfg.entropy_model.stack.window,
                              vocab_size=cfg.entropy_model.vocab_size),
        EXTRA_KEY: {"patching": dataclasses.asdict(cfg.patching), "document_masking": cfg.document_masking,
                    "diffusion": dataclasses.asdict(cfg.diffusion)},
    }


# ---- weights ----------------------------------------------------------------------------------------------

def _hf_name(path: tuple, prefix: str) -> tuple[str, bool]:
    """Our flat-state path -> (transformers tensor name, is a (in, out) kernel to transpose)."""
    *module, leaf = (str(p) for p in path)
    name = ".".join(module)
    if prefix == "model." and name.startswith("lm_head"):
        return "lm_head.weight", True
    return f"{prefix}{name}.weight", leaf == "kernel"


def _fill(abstract_state: nnx.State, tensors: dict, prefix: str, used: set) -> nnx.State:
    flat = nnx.to_flat_state(abstract_state)
    out = []
    for path, var in flat:
        name, transpose = _hf_name(path, prefix)
        if name not in tensors:
            raise UnsupportedConfig(f"{name}: missing from the checkpoint (config and weights disagree)")
        w = np.asarray(tensors[name], np.float32)
        w = w.T if transpose else w
        if w.shape != tuple(var.shape):
            raise UnsupportedConfig(f"{name}: shape {w.shape} does not fit the config's {tuple(var.shape)}")
        used.add(name)
        out.append((path, var.replace(jnp.asarray(w))))
    return nnx.from_flat_state(out)


def params_from_hf(cfg: BLTConfig, tensors: dict) -> tuple[nnx.State, Optional[nnx.State]]:
    used: set = set()
    params = _fill(model_lib.abstract_state(cfg)[1], tensors, "model.", used)
    eparams = None
    if cfg.patching.mode == "entropy":
        eparams = _fill(model_lib.abstract_state(cfg.entropy_model)[1], tensors, "model.patcher.", used)
    extra = sorted(set(tensors) - used)
    if extra and not (cfg.patching.mode != "entropy" and all(n.startswith("model.patcher.") for n in extra)):
        raise UnsupportedConfig(f"{extra[0]}: a tensor this config has no place for ({len(extra)} unused)")
    return params, eparams


def params_to_hf(params: nnx.State, eparams: Optional[nnx.State]) -> dict[str, np.ndarray]:
    tensors = {}
    for state, prefix in ((params, "model."), (eparams, "model.patcher.")):
        if state is None:
            continue
        for path, var in nnx.to_flat_state(state):
            name, transpose = _hf_name(path, prefix)
            w = np.asarray(var[...], np.float32)
            tensors[name] = np.ascontiguousarray(w.T if transpose else w)
    return tensors


# ---- folders ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def new_folder(dst: str | Path, overwrite: bool, src: str | Path) -> Iterator[Path]:
    """Write a folder whole or not at all: into a staging folder beside `dst` that becomes `dst` once complete.
    An existing non-empty `dst` is refused unless `overwrite`, and then replaced only after the new one is
    written; a failure leaves `dst` as it was and no staging folder behind."""
    dst = Path(dst)
    _refuse_existing(dst, overwrite, src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if dst.exists():  # two renames: the old folder stays whole until the new one takes its name
            old = dst.parent / f".{dst.name}.replaced-{os.getpid()}"
            os.replace(dst, old)
            os.replace(staging, dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_hf_folder(src: str | Path) -> tuple[dict, dict]:
    from safetensors.numpy import load_file  # noqa: PLC0415

    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{src}: no config.json (expected a transformers save_pretrained folder)")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src}: no *.safetensors weights")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    tensors: dict = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # safetensors' own error type: a truncated or corrupt file
            raise ValueError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]}); was the download "
                             f"or copy cut short?") from None
    return hf_cfg, tensors


def import_hf(src: str | Path, dst: str | Path, overwrite: bool = False) -> BLTConfig:
    """A transformers folder -> a blt_jax checkpoint directory usable by `blt generate` / `blt eval`. `dst`
    must be new or empty unless `overwrite` (then it is replaced whole)."""
    from blt_jax.train import checkpoint as ckpt  # noqa: PLC0415

    _refuse_existing(dst, overwrite, src)
    hf_cfg, tensors = read_hf_folder(src)
    cfg = config_from_hf(hf_cfg)
    params, eparams = params_from_hf(cfg, tensors)
    # for `blt eval` / fine-tuning; enough patch slots that no byte is ever dropped (an export's carried
    # max_patches was sized for its run's own windows)
    seq_len = 1024
    cfg = dataclasses.replace(cfg, patching=dataclasses.replace(cfg.patching, max_patches=seq_len + 1))
    run = RunConfig(name=f"converted:{Path(src).name}", model=cfg, data=DataConfig(seq_len=seq_len, batch_size=8))
    with new_folder(dst, overwrite, src) as out:
        ckpt.write_run_meta(out, "blt", run, converted_from=str(Path(src).absolute()))
        ckpt.save_params(out / "params", params)
        if eparams is not None:
            ckpt.save_params(out / "entropy_model", eparams)
    return run.model


def export_hf(src: str | Path, dst: str | Path, overwrite: bool = False) -> None:
    """A blt_jax BLT run (latest checkpoint) -> a folder transformers loads with `from_pretrained`."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    from blt_jax.generation import api  # noqa: PLC0415

    _refuse_existing(dst, overwrite, src)
    model = api.load(str(src))
    hf_cfg = config_to_hf(model.cfg)
    with new_folder(dst, overwrite, src) as out:
        (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                                "pad_token_id": 0}, indent=2))
        save_file(params_to_hf(model.params, model.entropy_params), str(out / "model.safetensors"),
                  metadata={"format": "pt"})


def export_params(src: str | Path, dst: str | Path, step: Optional[int] = None, overwrite: bool = False) -> None:
    """A BLT run -> a parameters-only run directory (no optimizer state, no data pipeline state): a third of
    the checkpoint's size, what generation and evaluation load."""
    from blt_jax.generation import api  # noqa: PLC0415
    from blt_jax.train import checkpoint as ckpt  # noqa: PLC0415

    _refuse_existing(dst, overwrite, src)
    kind, run, _ = ckpt.load_run_config(src)
    model = api.load(str(src), step)
    with new_folder(dst, overwrite, src) as out:
        ckpt.write_run_meta(out, kind, run, exported_from=str(Path(src).absolute()))
        ckpt.save_params(out / "params", model.params)
        if model.entropy_params is not None:
            ckpt.save_params(out / "entropy_model", model.entropy_params)


# what a convert writes besides run.json: a transformers folder (export_hf), or a parameters-only run
# (import_hf, export_params)
CONVERT_OUTPUTS = frozenset({"config.json", "generation_config.json", "model.safetensors", "params", "entropy_model"})


def _refuse_existing(dst: str | Path, overwrite: bool, src: str | Path) -> None:
    """Refused before any work is done: an existing non-empty `dst` without `overwrite`, and, even with it, a
    `dst` that is the source or holds it (replacing `dst` whole would delete the run being converted), or that
    is not a model folder: `--overwrite` replaces a blt_jax run or an earlier convert's output, never a data
    store, a file or a folder of other files (a probe: a one-word slip deleted a corpus and a data store)."""
    dst = Path(dst)
    if "://" not in str(src) and dst.resolve() in (Path(src).resolve(), *Path(src).resolve().parents):
        raise ValueError(f"{dst}: holds the source {src}, which writing there would delete; choose another folder")
    from blt_jax.train.checkpoint import RUN_META  # noqa: PLC0415

    if overwrite and dst.exists() and not (dst / RUN_META).is_file():  # not a blt_jax run
        only = "--overwrite replaces only a run or an earlier convert's output: choose another folder, or remove it"
        if not dst.is_dir():
            raise ValueError(f"{dst}: is a file, not a model folder; {only} yourself")
        foreign = sorted(p.name for p in dst.iterdir() if p.name not in CONVERT_OUTPUTS)
        if foreign:
            raise ValueError(f"{dst}: is not a model folder (it holds {', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); {only} yourself")
    if dst.exists() and not overwrite and not dst.is_dir():
        raise FileExistsError(f"{dst}: exists and is a file; pass --overwrite to replace it, or choose a new folder")
    if dst.exists() and not overwrite and any(dst.iterdir()):
        raise FileExistsError(f"{dst}: exists and is not empty; pass --overwrite to replace it, or choose a new "
                              f"folder")
