"""Hash n-gram ids of the BLT encoder, exact to the reference's signed 64-bit arithmetic, in int32.

The reference computes, for every position t and n-gram size n,
    h = sum_{j<n} w_j * prime**j   (int64, wrapping),   id = h mod vocab (floor modulo, non-negative)
over the window w = ids[t-n+1 .. t] left-padded with zeros (w_0 is the oldest id). JAX runs without x64,
so the 64-bit sum is carried in four 16-bit limbs held in int32, then reduced modulo `vocab` by Horner's
rule over 8-bit digits (needs vocab < 2**23). The result equals the int64 computation bit for bit.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

PRIMES = (1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899, 9576890767,
          3628273133, 2860486313, 5463458053, 3367900313)

_MASK64 = (1 << 64) - 1


def _power_limbs(prime: int, n: int) -> np.ndarray:
    """(n, 4) 16-bit limbs of prime**j mod 2**64, least significant limb first."""
    out = np.zeros((n, 4), np.int32)
    for j in range(n):
        p = pow(prime, j, 1 << 64)
        for limb in range(4):
            out[j, limb] = (p >> (16 * limb)) & 0xFFFF
    return out


def ngram_windows(tokens: jnp.ndarray, n: int) -> jnp.ndarray:
    """(B, L) -> (B, L, n): the n ids ending at each position, oldest first, zero left-padded."""
    B, L = tokens.shape
    padded = jnp.concatenate([jnp.zeros((B, n - 1), tokens.dtype), tokens], axis=1)
    return jnp.stack([padded[:, j:j + L] for j in range(n)], axis=-1)


def ngram_hash_ids(tokens: jnp.ndarray, n: int, prime: int, vocab: int) -> jnp.ndarray:
    """Hash ids (B, L) int32 of the n-grams ending at each position of `tokens` (B, L); ids < 2**9."""
    if not 2 <= vocab < 2**23:
        raise ValueError(f"hash vocab must lie in [2, 2**23), got {vocab}")
    w = ngram_windows(tokens.astype(jnp.int32), n)  # (B, L, n), each < 2**9
    limbs = jnp.asarray(_power_limbs(prime, n))  # (n, 4), each < 2**16
    acc = (w[..., :, None] * limbs[None, None]).sum(axis=-2)  # (B, L, 4); < n * 2**25 <= 2**29 for n <= 16: fits int32
    # carry-propagate into four exact 16-bit limbs of (sum mod 2**64)
    digits = []
    carry = jnp.zeros_like(acc[..., 0])
    for k in range(4):
        v = acc[..., k] + carry
        digits.append(v & 0xFFFF)
        carry = v >> 16
    # value mod vocab by Horner over 8-bit digits, most significant first: r * 256 + d < 2**31
    r = jnp.zeros_like(digits[0])
    for k in reversed(range(4)):
        for shift in (8, 0):
            r = (r * 256 + ((digits[k] >> shift) & 0xFF)) % vocab
    # signed interpretation: negative iff bit 63 is set, in which case h = u - 2**64
    negative = digits[3] >= 0x8000
    two64_mod = (1 << 64) % vocab
    return jnp.where(negative, (r - two64_mod) % vocab, r).astype(jnp.int32)


def reference_hash_ids(tokens, n: int, prime: int, vocab: int) -> np.ndarray:
    """Pure-Python oracle: signed 64-bit wrap-around, then Python's floor modulo (used by tests)."""
    tokens = np.asarray(tokens)
    out = np.zeros(tokens.shape, np.int64)
    for b in range(tokens.shape[0]):
        row = [0] * (n - 1) + [int(x) for x in tokens[b]]
        for t in range(tokens.shape[1]):
            h = 0
            for j in range(n):
                h = (h + row[t + j] * pow(prime, j, 1 << 64)) & _MASK64
            if h >= 1 << 63:
                h -= 1 << 64
            out[b, t] = h % vocab
    return out
