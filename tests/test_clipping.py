"""Pure JAX: the chunked clipped sum against a plain loop, and how much padding it computes."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from keras_dp import clipping


def naive_sum(w, rows, clip):
    total = np.zeros_like(w, dtype=np.float64)
    for row in rows:
        g = 2 * float(np.dot(w, row)) * row.astype(np.float64)  # ∇ (w·x)²
        total += g * min(1.0, clip / max(np.linalg.norm(g), 1e-12))
    return total


def test_tail_size():
    assert [clipping.tail_size(c) for c in (1, 2, 3, 4, 6, 8, 16, 64)] == [1, 2, 3, 2, 3, 2, 4, 16]


@pytest.mark.parametrize("chunk", [8, 3])
def test_every_real_row_once_and_little_padding(chunk):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3,)).astype("float32")
    physical = 24
    rows = rng.normal(size=(physical, 3)).astype("float32") * 3

    def example_fn(params, row, index):
        return jnp.sum(params * row) ** 2, jnp.ones(())  # aux: 1 where the row was computed

    tail = clipping.tail_size(chunk)
    for real in range(physical + 1):
        mask = np.arange(physical) < real
        grad, losses, computed, nonfinite = clipping.clipped_sum(
            example_fn, jnp.asarray(w), jnp.asarray(rows), jnp.asarray(mask), 1.0, chunk
        )
        np.testing.assert_allclose(grad, naive_sum(w, rows[:real], 1.0), rtol=1e-5, atol=1e-6)
        whole = real // chunk * chunk
        expected = whole + math.ceil((real - whole) / tail) * tail
        assert int(np.sum(computed)) == expected, (real, chunk)
        assert int(nonfinite) == 0
