"""Pure JAX: the chunked clipped sum against a plain loop, and how much padding it computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_dp import clipping, sampling
from keras_dp import step as dp_step


def naive_sum(w, rows, clip):
    total = np.zeros_like(w, dtype=np.float64)
    for row in rows:
        g = 2 * float(np.dot(w, row)) * row.astype(np.float64)  # ∇ (w·x)²
        total += g * min(1.0, clip / max(np.linalg.norm(g), 1e-12))
    return total


@pytest.mark.parametrize("chunk", [8, 3, 4, 1, 20])
def test_every_real_row_once_and_little_padding(chunk):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3,)).astype("float32")
    physical = 40 if chunk == 20 else 24
    rows = rng.normal(size=(physical, 3)).astype("float32") * 3

    def example_fn(params, row, index):
        return jnp.sum(params * row) ** 2, jnp.ones(())  # aux: 1 where the row was computed

    run = jax.jit(lambda m: clipping.clipped_sum(example_fn, w, rows, m, 1.0, chunk))
    for real in range(physical + 1):
        grad, losses, computed, nonfinite, _ = run(jnp.asarray(np.arange(physical) < real))
        np.testing.assert_allclose(grad, naive_sum(w, rows[:real], 1.0), rtol=1e-5, atol=1e-6)
        assert np.all(np.asarray(computed)[:real] == 1), (real, chunk)  # every real row
        padding = int(np.sum(computed)) - real  # the rest of the last chunk, no more
        assert padding == (-real) % chunk, (real, chunk)
        assert int(nonfinite) == 0


def test_chunks_over_several_shards_count_every_real_row_once():
    """Over shards the chunk loop runs under vmap (its count differs by shard, so a
    shard runs past its own last chunk): still each real row once, and padding never
    added."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3,)).astype("float32")
    rows = rng.normal(size=(40, 3)).astype("float32") * 3
    shards, physical = 2, 24  # 2 shards of 12 rows, chunks of 4

    def example_fn(params, row, index):
        return jnp.sum(params * row) ** 2, index

    def run(padded, mask):
        return clipping.clipped_sum(example_fn, w, jnp.asarray(rows)[padded], mask, 1.0, 4, shards)

    run = jax.jit(run)
    for real in range(physical + 1):
        indices = rng.choice(40, size=real, replace=False)
        padded, mask = sampling.shard_layout(np.sort(indices), physical, shards)
        grad, _, ids, nonfinite, _ = run(padded, jnp.asarray(mask))
        np.testing.assert_allclose(grad, naive_sum(w, rows[indices], 1.0), rtol=1e-5, atol=1e-5)
        assert sorted(np.asarray(ids)[mask].tolist()) == list(range(real))  # ranks 0..real-1
        assert int(nonfinite) == 0


def one_hot_run(physical, chunk, shards=1):
    """A jitted clipped sum whose row i has gradient e_i (norm 1 <= C): the sum is then
    the count of how often each row was summed."""

    def example_fn(params, row, index):
        return jnp.sum(params * row), jnp.ones(())

    eye = jnp.eye(physical, dtype=jnp.float32)
    params = jnp.zeros((physical,), jnp.float32)

    @jax.jit
    def run(mask):
        return clipping.clipped_sum(example_fn, params, eye, mask, 2.0, chunk, shards)

    return run


@pytest.mark.parametrize(
    "physical, chunk, reals",
    [
        (200, 50, [199, 197, 151, 149]),  # the review's cases: rows 196-197 summed twice
        (200, 100, [199, 193, 135]),  # rows 192-195 summed twice
        (144, 48, [139, 143, 97]),
        (260, 130, [259, 255, 131]),
    ],
)
def test_last_chunk_never_resums_rows(physical, chunk, reals):
    """``dynamic_slice`` clamps a start past the end; the last (tail) chunk must not count
    the rows it re-reads (it did: B = 199 at chunk 50 summed rows 196 and 197 twice)."""
    run = one_hot_run(physical, chunk)
    for real in reals:
        grad, _, _, _, _ = run(jnp.asarray(np.arange(physical) < real))
        np.testing.assert_array_equal(np.asarray(grad), (np.arange(physical) < real) * 1.0)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    shards=st.sampled_from([1, 2, 4]),
    chunk=st.integers(1, 128),
    chunks_per_shard=st.integers(1, 3),
    data=st.data(),
)
def test_each_real_row_is_summed_exactly_once(shards, chunk, chunks_per_shard, data):
    """Any chunk (1..128, powers of two or not), any shard count, any real count, shards
    of whole chunks or not (``step.step_chunk``: the usual-size batch of a one-pass
    model that auto sends to per-example gradients): the one-hot sum is exactly the
    mask, so no row is dropped, doubled, or padding added."""
    per_shard = chunk * chunks_per_shard + data.draw(st.integers(0, chunk - 1), label="extra")
    assert dp_step.step_chunk(per_shard, chunk) == chunk
    physical = per_shard * shards
    run = one_hot_run(physical, chunk, shards)
    counts = data.draw(
        st.lists(st.integers(0, physical), min_size=1, max_size=6, unique=True), label="real"
    )
    for real in counts + [physical, max(0, physical - 1)]:
        _, mask = sampling.shard_layout(np.arange(real), physical, shards)
        grad, _, _, nonfinite, _ = run(jnp.asarray(mask))
        np.testing.assert_array_equal(np.asarray(grad), mask * 1.0, err_msg=f"{real} real")
        assert int(nonfinite) == 0
