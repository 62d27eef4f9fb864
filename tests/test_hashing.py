"""Hash n-gram ids must equal the reference's signed 64-bit arithmetic exactly (weights are tied to them)."""

import jax.numpy as jnp
import numpy as np
import pytest

from blt_jax.model.hashing import PRIMES, ngram_hash_ids, reference_hash_ids


@pytest.mark.parametrize("n", range(1, 9))
def test_hash_ids_equal_pure_python_int64_reference(n):
    rng = np.random.default_rng(n)
    tokens = rng.integers(0, 262, size=(3, 40))
    tokens[:, 0] = 1  # BOS, as in real sequences
    tokens[0, 5:15] = 259  # the largest byte id: maximises every product
    for prime in PRIMES:
        for vocab in (97, 500_002, 2**23 - 1):
            got = np.asarray(ngram_hash_ids(jnp.asarray(tokens), n, prime, vocab))
            want = reference_hash_ids(tokens, n, prime, vocab)
            np.testing.assert_array_equal(got, want, err_msg=f"n={n} prime={prime} vocab={vocab}")


def test_hash_wraps_and_is_nonnegative():
    """The sums overflow int64 for n >= 3 and some are negative before the floor modulo."""
    tokens = np.full((1, 16), 259)
    prime, n = PRIMES[0], 4
    raw = sum(259 * pow(prime, j, 1 << 64) for j in range(n)) % (1 << 64)
    assert raw >= 1 << 63, "fixture should exercise the negative (wrapped) branch"
    got = np.asarray(ngram_hash_ids(jnp.asarray(tokens), n, prime, 500_002))
    assert (got >= 0).all() and (got < 500_002).all()
    np.testing.assert_array_equal(got, reference_hash_ids(tokens, n, prime, 500_002))


def test_vocab_limit_is_enforced():
    with pytest.raises(ValueError, match="hash vocab"):
        ngram_hash_ids(jnp.zeros((1, 4), jnp.int32), 3, PRIMES[0], 2**23)
