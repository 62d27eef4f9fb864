"""Generation cost: the Fast BLT paper's memory-bandwidth proxy (Eq. 8) next to what was measured.

Eq. 8: BW [GB] = b * (N_dec * P_dec + N_enc * (P_enc + P_glob)) / 1e9, with b = 2 bytes per parameter,
N_dec / N_enc the decoder and encoder+global calls per sequence. The paper counts neither the entropy model
nor the hash n-gram tables (docs/fast-blt.md §3, Eq. 8); P_enc includes the byte embedding and, when present, the
global input projection; P_dec includes the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

from blt_jax.config import BLTConfig

BYTES_PER_PARAM = 2

# The constants that reproduce every bandwidth cell of the paper's tables (docs/fast-blt.md §3).
PAPER_PARAMS = {"1b": {"decoder": 0.160e9, "encoder_global": 1.299e9},
                "3b": {"decoder": 0.160e9, "encoder_global": 2.846e9}}


@dataclass(frozen=True)
class ParamsForCost:
    decoder: float
    encoder_global: float

    @classmethod
    def of(cls, cfg: BLTConfig) -> "ParamsForCost":
        from blt_jax.model import param_counts  # noqa: PLC0415

        c = param_counts(cfg)
        return cls(decoder=float(c["decoder"]), encoder_global=float(c["encoder"] + c["global"]))


def eq8_bandwidth_gb(decoder_calls: float, global_calls: float, params: ParamsForCost,
                     bytes_per_param: int = BYTES_PER_PARAM) -> float:
    return bytes_per_param * (decoder_calls * params.decoder + global_calls * params.encoder_global) / 1e9
