"""Byte tokenizer: id = byte + 4, with the reference code's specials, plus BLT-D's reserved ids.

The released BLT vocabulary has 260 ids. BLT-D needs a [MASK] and a block [PAD]; rather than grow the
vocabulary (and break weight compatibility with 260-row checkpoints) they reuse two ids that byte-level
BLT never produces as input: [MASK] = 3 (the reference's BPE delimiter) and block [PAD] = 0 (BOE).
"""

from __future__ import annotations

import numpy as np

BOE_ID = 0  # beginning of example; also the padding id of packed batches
BOS_ID = 1
EOS_ID = 2
BPE_ID = 3
OFFSET = 4
VOCAB_SIZE = 260

MASK_ID = BPE_ID  # BLT-D's [MASK]
BLOCK_PAD_ID = BOE_ID  # BLT-D's block [PAD] (no loss)


def encode(text: str | bytes, bos: bool = True, eos: bool = False) -> np.ndarray:
    """Text (UTF-8) or raw bytes -> int32 token ids."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32) + OFFSET
    parts = ([np.array([BOS_ID], np.int32)] if bos else []) + [ids] + ([np.array([EOS_ID], np.int32)] if eos else [])
    return np.concatenate(parts)


def decode_bytes(ids) -> bytes:
    """Token ids -> raw bytes; specials (< OFFSET) are dropped."""
    arr = np.asarray(ids).reshape(-1)
    arr = arr[(arr >= OFFSET) & (arr < OFFSET + 256)]
    return (arr - OFFSET).astype(np.uint8).tobytes()


def decode(ids) -> str:
    return decode_bytes(ids).decode("utf-8", errors="replace")
