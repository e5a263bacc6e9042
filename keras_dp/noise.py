"""Gaussian noise over pytrees (pure JAX)."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from keras_dp import _backend


def seed_words(seed: int) -> np.ndarray:
    """``seed``'s 64 bits as two uint32 words (high, low), as :func:`root_key` folds them.

    The train step never sees them: each batch carries its update's key data
    (:func:`step_key_data`), so the secret is an input of the compiled step, never a
    constant in its program (or in a compilation cache).
    """
    seed = int(seed) % 2**64
    return np.asarray([seed >> 32, seed & 0xFFFFFFFF], dtype=np.uint32)


def root_key(seed) -> jax.Array:
    """A key from all 64 bits of ``seed``: an int, or its :func:`seed_words` (traceable).

    ``jax.random.fold_in(jax.random.key(low word), high word)``, bit for bit.
    """
    words = seed_words(seed) if isinstance(seed, (int, np.integer)) else seed
    words = jnp.asarray(words, jnp.uint32)
    return step_key(jax.random.key(words[1]), words[0])


def step_key(root: jax.Array, step: jax.Array) -> jax.Array:
    """The noise key of update ``step``: distinct for every step of a run
    (``jax.random.fold_in(root, step)``). The train step never hashes it: it takes
    the key's data from :func:`step_key_data`, computed on the host."""
    return jax.random.fold_in(root, step)


def step_key_data(seed: int, steps) -> np.ndarray:
    """The data of ``step_key(root_key(seed), step)`` for each of ``steps``, computed on
    the host: a ``(len(steps), words)`` uint32 array, bit for bit.

    A train step takes its noise key as this data (a batch input, like the seed it
    comes from: never a constant of the program) rather than hashing the seed and the
    step itself: two fewer Threefry hashes to trace and compile (the MLP's first
    epoch: README, ``benchmarks/results/clipping-hostkey``). For JAX's default
    Threefry key the hash is
    :func:`threefry2x32` on NumPy arrays, one call for many steps; another default
    generator is asked through JAX (one compiled call for many steps).
    """
    steps = np.asarray(steps, np.int64).reshape(-1)
    if jax.config.jax_default_prng_impl != "threefry2x32":
        return np.asarray(_jax_step_key_data(seed_words(seed), steps.astype(np.int32)))
    high, low = (np.full(1, w, np.uint32) for w in seed_words(seed))
    zero = np.zeros(1, np.uint32)
    root = threefry2x32(zero, low, zero, high)  # fold_in(key(low), high)
    counts = steps.astype(np.uint32)  # as fold_in converts the ledger's int32 count
    return np.stack(threefry2x32(*root, np.zeros_like(counts), counts), axis=1)


@jax.jit
def _jax_step_key_data(words: jax.Array, steps: jax.Array) -> jax.Array:
    return jax.vmap(lambda s: jax.random.key_data(step_key(root_key(words), s)))(steps)


def wrap_step_key(data: jax.Array) -> jax.Array:
    """The key whose data :func:`step_key_data` computed (JAX's default generator)."""
    return jax.random.wrap_key_data(data, impl=jax.config.jax_default_prng_impl)


def multiplier_input(noise_multiplier: float) -> np.ndarray:
    """The noise multiplier as the train step's input: a float32 scalar, rounded up.

    Fit's compiled step takes σ (or adaptive clipping's σ_Δ) as an input instead of a
    constant of its program, so it compiles while σ is still being calibrated (see
    :class:`keras_dp.fitting.Calibration`). Rounded up, the input is never below the
    accounted σ; the noise's std σ·C is then a float32 product, as the noise is a
    float32 draw (within float32 rounding, a relative 6e-8, of the accounted σ·C).
    """
    value = float(noise_multiplier)
    rounded = np.float32(value)
    if float(rounded) < value:
        rounded = np.nextafter(rounded, np.float32(np.inf))
    return np.asarray(rounded, np.float32)


def _is_threefry(key: jax.Array) -> bool:
    impl = jax.random.key_impl(key)
    return getattr(impl, "name", impl) == "threefry2x32"


