"""Analytic FLOPs per byte (BLT paper, Appendix B conventions: matmul FLOPs = 2 x MACs, embeddings and
hash lookups are free, the backward pass costs twice the forward).

Used for the FLOPs/s and MFU metrics and for FLOP-matched scaling experiments.
"""

from __future__ import annotations

from typing import Optional

from blt_jax.config import BLTConfig, EntropyModelConfig, StackConfig


def mean_attended(length: int, window: Optional[int]) -> float:
    """Average number of keys a causal query sees over a sequence of `length`, with a sliding window."""
    if length <= 0:
        return 0.0
    w = length if window is None else min(window, length)
    # positions 0..w-1 see t+1 keys; the rest see w keys
    return (w * (w + 1) / 2 + (length - w) * w) / length


def stack_flops_per_token(s: StackConfig, context: int) -> float:
    """Forward FLOPs of one token through a stack whose sequences are `context` tokens long."""
    dq, dkv = s.n_heads * s.head_dim, s.kv_heads * s.head_dim
    proj = 2 * (s.dim * dq + 2 * s.dim * dkv + dq * s.dim)
    ffn = 2 * 3 * s.dim * s.ffn_dim
    attn = 2 * 2 * dq * mean_attended(context, s.window)
    return s.n_layers * (proj + ffn + attn)


def cross_attn_flops(d: int, n_queries: float, n_kv: float, keys_per_query: float) -> float:
    """One cross-attention: q/o projections of the queries, k/v projections of the kv states, attention."""
    return 2 * 2 * d * d * n_queries + 2 * 2 * d * d * n_kv + 2 * 2 * d * keys_per_query * n_queries


def blt_forward_flops_per_byte(cfg: BLTConfig, seq_len: int, patch_len: float) -> dict[str, float]:
    """Forward FLOPs per byte, per component, for windows of `seq_len` bytes with mean patch length."""
    k, de, dd, dg = cfg.cross_attn_k, cfg.encoder.dim, cfg.decoder.dim, cfg.global_model.dim
    per_patch = 1.0 / patch_len
    n_patches = max(1, int(round(seq_len / patch_len)))
    enc = stack_flops_per_token(cfg.encoder, seq_len)
    enc += per_patch * 2 * de * k * de  # pooled patch -> k queries
    enc += cross_attn_flops(de, n_queries=k * per_patch, n_kv=1.0, keys_per_query=patch_len)
    glob = per_patch * stack_flops_per_token(cfg.global_model, n_patches)
    if cfg.has_global_projection:
        glob += per_patch * 2 * cfg.global_input_dim * dg
    n_cross = cfg.decoder.n_layers if cfg.decoder_cross_attn_all_layers else 1
    dec = stack_flops_per_token(cfg.decoder, seq_len)
    dec += per_patch * 2 * dg * k * dd  # latent -> k key/value vectors
    dec += n_cross * cross_attn_flops(dd, n_queries=1.0, n_kv=k * per_patch, keys_per_query=k)
    dec += 2 * dd * cfg.vocab_size  # LM head
    return {"encoder": enc, "global": glob, "decoder": dec, "total": enc + glob + dec}


def lm_forward_flops_per_token(cfg: EntropyModelConfig, seq_len: int) -> float:
    return stack_flops_per_token(cfg.stack, seq_len) + 2 * cfg.stack.dim * cfg.vocab_size


def train_flops_per_byte(model_cfg: BLTConfig | EntropyModelConfig, seq_len: int, patch_len: float = 4.0) -> float:
    """Forward + backward (3 x forward) FLOPs per trained byte."""
    if isinstance(model_cfg, EntropyModelConfig):
        return 3 * lm_forward_flops_per_token(model_cfg, seq_len)
    per_byte = blt_forward_flops_per_byte(model_cfg, seq_len, patch_len)
    # BLT-D decodes one block of B cells per patch besides the bytes: about B / patch_len decoder positions more
    cells = model_cfg.diffusion.block_size / patch_len
    return 3 * (per_byte["total"] + cells * per_byte["decoder"])


# Dense bfloat16 peak FLOP/s per chip (vendor specifications), the denominator of MFU (float32 runs are
# reported against it too, as MaxText and Levanter do). Matched against `jax.Device.device_kind`, first hit wins.
PEAK_FLOPS_PER_DEVICE: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; the PCIe card is lower (756e12)
    ("A100", 312e12),
    ("L4", 121e12),
)


def peak_flops_per_device(device_kind: str) -> Optional[float]:
    """The table's peak for a device kind, or None (CPUs: measure it, see experiments/train_throughput.py)."""
    for key, peak in PEAK_FLOPS_PER_DEVICE:
        if key.lower() in device_kind.lower():
            return peak
    return None
