"""The noise generator against JAX's own: the same draws, bit for bit, and Gaussian."""

import re

import jax
import jax.extend.random
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from keras_dp import _backend, noise

shapes = st.lists(
    st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple), min_size=1, max_size=6
)


@settings(max_examples=25, deadline=None)
@given(
    k0=st.integers(0, 2**32 - 1),
    k1=st.integers(0, 2**32 - 1),
    start=st.integers(0, 2**32 - 65),
)
def test_unrolled_threefry_is_jax_threefry(k0, k1, start):
    keys = jnp.asarray([k0, k1], jnp.uint32)
    counts = jnp.arange(start, start + 64, dtype=jnp.uint32)
    hi = jnp.asarray(np.random.default_rng(k0).integers(0, 2**32, 64, dtype=np.uint32))
    expected = jax.extend.random.threefry_2x32(keys, jnp.concatenate([hi, counts]))
    got = noise.threefry2x32(keys[0], keys[1], hi, counts)
    np.testing.assert_array_equal(np.concatenate(got), expected)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), step=st.integers(-(2**31), 2**31 - 1))
def test_step_keys_are_jax_fold_in_bit_for_bit(seed, step):
    words = noise.seed_words(seed)
    low = jax.random.key(jnp.uint32(words[1]))
    step = jnp.int32(step)  # the step's count, as the train step holds it
    expected = jax.random.fold_in(jax.random.fold_in(low, words[0]), step)

    def ours(words, step):
        return jax.random.key_data(noise.step_key(noise.root_key(words), step))

    for got in (ours(words, step), jax.jit(ours)(words, step)):
        np.testing.assert_array_equal(got, jax.random.key_data(expected))
    assert jax.random.key_impl(noise.root_key(seed)) == jax.random.key_impl(low)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    steps=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=5),
    impl=st.sampled_from(["threefry2x32", "rbg"]),
)
def test_host_step_keys_are_jax_fold_in_bit_for_bit(seed, steps, impl):
    """The key data fed with each batch (hashed on the host with NumPy) is the data of
    JAX's own fold_in(fold_in(key(low), high), step), and wraps back into that key."""
    high, low = (int(w) for w in noise.seed_words(seed))
    with jax.default_prng_impl(impl):
        got = noise.step_key_data(seed, steps)
        root = jax.random.fold_in(jax.random.key(jnp.uint32(low)), high)
        for words, step in zip(got, steps):
            expected = jax.random.fold_in(root, step)
            np.testing.assert_array_equal(words, jax.random.key_data(expected))
            key = noise.wrap_step_key(jnp.asarray(words))
            assert str(jax.random.key_impl(key)) == str(jax.random.key_impl(expected))
    assert got.dtype == np.uint32 and got.shape[0] == len(steps)


def test_other_default_generators_keep_jax_fold_in():
    with jax.default_prng_impl("rbg"):
        root = noise.root_key(2**40 + 3)
        expected = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 2**8), 7)
        got = noise.step_key(root, 7)
    assert str(jax.random.key_impl(got)) == str(jax.random.key_impl(expected))
    np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(expected))


def jax_draws(key, size: int) -> jax.Array:
    """The first ``size`` of ``jax.random.normal(key, (whole blocks,))``: what
    gaussian_like lays over the leaves, bit for bit."""
    return jax.random.normal(key, (noise.whole_blocks(size),), jnp.float32)[:size]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), step=st.integers(0, 10**6), shapes=shapes)
def test_leaves_hold_jax_random_normal_of_the_total_size(seed, step, shapes):
    """The leaves hold JAX's draw: bit for bit that of the whole blocks drawn, and that
    of the total size to the float transform's rounding (XLA may round a vectorised
    loop and its scalar remainder apart: 1 ulp in one of 402 draws with jax 0.8)."""
    key = noise.step_key(noise.root_key(seed), jnp.int32(step))
    tree = {f"leaf{i}": jnp.zeros(s) for i, s in enumerate(shapes)}
    draws, scaled = jax.jit(lambda k: [noise.gaussian_like(k, tree, s) for s in (1.0, 2.5)])(key)
    flat = jnp.concatenate([d.reshape(-1) for d in jax.tree.leaves(draws)])  # tree order
    expected = jax_draws(key, flat.size)
    np.testing.assert_array_equal(flat, expected)
    total = jax.random.normal(key, (flat.size,), jnp.float32)
    np.testing.assert_allclose(flat, total, rtol=1e-6, atol=0)
    assert all(draws[name].shape == scaled[name].shape == tree[name].shape for name in tree)
    # ×2.5 may be folded into the transform's ×√2 by XLA: equal to an ulp.
    scaled = jnp.concatenate([d.reshape(-1) for d in jax.tree.leaves(scaled)])
    np.testing.assert_allclose(scaled, 2.5 * expected, rtol=2e-7, atol=0)


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu", "accelerator"])
@pytest.mark.parametrize("leaves", [16, 17, 40])
def test_many_leaves_hold_the_same_draw(leaves, on_cpu, monkeypatch):
    """Also as built for an accelerator (no conditional: the draw is left to XLA)."""
    monkeypatch.setattr(_backend, "on_cpu", lambda: on_cpu)
    key = noise.step_key(noise.root_key(11), jnp.int32(2))
    tree = [jnp.zeros((i % 5, 3)) for i in range(leaves)]
    draws = jax.jit(lambda k: noise.gaussian_like(k, tree, 1.0))(key)
    flat = jnp.concatenate([d.reshape(-1) for d in draws])
    np.testing.assert_array_equal(flat, jax_draws(key, flat.size))