def threefry2x32(k0, k1, x0, x1):
    """The Threefry-2x32 block function (20 rounds, Salmon et al. 2011), unrolled.

    The same function as ``jax.extend.random.threefry_2x32``. JAX lowers that one on
    the CPU as a loop of five steps, each a few separate XLA loops over the counters;
    written out like this, XLA fuses the 20 rounds into one pass (84k draws: 0.12 ms
    against 0.55 ms here). On NumPy uint32 arrays it hashes on the host
    (:func:`step_key_data`).
    """
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    keys = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for i in range(5):
        for r in rotations[i % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
        x0 = x0 + keys[(i + 1) % 3]
        x1 = x1 + keys[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def _normals(words: jax.Array, size: int) -> jax.Array:
    """``jax.random.normal(key, (size,))`` for the key whose data are ``words`` (a
    Threefry key's, partitionable).

    JAX's float32 normal of a partitionable Threefry key: draw i hashes the counter
    (0, i), its two words xor-ed are the bits, whose top 23 make a uniform u on
    (−1, 1) and ``√2·erf⁻¹(u)`` the draw. On a CPU the uniforms are stored before the
    transform (:func:`_stored`): XLA's CPU compiler runs the hash and erf⁻¹ fused in
    one loop slower than as two loops, one after the other (alone: 1.05–1.19× for
    84k–850k draws, ``benchmarks/noise.py``; the MLP's and the text classifier's
    whole train steps were 5–6% faster stored, ``benchmarks/results/stored-uniforms``).
    The same bits either way.
    """
    uniform = _stored(lambda: _uniforms(words, size), words)
    return _stored(lambda: _to_normal(uniform), words)


def _to_normal(uniform: jax.Array) -> jax.Array:
    """``√2·erf⁻¹(u)``: N(0, 1) draws from uniforms on (−1, 1), as ``jax.random.normal``."""
    return np.float32(np.sqrt(2)) * jax.lax.erf_inv(uniform)


def _uniforms(words: jax.Array, size: int) -> jax.Array:
    count = jax.lax.iota(jnp.uint32, size)
    x0, x1 = threefry2x32(words[0], words[1], jnp.zeros_like(count), count)
    mantissa = ((x0 ^ x1) >> np.uint32(9)) | np.uint32(0x3F800000)
    floats = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1)
    low = np.nextafter(np.float32(-1), np.float32(0))
    return jnp.maximum(low, floats * (np.float32(1) - low) + low)


BLOCK = 128


def whole_blocks(size: int) -> int:
    """``size`` rounded up to a whole number of :data:`BLOCK` draws.

    XLA's CPU compiler runs an elementwise loop over a vector of odd length about 6×
    slower than over the next even length (84,171 normals: 1.74 ms, against 0.25 ms for
    84,170 or 84,224; ``benchmarks/noise.py``), and a model's parameter count is odd
    as often as not: a ``Dense(1)`` head on an even width makes it so. Draw ``i`` of a
    partitionable Threefry key depends on ``i`` alone, so drawing a few more and
    leaving them unread changes none of the others' random bits.
    """
    return -(-size // BLOCK) * BLOCK


def _unrolled(key: jax.Array, total: int) -> bool:
    return _is_threefry(key) and jax.config.jax_threefry_partitionable and total < 2**32


def _drawn_once(draw, key: jax.Array) -> jax.Array:
    """``draw()``, computed once into memory on a CPU.

    XLA's CPU compiler copies a chain of cheap elementwise operations (the Threefry
    rounds) into every fused loop that reads its result, and each leaf of the noisy
    gradient is read by two (Adam's two moments): the generator ran three times a
    step and was compiled once per reader (the MLP's compiled DP step: 1.61 ms, and
    0.84 s to compile; drawn once: 1.28 ms and 0.65 s). A conditional's result is
    stored, so its branches run once; both branches are the same draw, so the
    predicate (the key's first word being even) changes nothing. Elsewhere (GPUs: a
    conditional would read its predicate on the host) the draw is left to the
    compiler.
    """
    return _stored(draw, jax.random.key_data(key).reshape(-1))


def _stored(draw, words: jax.Array) -> jax.Array:
    """:func:`_drawn_once` for a key's data ``words``."""
    if not _backend.on_cpu():
        return draw()
    return jax.lax.cond(words[0] % 2 == 0, draw, draw)


def gaussian_like(key: jax.Array, tree, stddev: float | jax.Array):
    """A pytree shaped like ``tree`` of independent N(0, stddev²) draws (float32).

    The leaves, flattened and laid end to end, hold ``stddev ·
    jax.random.normal(key, (total,))``: one draw cut into the leaves. For a
    partitionable Threefry key (JAX's default) they are bit for bit the first
    ``total`` of ``jax.random.normal(key, (whole_blocks(total),))``: the same random
    bits as the draw of ``total``, whose float transform XLA may round an ulp apart (a
    loop's vector body and its remainder). For another key they are the draw of
    ``total``. The Threefry draw is computed by :func:`_normals`, with
    :func:`threefry2x32` written out (JAX's CPU lowering is a loop of small XLA
    passes), stored once per step (its uniforms, then its normals: :func:`_stored`),
    in whole blocks (:func:`whole_blocks`: an odd length runs 6× slower on a CPU). Its
    cost is the floor of a DP step's overhead on a CPU: 84k normals take 0.3 ms here
    (0.7 ms through ``jax.random.normal``), half a plain Keras step of that MLP.
    """
    leaves, treedef = jax.tree.flatten(tree)
    sizes = [math.prod(jnp.shape(leaf)) for leaf in leaves]
    starts = [0, *itertools.accumulate(sizes)]
    drawn = whole_blocks(starts[-1])
    if _unrolled(key, drawn):
        flat = _normals(jax.random.key_data(key).reshape(-1), drawn)
    else:
        flat = _drawn_once(lambda: jax.random.normal(key, (starts[-1],), jnp.float32), key)
    noise = [
        stddev * flat[start : start + size].reshape(jnp.shape(leaf))
        for start, size, leaf in zip(starts, sizes, leaves)
    ]
    return jax.tree.unflatten(treedef, noise)


def privatize(
    clipped_sum,
    key: jax.Array,
    noise_multiplier: float | jax.Array,
    l2_clip_norm: float | jax.Array,
    expected_batch_size: int,
):
    """(Σ clip(g_i) + N(0, (σ·C)²)) / B: the DP-SGD gradient estimate.

    The noise is drawn once for the whole sum; dividing by the *expected* batch
    size (not the realised one) keeps the sensitivity of the sum the only
    data-dependent quantity.
    """
    noise = gaussian_like(key, clipped_sum, noise_multiplier * l2_clip_norm)
    return _noised_mean(clipped_sum, noise, expected_batch_size)


def _noised_mean(clipped_sum, noise, expected_batch_size: int):
    return jax.tree.map(
        lambda g, n: ((g.astype(jnp.float32) + n) / expected_batch_size).astype(g.dtype),
        clipped_sum,
        noise,
    )


def correlated_noise(key: jax.Array, tree, strategy: jax.Array, history):
    """Unit-variance BandMF noise ``w_t = (C⁻¹z)_t`` and the history after it.

    ``strategy`` holds C's b Toeplitz coefficients; ``history`` is a pytree like
    ``tree`` whose leaves stack ``w_{t−1}, …, w_{t−b+1}`` (most recent first, zeros
    before the first update). ``C w = z`` row t reads
    ``w_t = (z_t − Σ_{j≥1} c_j w_{t−j}) / c_0``. float32, the reduction at full
    precision (no reduced-precision matmul on accelerators).
    """
    z = gaussian_like(key, tree, 1.0)
    strategy = jnp.asarray(strategy, jnp.float32)

    def step(z_leaf, past):
        carried = jnp.tensordot(strategy[1:], past, axes=1, precision=jax.lax.Precision.HIGHEST)
        w = (z_leaf - carried) / strategy[0]
        return w, jnp.concatenate([w[None], past[:-1]], axis=0)

    pairs = jax.tree.map(step, z, history)
    w = jax.tree.map(lambda _, p: p[0], tree, pairs)
    history = jax.tree.map(lambda _, p: p[1], tree, pairs)
    return w, history


def privatize_correlated(
    clipped_sum,
    key: jax.Array,
    noise_multiplier: float | jax.Array,
    l2_clip_norm: float | jax.Array,
    expected_batch_size: int,
    strategy: jax.Array,
    history,
):
    """(Σ clip(g_i) + σ·C·(C⁻¹z)_t) / B and the noise history after update t: the
    BandMF gradient estimate (see :mod:`keras_dp.bandmf`)."""
    w, history = correlated_noise(key, clipped_sum, strategy, history)
    scale = noise_multiplier * l2_clip_norm
    noise = jax.tree.map(lambda leaf: scale * leaf, w)
    return _noised_mean(clipped_sum, noise, expected_batch_size), history
