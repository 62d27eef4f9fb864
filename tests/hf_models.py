"""Small random-init transformers `BltForCausalLM` models, built offline with fixed seeds (docs/transformers.md §6)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

PROMPT = b"The quick brown fox jumps over the lazy dog. 0123456789 "


def base_config() -> dict:
    """The reference test model: 3.4M parameters, mixed-length entropy patches once the patcher is scaled."""
    return dict(
        vocab_size=260, patch_in_forward=True, patching_mode="entropy", patch_size=4,
        patching_threshold=1.335442066192627, max_patch_length=None, local_attention_window_len=512,
        cross_attn_k=2, encoder_hash_byte_group_size=[3, 4, 5, 6, 7, 8], encoder_hash_byte_group_vocab=1024,
        encoder_hash_byte_group_nb_functions=1, use_cache=False, tie_word_embeddings=False,
        encoder_config=dict(hidden_size=128, num_attention_heads=4, num_hidden_layers=1, intermediate_size=341,
                            hidden_size_global=256, cross_attn_all_layers=False),
        decoder_config=dict(hidden_size=128, num_attention_heads=4, num_hidden_layers=2, intermediate_size=341,
                            hidden_size_global=256, cross_attn_all_layers=True),
        global_config=dict(hidden_size=256, num_attention_heads=4, num_hidden_layers=2, intermediate_size=682),
        patcher_config=dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=170),
    )


def variant(**changes) -> dict:
    """base_config() with nested overrides, e.g. variant(global_config={"hidden_size": 192})."""
    cfg = copy.deepcopy(base_config())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    g = cfg["global_config"]["hidden_size"]
    cfg["encoder_config"]["hidden_size_global"] = cfg["decoder_config"]["hidden_size_global"] = g
    return cfg


def build(cfg: dict, seed: int = 0, patcher_scale: float = 6.0):
    """A random-init model; the patcher head is scaled so its entropies straddle the threshold."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, BltConfig  # noqa: PLC0415

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(BltConfig(**cfg), attn_implementation="sdpa").eval()
    if model.model.patcher is not None:
        with torch.no_grad():
            model.model.patcher.lm_head.weight.mul_(patcher_scale)
    return model


def save(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def prompt_ids(prompt: bytes = PROMPT) -> np.ndarray:
    return np.array([[1] + [b + 4 for b in prompt]], np.int64)


def hf_forward(model, ids: np.ndarray):
    """(logits, patch lengths) from transformers, float32."""
    import torch  # noqa: PLC0415

    with torch.no_grad():
        t = torch.as_tensor(ids)
        logits = model(t).logits.numpy()
        lengths = None
        if model.model.patcher is not None:
            _, lengths, _ = model.model.patcher(t, patch_size=model.config.patch_size,
                                                threshold=model.config.patching_threshold,
                                                max_patch_length=model.config.max_patch_length)
            lengths = lengths.numpy()
    return logits, lengths


def hf_greedy(model, ids: np.ndarray, n: int) -> np.ndarray:
    """transformers' generate(use_cache=False), greedy, exactly n new tokens."""
    import torch  # noqa: PLC0415

    with torch.no_grad():
        out = model.generate(torch.as_tensor(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             use_cache=False, eos_token_id=None, pad_token_id=0)
    return out.numpy()[:, ids.shape[1]:]