def test_the_steps_compiler_options_keep_the_draw_bit_for_bit():
    """keras_dp's train step is compiled with ``_backend.compiler_options()`` (on a
    CPU, 512-bit vectors where XLA's default is 256): the draw is still JAX's, bit for
    bit, in the vectorised loop and in its remainder (an odd-sized leaf)."""
    options = _backend.compiler_options()
    on_cpu = _backend.cpu_compiler_options(_backend.jaxlib_version())
    assert options == (on_cpu if _backend.on_cpu() else None)
    key = noise.step_key(noise.root_key(5), jnp.int32(3))
    tree = [jnp.zeros((84_170,)), jnp.zeros((7, 3)), jnp.zeros(1)]
    draw = jax.jit(lambda k: noise.gaussian_like(k, tree, 1.0), compiler_options=options)
    flat = jnp.concatenate([d.reshape(-1) for d in draw(key)])
    np.testing.assert_array_equal(flat, jax_draws(key, flat.size))


@pytest.mark.parametrize(
    ("version", "products_in_xla"),
    [((0, 8, 0), False), ((0, 9, 2), False), ((0, 10, 0), True), ((0, 10, 2), True)],
)
def test_the_steps_products_leave_ynnpack_only_on_a_jaxlib_that_has_the_option(
    version, products_in_xla
):
    """jaxlib 0.8.0 fails a compile with an option it does not know: the step's
    options name the library fusions only from jaxlib 0.10, where they were measured."""
    options = _backend.cpu_compiler_options(version)
    assert options["xla_cpu_prefer_vector_width"] == 512
    fusions = options.get("xla_cpu_experimental_ynn_fusion_type")
    assert fusions == ("LIBRARY_FUSION_TYPE_REDUCE" if products_in_xla else None)
    assert _backend.jaxlib_version() == tuple(int(p) for p in jax.lib.__version__.split(".")[:3])


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_other_generators_are_drawn_by_jax(impl):
    key = jax.random.key(7, impl=impl)
    draws = noise.gaussian_like(key, [jnp.zeros((3, 5)), jnp.zeros(4)], 1.0)
    flat = jnp.concatenate([d.reshape(-1) for d in draws])
    np.testing.assert_array_equal(flat, jax.random.normal(key, (19,)))


@pytest.mark.parametrize("shapes", [[(73_985,)], [(7, 3)], [(256, 256), (256,), (256, 1), (1,)]])
def test_the_generator_draws_whole_blocks(shapes):
    """XLA's CPU compiler runs an elementwise loop over an odd length about 6x slower
    than over an even one, and parameter counts are often odd: the generator draws a
    whole number of blocks (the leaves read their part of it, as the tests above check
    bit for bit)."""
    tree = [jnp.zeros(s) for s in shapes]
    jaxpr = jax.make_jaxpr(lambda k: noise.gaussian_like(k, tree, 1.0))(noise.root_key(1))
    lengths = {int(n) for n in re.findall(r"iota\[[^\]]*shape=\((\d+),\)", str(jaxpr))}
    total = sum(int(np.prod(s)) for s in shapes)
    assert lengths == {-(-total // noise.BLOCK) * noise.BLOCK}
    assert noise.BLOCK % 8 == 0


def test_a_non_partitionable_threefry_is_drawn_by_jax():
    key = noise.root_key(3)
    with jax.threefry_partitionable(False):
        draws = noise.gaussian_like(key, [jnp.zeros(100)], 1.0)[0]
        np.testing.assert_array_equal(draws, jax.random.normal(key, (100,)))


def test_draws_are_standard_normal_and_independent_across_leaves_and_steps():
    root = noise.root_key(2024)
    tree = [jnp.zeros((300, 100)), jnp.zeros(20_000)]
    a = noise.gaussian_like(noise.step_key(root, jnp.int32(0)), tree, 1.0)
    b = noise.gaussian_like(noise.step_key(root, jnp.int32(1)), tree, 1.0)
    for z in (*a, *b):
        assert stats.kstest(np.asarray(z).reshape(-1), "norm").pvalue > 0.001
    x, y = np.asarray(a[0]).reshape(-1)[:20_000], np.asarray(a[1])
    assert abs(np.corrcoef(x, y)[0, 1]) < 0.03
    assert abs(np.corrcoef(x, np.asarray(b[0]).reshape(-1)[:20_000])[0, 1]) < 0.03


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU compiler decision")
def test_the_generator_runs_once_however_many_leaves_and_readers():
    """XLA's CPU compiler copies cheap elementwise chains into each fused reader: the
    draw must be stored once, not recomputed per leaf and per reader (as Adam's two
    moments read each leaf of the noisy gradient)."""

    def rounds(leaves: int, readers: int) -> int:
        tree = [jnp.zeros((64, 32 + i)) for i in range(leaves)]

        def step(key):
            draws = noise.gaussian_like(key, tree, 0.5)
            return [[z * (r + 2.0) + r for z in draws] for r in range(readers)]

        hlo = jax.jit(step).lower(noise.root_key(5)).compile().as_text()
        return hlo.count(" xor(")

    one = rounds(1, 1)
    assert one > 0
    assert rounds(12, 2) == rounds(3, 3) == one


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU compiler decision")
def test_the_uniforms_are_stored_before_the_normal_transform():
    """XLA's CPU compiler runs the Threefry hash and erf⁻¹ fused in one loop slower
    than as two (``benchmarks/noise.py``): no compiled loop does both."""
    tree = [jnp.zeros((64, 32)), jnp.zeros(7)]
    hlo = jax.jit(lambda k: noise.gaussian_like(k, tree, 0.5)).lower(noise.root_key(5))
    computations = hlo.compile().as_text().split("\n\n")
    hashing = [c for c in computations if " xor(" in c]
    transforming = [c for c in computations if " log-plus-one(" in c]
    assert hashing and transforming
    assert not set(hashing) & set(transforming)
