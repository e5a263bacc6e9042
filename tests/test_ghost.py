"""Ghost clipping against per-example clipping and against brute force.

The clipped sum of one update is read off the weights: with σ = 0, every example in
the batch (fixed sampling of B = N) and SGD at learning rate B, the update is exactly
minus the clipped sum. Each model is trained once per clipping mode from the same
weights; the sums must agree to relative 1e-5 (float32). The norm formulas
themselves are checked against ``jax.grad`` of each example alone.
"""

import dataclasses
import logging
import math
from unittest import mock

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import keras_dp
from keras_dp import _keras, ghost, ghost_cost, ghost_tap
from keras_dp import ghost_conv as gc
from keras_dp import ghost_conv_norms as gcn
from keras_dp import ghost_embedding as ge
from keras_dp import ghost_norms as gn
from keras_dp import ghost_transpose as gt

from .helpers import DenseCell, ghost_plan, whole_batch_update

pytestmark = pytest.mark.filterwarnings("ignore:DPConfig\\(noise_multiplier=0")

SCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def clipped_sum(
    model_fn, x, y, clipping, clip=0.05, sample_weight=None, loss=SCE, microbatch_size=None
):
    """Σ_i clip(g_i) of one update over all N examples, as ``clipping`` computes it."""
    keras.utils.set_random_seed(0)
    model = model_fn()
    n = len(y)
    config = whole_batch_update(n, clip, clipping, microbatch_size)
    model = keras_dp.make_private(model, config)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=float(n)), loss=loss)
    model.fit(x, y, sample_weight=sample_weight, verbose=0)  # builds, then one update
    after = [np.asarray(v, np.float64) for v in model.trainable_variables]
    keras.utils.set_random_seed(0)
    fresh = model_fn()
    if not fresh.built:  # a subclassed model: built on first call, as fit builds it
        fresh(x[:1])
    before = [np.asarray(v, np.float64) for v in fresh.trainable_variables]
    return [b - a for b, a in zip(before, after)]


def assert_same_sums(a, b, rtol=1e-5):
    assert len(a) == len(b)
    scale = max(float(np.max(np.abs(t))) for t in a)
    for s, t in zip(a, b):
        np.testing.assert_allclose(s, t, rtol=0, atol=rtol * scale)


def assert_norm_bound(got, want, gross):
    """``got`` is the squared norm ``want`` (float64) from above, by no more than the
    Gram forms' rounding margin: want·(1 - 1e-6) ≤ got ≤ want·(1 + 1e-5) + 2·ROUNDING·gross,
    ``gross`` a bound on the products' gross size."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(got >= want * (1 - 1e-6)), (got, want)
    assert np.all(got <= want * (1 + 1e-5) + 2 * gn.ROUNDING * gross + 1e-12), (got, want)


def fallback_of(model_fn, x, clipping="ghost"):
    """Paths of the trainable variables that ghost.plan leaves to per-example gradients."""
    return set(plan_of(model_fn, x, clipping).fallback)


def plan_of(model_fn, x, clipping="ghost"):
    """ghost.plan of one example of ``x``."""
    keras.utils.set_random_seed(0)
    return ghost_plan(model_fn(), x, clipping)


# The formulas against brute force ------------------------------------------------------

EQUATIONS = [
    # (equation, x shape per example, kernel shape)
    ("ab,bc->ac", (1, 5), (5, 3)),  # a Dense on one vector: Gram, ‖x‖²‖g‖²
    ("ab,bc->ac", (9, 2), (2, 2)),  # a Dense on a short sequence of narrow features
    ("ab,bc->ac", (3, 40), (40, 30)),  # wide features, short sequence
    ("abc,cde->abde", (1, 6, 8), (8, 2, 4)),  # attention projection
    ("abcd,cde->abe", (1, 4, 2, 3), (2, 3, 5)),  # attention output
    ("abc,bcd->abd", (1, 3, 4), (3, 4, 2)),  # a letter in x, kernel and out (kept apart)
    ("...b,bc->...c", (2, 3, 4), (4, 5)),  # ellipsis
    ("nsijc,ijcm->nscm", (1, 6, 3, 2, 4), (3, 2, 4, 2)),  # a depthwise convolution's patches
]


@pytest.mark.parametrize("equation,x_shape,k_shape", EQUATIONS)
def test_einsum_norms_and_sums_equal_brute_force(equation, x_shape, k_shape):
    rng = np.random.default_rng(0)
    batch = 5
    x = jnp.asarray(rng.normal(size=(batch, *x_shape)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
    out_shape = jnp.einsum(equation, x[0], kernel).shape
    g = jnp.asarray(rng.normal(size=(batch, *out_shape)), jnp.float32)
    factor = jnp.asarray(rng.uniform(0, 1, batch), jnp.float32)
    spec = gn.parse(equation, len(x_shape))
    assert spec is not None

    def per_example(b):  # ∂/∂K of <einsum(x_b, K), g_b>: the kernel gradient of example b
        return jax.grad(lambda k: jnp.sum(jnp.einsum(equation, x[b], k) * g[b]))(kernel)

    grads = [np.asarray(per_example(b), np.float64) for b in range(batch)]
    want_sq = [float(np.sum(G * G)) for G in grads]
    sizes = np.sum(np.square(x), axis=tuple(range(1, x.ndim))) * np.sum(
        np.square(g), axis=tuple(range(1, g.ndim))
    )  # ‖x_b‖²‖g_b‖², at least the Gram products' gross size once x's own letters are summed
    gross = np.prod(x_shape) * sizes
    assert_norm_bound(gn.kernel_sq_norms(spec, x, g), want_sq, gross)
    for outer in (True, False):  # each form, whichever kernel_sq_norms takes
        assert_norm_bound(gn.grouped_sq_norms(*gn.grouped(spec, x, g), outer), want_sq, gross)
    formed = gn.kernel_grads(spec, x, g, k_shape)  # the outer form's, kept when it is taken
    np.testing.assert_allclose(formed, np.stack(grads), rtol=1e-5, atol=1e-5)
    half = gn.kernel_grads(spec, x.astype(jnp.bfloat16), g.astype(jnp.bfloat16), k_shape)
    assert half.dtype == jnp.float32  # mixed_bfloat16: kept and summed in float32
    want_sum = sum(float(f) * G for f, G in zip(factor, grads))
    got_sum = gn.kernel_sum(spec, x, g, factor, k_shape)
    np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "equation,x_shape,k_shape,bias_shape,folds",
    [
        ("ab,bc->ac", (1, 5), (5, 3), (3,), True),  # a Dense
        ("ab,bc->ac", (9, 2), (2, 2), (2,), True),  # a Dense on a sequence
        ("abc,cde->abde", (1, 6, 8), (8, 2, 4), (2, 4), True),
        ("abc,cde->abde", (1, 6, 8), (8, 2, 4), (4,), False),  # a bias over some outputs
        ("abc,ced->abde", (1, 6, 8), (8, 3, 3), (3, 3), False),  # the bias' order is out's
        ("abcd,cde->abe", (1, 4, 2, 3), (2, 3, 5), (5,), False),  # two letters from x
        ("abc,bcd->abd", (1, 3, 4), (3, 4, 2), (2,), False),  # a letter kept apart
    ],
)
def test_a_bias_sum_in_its_kernels_contraction_equals_brute_force(
    equation, x_shape, k_shape, bias_shape, folds
):
    """The bias' clipped sum rides in the kernel's contraction (a feature of ones) only
    where that is exact: against each example's gradients from jax.grad."""
    spec = gn.parse(equation, len(x_shape))
    assert ghost_tap.folds_bias(spec, k_shape, bias_shape) == folds
    if not folds:
        return
    rng = np.random.default_rng(1)
    batch = 6
    x = jnp.asarray(rng.normal(size=(batch, *x_shape)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
    bias = jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
    out_shape = jnp.einsum(equation, x[0], kernel).shape
    g = jnp.asarray(rng.normal(size=(batch, *out_shape)), jnp.float32)
    factor = jnp.asarray(rng.uniform(0, 1, batch), jnp.float32)

    def per_example(b):  # ∂/∂(K, bias) of <einsum(x_b, K) + bias, g_b>
        out = lambda k, c: jnp.sum((jnp.einsum(equation, x[b], k) + c) * g[b])  # noqa: E731
        return jax.grad(out, argnums=(0, 1))(kernel, bias)

    grads = [per_example(b) for b in range(batch)]
    kernel_sum, bias_sum = ghost_tap.kernel_and_bias_sum(spec, x, g, factor, k_shape)
    want_kernel = sum(float(f) * np.asarray(k, np.float64) for f, (k, _) in zip(factor, grads))
    want_bias = sum(float(f) * np.asarray(c, np.float64) for f, (_, c) in zip(factor, grads))
    np.testing.assert_allclose(kernel_sum, want_kernel, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bias_sum, want_bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        bias_sum, jnp.tensordot(factor, gn.bias_grads(g, bias_shape), 1), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "rows,k_shape,folds",
    [
        (88, (256, 256), True),  # the MLP at batch 64: a small copy of x
        (255, (256, 10), True),  # 255 × 257 = 65,535 numbers
        (256, (256, 10), False),  # one row more: over FOLD_COPY_LIMIT
        (1170, (64, 256), False),  # the MLP's first layer at batch 1,024
    ],
)
def test_a_folded_bias_never_copies_a_large_x(rows, k_shape, folds):
    """The fold copies x with a feature of ones, which grows with the batch: beyond
    FOLD_COPY_LIMIT numbers the bias keeps its own contraction."""
    spec = gn.parse("ab,bc->ac", 2)
    x = np.zeros((rows, k_shape[0]), np.float32)
    assert ghost_tap.folds_bias(spec, k_shape, k_shape[1:], x) == folds
    assert ghost_tap.folds_bias(spec, k_shape, k_shape[1:]) is True


@pytest.mark.parametrize(
    "window,strides,padding,dilation,spatial",
    [
        ((2,), (1,), "VALID", (1,), (6,)),
        ((3,), (2,), "SAME", (1,), (7,)),
        ((3, 3), (2, 1), "SAME", (1, 1), (7, 6)),
        ((2, 2), (1, 1), "VALID", (2, 2), (6, 5)),
        ((3,), (2,), "VALID", (1,), (8,)),  # the last position read by no window
        ((2, 2, 2), (1, 2, 1), "SAME", (1, 1, 2), (4, 5, 3)),
    ],
)
def test_conv_norms_and_sums_equal_brute_force(window, strides, padding, dilation, spatial):
    rng = np.random.default_rng(len(spatial) * 10 + window[0])
    batch, channels, filters = 4, 3, 2
    x = jnp.asarray(rng.normal(size=(batch, 1, *spatial, channels)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(*window, channels, filters)), jnp.float32)
    conv = gc.Conv(window, strides, padding, dilation)

    def forward(xb, k):
        return keras.ops.conv(
            xb, k, strides=list(strides), padding=padding.lower(), dilation_rate=dilation
        )

    g = jnp.asarray(rng.normal(size=(batch, *forward(x[0], kernel).shape)), jnp.float32)
    factor = jnp.asarray(rng.uniform(0, 1, batch), jnp.float32)
    grads = [
        np.asarray(jax.grad(lambda k, b=b: jnp.sum(forward(x[b], k) * g[b]))(kernel), np.float64)
        for b in range(batch)
    ]
    want = [np.sum(G * G) for G in grads]
    np.testing.assert_allclose(gcn.sq_norms(((conv, x, g),)), want, rtol=1e-5)
    assert_norm_bound(gcn.shifted_sq_norms(conv, x, g), want, _conv_gross(conv, x, g))  # 3-D too
    formed = gcn.input_grads(conv, x, g, kernel.shape)
    np.testing.assert_allclose(formed, np.stack(grads), rtol=1e-5, atol=1e-5)
    half = gcn.input_grads(conv, x.astype(jnp.bfloat16), g.astype(jnp.bfloat16), kernel.shape)
    assert half.dtype == jnp.float32
    want = sum(float(f) * G for f, G in zip(factor, grads))
    for canonical in (True, False):  # the CPU's form and the accelerators'
        got = gc.conv_sum(conv, x, g, factor, kernel.shape, canonical)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _conv_case(rank, window, strides, dilation, padding, extra, channels, filters, batch, seed):
    """(spec, x [B, 1, *spatial, C], g [B, 1, *out, F], each example's kernel gradient
    in float64) for a drawn convolution; ``padding`` "VALID", "SAME" or "explicit"
    (low and high drawn from -1 to 2, a negative one cropping)."""
    rng = np.random.default_rng(seed)
    window, strides, dilation = window[:rank], strides[:rank], dilation[:rank]
    spatial = tuple((k - 1) * d + 1 + e for k, d, e in zip(window, dilation, extra))
    if padding == "explicit":
        padding = tuple(tuple(int(v) for v in rng.integers(-1, 3, 2)) for _ in range(rank))
        spatial = tuple(n + 2 for n in spatial)  # a crop of one at each end still fits a window
    spec = gc.Conv(window, strides, padding, dilation)
    x = jnp.asarray(rng.normal(size=(batch, 1, *spatial, channels)), jnp.float32)
    kernel = jnp.zeros((*window, channels, filters), jnp.float32)

    def forward(xb, k):
        return gc._forward(spec, xb, k)

    out = forward(x[:, 0], kernel).shape[1:]
    g = jnp.asarray(rng.normal(size=(batch, 1, *out)), jnp.float32)
    grads = [
        np.asarray(jax.grad(lambda k, b=b: jnp.sum(forward(x[b], k) * g[b, 0]))(kernel), np.float64)
        for b in range(batch)
    ]
    return spec, x, g, grads


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    rank=st.integers(1, 2),
    window=st.tuples(st.integers(1, 4), st.integers(1, 3)),
    strides=st.tuples(st.integers(1, 3), st.integers(1, 2)),
    dilation=st.tuples(st.integers(1, 3), st.integers(1, 2)),
    padding=st.sampled_from(["VALID", "SAME", "explicit"]),
    extra=st.tuples(st.integers(0, 9), st.integers(0, 5)),
    channels=st.integers(1, 5),
    filters=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_every_conv_norm_form_is_each_examples_norm(
    rank, window, strides, dilation, padding, extra, channels, filters, seed
):
    """Over drawn convolutions (1-D and 2-D, strides, dilations, "SAME", "VALID" and
    explicit padding, a negative one cropping): the outer, Gram and shifted forms each
    give every example's squared kernel-gradient norm (autodiff's, example by example),
    the Gram and shifted ones from above by at most their rounding margin."""
    spec, x, g, grads = _conv_case(
        rank, window, strides, dilation, padding, extra, channels, filters, 3, seed
    )
    want = np.array([np.sum(G * G) for G in grads])
    formed = gcn.input_grads(spec, x, g, grads[0].shape)
    np.testing.assert_allclose(formed, np.stack(grads), rtol=1e-5, atol=1e-5)
    xr = gc.conv_patches(spec, x)[:, :, None]
    gr = g.reshape(g.shape[0], -1, 1, g.shape[-1])
    assert_norm_bound(gn.grouped_sq_norms(xr, gr, False), want, _conv_gross(spec, x, g))
    assert_norm_bound(gcn.shifted_sq_norms(spec, x, g), want, _conv_gross(spec, x, g))


def _conv_gross(spec, x, g):
    """(Σ_s ‖p_s‖·‖g_s‖)² of each example: the Gram forms' products' gross size."""
    xr = gc.conv_patches(spec, x)
    gr = g.reshape(g.shape[0], -1, g.shape[-1])
    return np.sum(np.linalg.norm(xr, axis=-1) * np.linalg.norm(gr, axis=-1), axis=1) ** 2


def test_the_conv_norm_forms_are_chosen_by_their_measured_times():
    """gcn.norm_form takes the form the fit to measured times says is fastest, each
    where it was measured fastest (88 examples on 2 CPU cores, ms): Keras' text CNN's
    Conv1D (width 5, 32 → 32, 64 positions: outer 0.89, Gram 1.16, shifted 0.63), a
    TCN's first causal Conv1D (3 taps, 8 → 32: 0.11, 0.44, 0.44), a strided 3×3 one (64
    → 64 on 12×12: 2.69, 0.84, 1.52); and never the shifted form for a kernel read more
    than once, or past SHIFTED_NUMBERS."""

    def form(spec, spatial, channels, out, filters, positions=None):
        return gcn.norm_form(spec, (88, 1, *spatial, channels), (88, 1, *out, filters), positions)

    text = gc.Conv((5,), (1,), "VALID", (1,))
    assert form(text, (64,), 32, (60,), 32) == "shifted"
    assert form(text, (64,), 32, (60,), 32, positions=60) == "outer"  # read twice: 30 each
    assert form(gc.Conv((3,), (1,), ((2, 0),), (1,)), (64,), 8, (64,), 32) == "outer"
    assert form(gc.Conv((3, 3), (2, 2), "VALID", (1, 1)), (12, 12), 64, (5, 5), 64) == "gram"
    wide = gc.Conv((5,), (1,), "VALID", (1,))
    n = math.isqrt(gcn.SHIFTED_NUMBERS) + 1  # the input's Gram matrix one row too large
    assert "shifted" not in gcn.form_times(n - 4, 5, 32, 32, n)
    assert "shifted" in gcn.form_times(n - 5, 5, 32, 32, n - 1)
    assert form(wide, (n,), 64, (n - 4,), 64) != "shifted"


def test_a_convolutions_gradients_are_kept_only_within_the_memory_bound():
    """gcn.formed keeps each example's gradient where the outer form is fastest and the
    rows' gradients hold no more numbers than x and g, or KEPT_NUMBERS in all: a 3×3
    convolution of 128 channels on 16×16 ("same"; 147,456 numbers an example against
    x and g's 65,536) up to KEPT_NUMBERS // 147,456 rows; a TCN's causal one (768
    against 2,560) at any number of rows; never a form other than the outer."""
    same = gc.Conv((3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1))

    def formed(spec, rows, spatial, channels, out, filters):
        return gcn.formed(spec, (rows, 1, *spatial, channels), (rows, 1, *out, filters))

    assert gcn.norm_form(same, (1, 1, 16, 16, 128), (1, 1, 16, 16, 128)) == "outer"
    rows = gn.KEPT_NUMBERS // 147_456
    assert formed(same, rows, (16, 16), 128, (16, 16), 128)
    assert not formed(same, rows + 1, (16, 16), 128, (16, 16), 128)
    causal = gc.Conv((3,), (1,), ((2, 0),), (1,))
    assert formed(causal, 1 << 20, (64,), 8, (64,), 32)
    strided = gc.Conv((3, 3), (2, 2), "VALID", (1, 1))  # the Gram form: nothing kept
    assert not formed(strided, 1, (12, 12), 64, (5, 5), 64)


def test_a_shifted_norm_bounds_an_example_whose_shares_cancel(monkeypatch):
    """A Conv1D whose input repeats with a period (so positions t and t + P read the
    same patch) and whose gradient there is nearly opposite: each example's kernel
    gradient nearly cancels, and the shifted form's float32 rounding would be most of
    its norm. With ROUNDING's margin the norm is never below the gradient, its exact one
    or the one float32 forms; without it some are (so the draw exercises the margin)."""
    rng = np.random.default_rng(3)
    batch, period, channels, filters, width = 64, 6, 24, 12, 3
    spec = gc.Conv((width,), (1,), "VALID", (1,))
    base = rng.normal(size=(batch, period, channels)) * 100
    x = np.concatenate([base, base, base[:, : width - 1]], 1)[:, None].astype(np.float32)
    half = rng.normal(size=(batch, period, filters))
    eta = 10.0 ** rng.uniform(-6, -2, size=(batch, period, 1))
    g = np.concatenate([half, -half * (1 - eta)], 1)[:, None].astype(np.float32)
    x64, g64 = x.astype(np.float64)[:, 0], g.astype(np.float64)[:, 0]
    patches = np.stack([x64[:, k : k + 2 * period] for k in range(width)], axis=2)
    exact = np.sum(np.square(np.einsum("bskc,bsf->bkcf", patches, g64)), axis=(1, 2, 3))
    formed = np.asarray(gcn.input_grads(spec, x, g, (width, channels, filters)), np.float64)
    want = np.maximum(exact, np.sum(np.square(formed), axis=(1, 2, 3)))
    got = np.asarray(gcn.shifted_sq_norms(spec, jnp.asarray(x), jnp.asarray(g)), np.float64)
    assert np.all(got >= want), np.min(got / want)
    monkeypatch.setattr(gn, "ROUNDING", 0.0)
    got = np.asarray(gcn.shifted_sq_norms(spec, jnp.asarray(x), jnp.asarray(g)), np.float64)
    assert np.any(got < want)


@pytest.mark.parametrize("patch_bytes", [2**24, 0])  # the kernel's: patches, canonical
@pytest.mark.parametrize(
    "window,strides,padding,dilation,spatial",
    [
        ((3,), (2,), "SAME", (1,), (7,)),
        ((3, 3), (2, 1), "SAME", (1, 1), (7, 6)),
        ((2, 2), (1, 1), "VALID", (2, 2), (6, 5)),
        ((3, 2), (2, 3), "VALID", (1, 1), (8, 9)),  # rows and columns read by no window
        ((2, 2, 2), (1, 2, 1), "SAME", (1, 1, 2), (4, 5, 3)),
    ],
)
def test_conv_and_its_gradients_equal_keras(
    window, strides, padding, dilation, spatial, patch_bytes, monkeypatch
):
    """The taps' convolution (canonical gradients on a CPU, autodiff's elsewhere)
    gives Keras' output, and autodiff's gradients of it at x and at the kernel."""
    monkeypatch.setattr(gc, "_PATCH_BYTES", patch_bytes)
    rng = np.random.default_rng(sum(spatial))
    x = jnp.asarray(rng.normal(size=(3, *spatial, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(*window, 4, 5)), jnp.float32)
    spec = gc.Conv(window, strides, padding, dilation)

    def keras_conv(x, k):
        kw = {"strides": list(strides), "padding": padding.lower(), "dilation_rate": dilation}
        return keras.ops.conv(x, k, **kw)

    want = keras_conv(x, kernel)
    g = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    want_grads = jax.vjp(keras_conv, x, kernel)[1](g)
    for canonical in (True, False):
        got, pullback = jax.vjp(lambda x, k, c=canonical: gc.conv(spec, x, k, c), x, kernel)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(pullback(g), want_grads):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def assert_same_map_and_gradients(ours, keras_conv, x, kernel, rng):
    """``ours(x, kernel)`` equals ``keras_conv``'s, and so do autodiff's gradients of
    it at x and at the kernel (for a random output gradient)."""
    want, want_pullback = jax.vjp(keras_conv, x, kernel)
    got, pullback = jax.vjp(ours, x, kernel)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    g = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    for a, b in zip(pullback(g), want_pullback(g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "window,strides,padding,dilation,spatial",
    [
        ((3,), (2,), "SAME", (1,), (7,)),
        ((3,), (1,), "VALID", (2,), (9,)),
        ((3, 3), (2, 1), "SAME", (1, 1), (7, 6)),
        ((2, 2), (1, 1), "VALID", (2, 2), (6, 5)),
        ((3, 2), (2, 3), "VALID", (1, 1), (8, 9)),  # rows and columns read by no window
    ],
)
def test_depthwise_conv_and_its_gradients_equal_keras(window, strides, padding, dilation, spatial):
    """The depthwise rule's einsum over patches gives ``keras.ops.depthwise_conv``'s
    output (channel c·M + m) and autodiff's gradients of it at x and at the kernel; and
    each example's kernel gradient formed one window offset at a time from its input
    (``ghost_conv.depthwise_grads``, the tap's) is autodiff's."""
    rng = np.random.default_rng(sum(spatial))
    x = jnp.asarray(rng.normal(size=(3, *spatial, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(*window, 4, 2)), jnp.float32)
    spec = gc.Conv(window, strides, padding, dilation)

    def keras_conv(x, k):
        kw = {"strides": strides, "padding": padding.lower(), "dilation_rate": dilation}
        return keras.ops.depthwise_conv(x, k, **kw)

    def ours(x, k):
        return gc.depthwise_layout(spec, x.shape, gc.depthwise(spec, x, k))

    assert_same_map_and_gradients(ours, keras_conv, x, kernel, rng)
    g = jnp.asarray(rng.normal(size=keras_conv(x, kernel).shape), jnp.float32)

    def example_grad(xb, gb):
        return jax.grad(lambda k: jnp.sum(keras_conv(xb[None], k) * gb))(kernel)

    at_tap = g.reshape(3, 1, -1, 4, 2)  # the einsum's output [N, S, C, M], one example each
    got = gc.depthwise_grads(spec, x[:, None], at_tap, kernel.shape)
    np.testing.assert_allclose(got, jax.vmap(example_grad)(x, g), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "window,strides,padding,dilation,spatial,groups",
    [
        ((3,), (2,), "SAME", (1,), (7,), 2),
        ((2,), (1,), "VALID", (2,), (9,), 3),
        ((3, 3), (2, 1), "SAME", (1, 1), (7, 6), 2),
        ((3, 2), (2, 3), "VALID", (1, 1), (8, 9), 3),
    ],
)
def test_grouped_conv_and_its_gradients_equal_keras(
    window, strides, padding, dilation, spatial, groups
):
    """The grouped rule's einsum over patches gives ``keras.ops.conv``'s output for a
    kernel of C/G input channels (G groups) and autodiff's gradients of it at x and at
    the kernel."""
    rng = np.random.default_rng(sum(spatial) + groups)
    x = jnp.asarray(rng.normal(size=(3, *spatial, 2 * groups)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(*window, 2, 2 * groups)), jnp.float32)
    spec = gc.Conv(window, strides, padding, dilation)

    def keras_conv(x, k):
        kw = {"strides": strides, "padding": padding.lower(), "dilation_rate": dilation}
        return keras.ops.conv(x, k, **kw)

    def ours(x, k):
        return gc.depthwise_layout(spec, x.shape, gc.grouped(spec, x, k, groups)[1])

    assert_same_map_and_gradients(ours, keras_conv, x, kernel, rng)


def test_a_grouped_convolutions_tap_costs_its_patches_einsum():
    """A grouped convolution's tap reads its kernel [*window, C/G, F] as the einsum's
    [*window, C/G, G, F/G]; its cost is the einsum's over one example's patches
    [1, S, *window, G, C/G] (conv_model: 6 causal positions of 4 → 6 channels in 2
    groups, then 3 strided positions of 6 → 2)."""
    plan = plan_of(conv_model, data("conv")[0], "auto")
    taps = {t.layer: t for t in plan.active if t.use_kernel}
    for layer, x_shape, out_shape in [
        ("causal_grouped", (1, 6, 2, 2, 2), (1, 6, 2, 3)),
        ("grouped", (1, 3, 2, 2, 3), (1, 3, 2, 1)),
    ]:
        tap = taps[layer]
        assert tap.out.shape == out_shape
        outer, gram = gn.costs(tap.spec, x_shape, out_shape)
        assert tap.costs() == (min(outer, gram), outer)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    rank=st.integers(1, 2),
    window=st.integers(1, 4),
    strides=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.sampled_from(["valid", "same"]),
    extra=st.integers(0, 2),  # output_padding, below the strides
    spatial=st.integers(1, 6),
)
def test_a_transposed_convolution_is_its_einsum_folded(
    rank, window, strides, dilation, padding, extra, spatial
):
    """ghost_transpose.fold of the transposed rule's einsum gives keras.ops.conv_transpose's
    output, and autodiff's gradients of it at x and at the kernel, over random
    geometries: strides, dilation, padding, output padding, windows wider than the
    stride and narrower, inputs of one position."""
    output_padding = None if extra == 0 or extra >= strides else (extra,) * rank
    dilation = 1 if strides > 1 else dilation  # Keras refuses both above 1
    rng = np.random.default_rng(window + 10 * strides + 100 * spatial)
    x = jnp.asarray(rng.normal(size=(2, *(spatial,) * rank, 3)), jnp.float32)
    layer_cls = keras.layers.Conv1DTranspose if rank == 1 else keras.layers.Conv2DTranspose
    layer = layer_cls(
        2, window, strides, padding, output_padding=output_padding, dilation_rate=dilation
    )
    layer.build(x.shape)
    kernel = jnp.asarray(rng.normal(size=layer.kernel.shape), jnp.float32)
    pads = _keras.conv_transpose_pads(layer, x.shape)

    def keras_conv(x, kernel):
        return keras.ops.conv_transpose(
            x, kernel, strides, padding, output_padding, dilation_rate=dilation
        )

    def ours(x, kernel):
        u = jnp.einsum(gt.transpose_equation(rank), x, kernel)
        return gt.fold(u, layer.strides, layer.dilation_rate, pads)

    assert_same_map_and_gradients(ours, keras_conv, x, kernel, rng)


@pytest.mark.parametrize("padding, output_padding", [("same", None), ("valid", (1, 0, 1))])
def test_a_3d_transposed_convolution_is_its_einsum_folded(padding, output_padding):
    """The same in 3-D (Conv3DTranspose), strided unevenly, with and without output
    padding."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 3, 2, 3, 2)), jnp.float32)
    layer = keras.layers.Conv3DTranspose(
        2, (2, 3, 2), (2, 1, 2), padding, output_padding=output_padding
    )
    layer.build(x.shape)
    kernel = jnp.asarray(rng.normal(size=layer.kernel.shape), jnp.float32)
    pads = _keras.conv_transpose_pads(layer, x.shape)

    def keras_conv(x, kernel):
        return keras.ops.conv_transpose(x, kernel, (2, 1, 2), padding, output_padding)

    def ours(x, kernel):
        u = jnp.einsum(gt.transpose_equation(3), x, kernel)
        return gt.fold(u, layer.strides, layer.dilation_rate, pads)

    assert_same_map_and_gradients(ours, keras_conv, x, kernel, rng)


def _one_read(reads):
    """One tap reading all of ``reads``' positions (the first's, its positions laid end
    to end as the first axis of its output)."""
    total = sum(math.prod(t.out.shape[:-1]) for t in reads)
    shape = (total, *[1] * (len(reads[0].out.shape) - 2), reads[0].out.shape[-1])
    return dataclasses.replace(reads[0], out=jax.ShapeDtypeStruct(shape, reads[0].out.dtype))


@pytest.mark.parametrize(
    "kind, layer, gram",
    [("seq2seq", "table", True), ("shared_conv", "conv", False), ("shared_conv", "conv1d", True)],
)
def test_a_kernel_read_many_times_costs_one_read_of_all_its_positions(kind, layer, gram):
    """ghost_tap.norm_costs charges a kernel that several taps read what cross_terms
    computes: each side's norm over all its reads' positions at once, whose Gram form
    grows with their square, so the same as one read of them all (a split changes
    nothing): BART's table (two lookups, two reversed reads of different ranks, and
    their cross term), a Conv2D called on an image and on its crop (the outer form, as
    dear either way) and a Conv1D called twice (the Gram form)."""
    plan = plan_of(MODELS[kind], data(kind)[0], "ghost")
    reads = [t for t in plan.taps if t.use_kernel and t.layer.split("/")[-1] == layer]
    sides = [[t for t in reads if t.kind == k] for k in ("embedding", "einsum", "conv")]
    sides = [side for side in sides if side]
    assert len(reads) == (4 if kind == "seq2seq" else 2), [t.layer for t in reads]
    merged = [_one_read(side) for side in sides]
    assert ghost_tap.norm_costs(reads) == ghost_tap.norm_costs(merged)
    split = sum(t.costs()[0] for t in reads)  # each read's own norm, as before
    norm = ghost_tap.norm_costs(reads)[0]
    assert norm > split if gram else norm == split


def _grouped_convolutions(jaxpr) -> int:
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            params = eqn.params
            count += params["feature_group_count"] > 1 or params["batch_group_count"] > 1
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                item = getattr(item, "jaxpr", item)
                if hasattr(item, "eqns"):
                    count += _grouped_convolutions(item)
    return count


@pytest.mark.parametrize("kind", ["conv", "conv2d", "depthwise", "depthwise1d", "causal"])
def test_per_example_path_forms_no_grouped_convolution(kind):
    """On a CPU the per-example path (clipping="per_example", auto's per-example
    steps, user-level DP) runs each ghost-ruled convolution through
    ``ghost_conv.conv`` (a depthwise or grouped one through its patches): each example's kernel
    gradient is a product of its unfolded patches, where autodiff's under vmap is a
    grouped convolution (slow on CPUs). The gradients equal those of Keras' own
    layers (a causal convolution's: padded on the left as Keras pads it)."""
    assert jax.default_backend() == "cpu"
    model = causal_model() if kind == "causal" else MODELS[kind]()
    x, _ = data("conv" if kind == "causal" else kind)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def unit(params, row, index):
        out, _ = model.stateless_call(params, non_trainable, row[None])
        return jnp.sum(jnp.square(out)) * (index + 1), ()

    def per_example_grads(fn):
        grad = jax.grad(lambda p, r, i: fn(p, r, i)[0])
        return jax.vmap(grad, in_axes=(None, 0, 0)), (trainable, jnp.asarray(x), jnp.arange(9))

    plain, args = per_example_grads(unit)
    ours, _ = per_example_grads(ghost.per_example_fn(model, unit))
    assert _grouped_convolutions(jax.make_jaxpr(plain)(*args).jaxpr) > 0
    assert _grouped_convolutions(jax.make_jaxpr(ours)(*args).jaxpr) == 0
    for a, b in zip(ours(*args), plain(*args)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert ghost.per_example_fn(mlp(), unit) is unit  # nothing to change without convolutions


def test_the_dense_norm_forms_are_chosen_by_their_measured_times():
    """gn.outer_form takes the form the fit to measured times says is faster, each where
    it was measured faster (88 examples on 2 CPU cores, ms with the clipped sum / the
    norm alone): BERT tiny's query (64 positions, 64 → 64: outer 0.40, Gram 1.34), a
    Dense 256 → 256 over 4 positions (1.40, 0.42), one 256 → 256 over 128 positions
    (the sum: 9.0, 22.6; the norm alone: 12.2, 7.1); never for one position (the Gram
    form is ‖x‖²‖g‖²); and the gradients kept for the sum only where they take no more
    memory than x and g, or KEPT_NUMBERS in all."""
    spec = gn.parse("ab,bc->ac", 2)

    def outer(s, a, c, rows=88):
        return gn.outer_form(spec, (s, a), (s, c), rows)

    query = gn.parse("abc,cde->abde", 3)
    assert gn.outer_form(query, (1, 64, 64), (1, 64, 2, 32), 88)
    assert not outer(4, 256, 256)
    assert outer(128, 256, 256) and not outer(128, 256, 256, rows=None)
    assert not any(outer(1, a, c, rows) for a, c in ((4, 4), (64, 256)) for rows in (88, None))
    # 64 → 64 over 16 positions: G_b holds 4,096 numbers, x and g 2,048.
    rows = gn.KEPT_NUMBERS // 4096
    assert outer(16, 64, 64, rows) and not outer(16, 64, 64, rows + 1)
    assert outer(64, 64, 64, 10 * rows)  # x and g: 8,192 numbers an example
    assert outer(16, 64, 64, rows=None)  # the norm alone keeps nothing


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    length=st.integers(1, 12),
    vocab=st.integers(2, 6),
    dim=st.integers(1, 4),
)
def test_embedding_norms_and_sums_equal_brute_force(length, vocab, dim):
    rng = np.random.default_rng(length * 100 + vocab * 10 + dim)
    batch = 4
    ids = jnp.asarray(rng.integers(0, vocab, (batch, 1, length)), jnp.int32)  # repeats
    g = jnp.asarray(rng.normal(size=(batch, 1, length, dim)), jnp.float32)
    table = jnp.zeros((vocab, dim))
    factor = jnp.asarray(rng.uniform(0, 1, batch), jnp.float32)

    def per_example(b):
        return jax.grad(lambda t: jnp.sum(jnp.take(t, ids[b], axis=0) * g[b]))(table)

    grads = [np.asarray(per_example(b), np.float64) for b in range(batch)]
    gross = length * np.sum(np.square(g), axis=(1, 2, 3))  # (Σ_t ‖g_t‖)² at most
    assert_norm_bound(ge.embedding_sq_norms(ids, g), [np.sum(G * G) for G in grads], gross)
    want = sum(float(f) * G for f, G in zip(factor, grads))
    np.testing.assert_allclose(
        ge.embedding_sum(ids, g, factor, (vocab, dim)), want, rtol=1e-5, atol=1e-6
    )


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    length=st.integers(1, 9),
    positions=st.integers(1, 9),
    vocab=st.integers(1, 6),
    dim=st.integers(1, 4),
    rows=st.integers(1, 5),
)
def test_a_tied_tables_norm_equals_brute_force(length, positions, vocab, dim, rows):
    """A table read by a lookup (ids, g) and in reverse as logits (h, δ): the two taps'
    norms plus 2·tied_cross, and its rounding margin, are ‖A_b + R_b‖² from above, the
    norm of the table's whole gradient formed per example; also in chunks of rows."""
    rng = np.random.default_rng([length, positions, vocab, dim, rows])
    batch = 5
    ids = jnp.asarray(rng.integers(0, vocab, (batch, 1, length)), jnp.int32)  # repeats
    g = jnp.asarray(rng.normal(size=(batch, 1, length, dim)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(batch, 1, positions, dim)), jnp.float32)
    delta = jnp.asarray(rng.normal(size=(batch, 1, positions, vocab)), jnp.float32)
    spec = gn.parse("...d,vd->...v", 3)
    assert ge.ties(spec) and not ge.ties(gn.parse("...d,dv->...v", 3))

    def per_example(b):
        def loss(t):
            lookup = jnp.sum(jnp.take(t, ids[b], axis=0) * g[b])
            return lookup + jnp.sum(jnp.einsum("...d,vd->...v", h[b], t) * delta[b])

        return np.asarray(jax.grad(loss)(jnp.zeros((vocab, dim))), np.float64)

    want = np.asarray([np.sum(per_example(b) ** 2) for b in range(batch)])
    own = ge.embedding_sq_norms(ids, g) + gn.kernel_sq_norms(spec, h, delta)
    with (
        mock.patch.object(gn, "NORM_PASS_NUMBERS", 0),
        mock.patch.object(gn, "NORM_CHUNK_NUMBERS", rows * 2 * length * positions),
    ):
        chunked = ge.tied_cross(ids, g, *gn.grouped(spec, h, delta))
    picked = np.take_along_axis(  # δ_s[id_t] [B, S, T]
        np.asarray(delta[:, 0], np.float64), np.asarray(ids[:, 0])[:, None, :], 2
    )
    sizes = np.linalg.norm(h[:, 0], axis=-1)[:, :, None] * np.linalg.norm(g[:, 0], axis=-1)[:, None]
    want_gross = np.sum(np.abs(picked) * sizes, axis=(1, 2))
    reads = (  # the gross sizes of the two reads' own norms, where a Gram form takes them
        np.sum(np.linalg.norm(g[:, 0], axis=-1), 1) ** 2
        + np.sum(np.linalg.norm(h[:, 0], axis=-1) * np.linalg.norm(delta[:, 0], axis=-1), 1) ** 2
    )
    # The two reads can nearly cancel (A_b ≈ -R_b): see the test of cancelling shares.
    for inner, gross in (ge.tied_cross(ids, g, *gn.grouped(spec, h, delta)), chunked):
        np.testing.assert_allclose(gross, want_gross, rtol=1e-5)
        bound = own + 2 * inner + 4 * gn.ROUNDING * gross
        assert_norm_bound(bound, want, 2 * want_gross + reads)
    term = ge.tied_term(ids, g, *gn.grouped(spec, h, delta))
    assert_norm_bound(own + term, want, 2 * want_gross + reads)


def _grouped_sums_squared(ids, g, vocab):
    """Σ_v ‖Σ_{t: id_t = v} g_t‖² per example, by a loop over the vocabulary (float64)."""
    ids, g = np.asarray(ids), np.asarray(g, np.float64)
    return [
        sum(float(np.sum(np.sum(g[b][ids[b] == v], axis=0) ** 2)) for v in range(vocab))
        for b in range(len(ids))
    ]


def _grouped_gross(ids, g, vocab):
    """Σ_v (Σ_{t: id_t = v} ‖g_t‖)² per example (float64): the rows' gross sizes."""
    ids, norms = np.asarray(ids), np.linalg.norm(np.asarray(g, np.float64), axis=-1)
    return np.array(
        [sum(np.sum(norms[b][ids[b] == v]) ** 2 for v in range(vocab)) for b in range(len(ids))]
    )


@settings(max_examples=20, deadline=None, derandomize=True)
@given(length=st.integers(1, 40), vocab=st.integers(1, 6), dim=st.integers(1, 4))
@example(length=127, vocab=6, dim=2)  # the first positions' int8, at its end
@example(length=128, vocab=6, dim=2)  # int16
@example(length=300, vocab=2, dim=2)
def test_sorted_and_first_position_embedding_norms_equal_brute_force(length, vocab, dim):
    rng = np.random.default_rng(length * 100 + vocab * 10 + dim)
    ids = jnp.asarray(rng.integers(0, vocab, (3, length)), jnp.int32)  # runs of repeats
    g = jnp.asarray(rng.normal(size=(3, length, dim)), jnp.float32)
    want = _grouped_sums_squared(ids, g, vocab) + gn.ROUNDING * _grouped_gross(ids, g, vocab)
    np.testing.assert_allclose(ge.sorted_sq_norms(ids, g), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ge.first_position_sq_norms(ids, g), want, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(batch=st.integers(1, 40), rows=st.integers(1, 40), width=st.integers(1, 3))
def test_row_chunks_give_each_row_its_own_value(batch, rows, width):
    """by_row_chunks places every row's value once, at its row (the last chunk starts
    early and overlaps: an off-by-one there would move or drop rows)."""
    a = jnp.arange(batch * width, dtype=jnp.float32).reshape(batch, width)
    b = jnp.asarray(np.random.default_rng(batch).normal(size=(batch, 2, 3)), jnp.float32)

    def norms(a, b):
        return a[:, 0] * 1000.0 + jnp.sum(b * b, axis=(1, 2))

    got = jax.jit(lambda a, b: gn.by_row_chunks(norms, rows, a, b))(a, b)
    np.testing.assert_allclose(got, norms(a, b), rtol=1e-6)

    def grads(a, b):  # an array a row (a kernel's gradients, ghost_tap.Tap.grads)
        return a[:, :1, None] * 1000.0 + b

    got = jax.jit(lambda a, b: gn.by_row_chunks(grads, rows, a, b))(a, b)
    np.testing.assert_allclose(got, grads(a, b), rtol=1e-6)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(batch=st.integers(1, 5000), per_row=st.integers(1, 1 << 16))
def test_a_batch_is_one_pass_while_its_norm_temporaries_fit(batch, per_row):
    """chunk_rows: the whole batch while batch × per_row numbers fit in one pass;
    otherwise chunks that fit in NORM_CHUNK_NUMBERS (one row at least), fewer rows
    than the batch."""
    rows = gn.chunk_rows(per_row, batch)
    if batch * per_row <= gn.NORM_PASS_NUMBERS:
        assert rows == batch
    else:
        assert 1 <= rows < batch
        assert rows == 1 or rows * per_row <= gn.NORM_CHUNK_NUMBERS < (rows + 1) * per_row


@pytest.mark.parametrize(
    "outer, s, a, c, larger",  # larger: (S, a, c) whose x and g hold more than the temporaries
    [(True, 2, 8, 8, (64, 8, 8)), (False, 12, 2, 2, (12, 16, 16))],
)
def test_a_dense_norm_whose_temporaries_outgrow_x_and_g_is_taken_in_chunks(outer, s, a, c, larger):
    """kernel_sq_norms takes rows in chunks where its form's temporaries (G_b: a·c
    numbers an example; the Gram form's two S×S matrices) hold more than x and g (S·(a
    + c)) and more than NORM_PASS_NUMBERS in all, and each example's norm is still its
    own (brute force; the last chunk overlaps the one before)."""
    rng = np.random.default_rng(s)
    batch, spec = 7, gn.parse("ab,bc->ac", 2)
    x = jnp.asarray(rng.normal(size=(batch, s, a)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(batch, s, c)), jnp.float32)
    want = [float(np.sum(np.square(np.asarray(x[b]).T @ np.asarray(g[b])))) for b in range(batch)]
    gross = np.sum(np.linalg.norm(x, axis=-1) * np.linalg.norm(g, axis=-1), axis=1) ** 2
    chunks = []

    def by_row_chunks(norms, rows, *arrays):
        chunks.append(rows)
        return real(norms, rows, *arrays)

    real = gn.by_row_chunks
    with (
        mock.patch.object(gn, "outer_form", lambda *args, **kwargs: outer),
        mock.patch.object(gn, "by_row_chunks", by_row_chunks),
        mock.patch.object(gn, "NORM_PASS_NUMBERS", 0),
        mock.patch.object(gn, "NORM_CHUNK_NUMBERS", 2 * max(a * c, 2 * s * s)),
    ):
        got = jax.jit(lambda x, g: gn.kernel_sq_norms(spec, x, g))(x, g)
        assert chunks == [2]
        assert_norm_bound(got, want, gross)
        chunks.clear()
        n, d, e = larger
        inputs = jnp.ones((batch, n, d)), jnp.ones((batch, n, e))
        jax.eval_shape(lambda x, g: gn.kernel_sq_norms(spec, x, g), *inputs)
        assert chunks == [batch]


def test_lowered_chunk_limits_reach_chunk_rows():
    """The tests of norms in chunks lower NORM_PASS_NUMBERS and NORM_CHUNK_NUMBERS:
    chunk_rows must read them at the call (bound as its defaults, as from 546b213 until
    session 62, those tests computed one pass and could not fail over the chunks)."""
    assert gn.chunk_rows(5, 100) == 100
    with (
        mock.patch.object(gn, "NORM_PASS_NUMBERS", 10),
        mock.patch.object(gn, "NORM_CHUNK_NUMBERS", 12),
    ):
        assert gn.chunk_rows(5, 100) == 2
        assert gn.chunk_rows(5, 2) == 2
        assert gn.chunk_rows(5, 100, pass_numbers=1000) == 100


@settings(max_examples=20, deadline=None, derandomize=True)
@given(batch=st.integers(1, 24), length=st.integers(2, 20), numbers=st.integers(1, 400))
def test_embedding_norms_in_row_chunks_equal_brute_force(batch, length, numbers):
    """A large batch's embedding norms, computed a few rows at a time (the one-pass
    limit and the chunk size forced down to ``numbers``), equal the per-example loop
    over the vocabulary."""
    rng = np.random.default_rng(batch * 1000 + length * 10 + numbers)
    vocab, dim = 5, 3
    ids = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
    g = jnp.asarray(rng.normal(size=(batch, length, dim)), jnp.float32)
    saved = gn.NORM_CHUNK_NUMBERS, gn.NORM_PASS_NUMBERS
    gn.NORM_CHUNK_NUMBERS = gn.NORM_PASS_NUMBERS = numbers
    try:
        got = jax.jit(ge.embedding_sq_norms)(ids, g)
    finally:
        gn.NORM_CHUNK_NUMBERS, gn.NORM_PASS_NUMBERS = saved
    gross = length * np.sum(np.square(g), axis=(1, 2))
    assert_norm_bound(got, _grouped_sums_squared(ids, g, vocab), gross)


@pytest.mark.parametrize(
    "length, vocab, dim, form",
    [(16, 5, 32, "gram"), (64, 40, 64, "first"), (256, 300, 32, "first"), (600, 40, 64, "sorted")],
)
def test_each_embedding_norm_form_is_taken_where_cheapest(length, vocab, dim, form):
    costs = dict(zip(("gram", "sorted", "first"), ge.embedding_costs(length, dim)))
    assert min(costs, key=costs.get) == form == ge.embedding_form(length, dim)
    rng = np.random.default_rng(length)
    ids = jnp.asarray(rng.integers(0, vocab, (2, length)), jnp.int32)
    g = jnp.asarray(rng.normal(size=(2, length, dim)), jnp.float32)
    table = jnp.zeros((vocab, dim))
    grads = [
        jax.grad(lambda t, b=b: jnp.sum(jnp.take(t, ids[b], axis=0) * g[b]))(table)
        for b in range(2)
    ]
    want = [float(np.sum(np.asarray(G, np.float64) ** 2)) for G in grads]
    assert_norm_bound(ge.embedding_sq_norms(ids, g), want, _grouped_gross(ids, g, vocab))


# Whole models: ghost == per-example ---------------------------------------------------


def mlp():
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(7, activation="tanh"),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(3),
        ]
    )


def sequence_model():
    inputs = keras.Input((5, 4))
    h = keras.layers.Dense(6, activation="relu")(inputs)  # a Dense over a sequence
    h = keras.layers.EinsumDense("abc,cd->abd", output_shape=(5, 5), bias_axes="d")(h)
    h = keras.layers.EinsumDense("abc,bcd->ad", output_shape=(3,), bias_axes="d")(h)
    return keras.Model(inputs, h)


def text_model():
    inputs = keras.Input((8,), dtype="int32")
    h = keras.layers.Embedding(5, 4, mask_zero=True)(inputs)  # 0 is padding
    h = keras.layers.GlobalAveragePooling1D()(h)  # averages real tokens only
    h = keras.layers.Dense(3)(h)
    return keras.Model(inputs, h)


# Token counts of the 64-feature text models: the embedding's norm takes a different
# form in each (text_model's 8 tokens × 4 features: the Gram products).
TEXT_LENGTHS = {"mid_text": 64, "long_text": 512}


def test_the_text_models_cover_each_embedding_norm_form():
    assert ge.embedding_form(8, 4) == "gram"
    assert ge.embedding_form(TEXT_LENGTHS["mid_text"], 64) == "first"
    assert ge.embedding_form(TEXT_LENGTHS["long_text"], 64) == "sorted"


def _text_model(length, pool=keras.layers.GlobalMaxPooling1D, vocab=7, dim=64):
    """Averaged, the table's norm takes each position's gradient norm (ghost_pooling);
    max-pooled, each position has its own gradient and the norm takes all d features."""
    inputs = keras.Input((length,), dtype="int32")
    h = keras.layers.Embedding(vocab, dim)(inputs)
    h = pool()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def mid_text_model():  # each id's first position
    return _text_model(TEXT_LENGTHS["mid_text"])


def long_text_model():  # the ids sorted
    return _text_model(TEXT_LENGTHS["long_text"])


def max_text_model():  # 8 tokens × 4 features, max-pooled: the Gram form
    return _text_model(8, vocab=5, dim=4)


def pooled_text_model():  # averaged: each position's norm, over one feature
    return _text_model(TEXT_LENGTHS["mid_text"], keras.layers.GlobalAveragePooling1D)


def shared_text_model():
    """A table looked up three times (a Siamese text model): the first 6 ids averaged,
    the last 4 averaged (each lookup alone pooled, whose norm would be a bound: the two
    reads' gradients are different vectors), and ids 4-7 through a Dense. The ids
    repeat across the reads, negative ones wrapping (-1 reads row 6)."""
    inputs = keras.Input((10,), dtype="int32")
    table = keras.layers.Embedding(7, 4, name="table")
    a = keras.layers.GlobalAveragePooling1D()(table(inputs[:, :6]))
    b = keras.ops.mean(table(inputs[:, 6:]), axis=1)
    c = keras.layers.Dense(3, activation="tanh")(keras.layers.Flatten()(table(inputs[:, 4:8])))
    return keras.Model(inputs, keras.layers.Dense(3)(keras.ops.concatenate([a, b, c], -1)))


def lora_model():
    inputs = keras.Input((5, 4))
    dense = keras.layers.Dense(6, activation="relu")
    h = dense(inputs)
    einsum = keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 5), bias_axes="d")
    h = einsum(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    dense.enable_lora(2)
    einsum.enable_lora(3)
    rng = np.random.default_rng(5)  # B starts at zero, which would hide A's gradient
    for layer in (dense, einsum):
        b = layer.lora_kernel_b
        b.assign(rng.normal(size=b.shape).astype("float32"))
    return model


def embedding_lora_model():
    """An Embedding with LoRA adapters (the table frozen, its A and B trained): no ghost
    rule reads them, so they fall back to per-example gradients beside the ghost head."""
    inputs = keras.Input((8,), dtype="int32")
    embed = keras.layers.Embedding(5, 4, name="table")
    h = keras.layers.GlobalAveragePooling1D()(embed(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    embed.enable_lora(2)
    b = embed.lora_embeddings_b  # B starts at zero, which would hide A's gradient
    b.assign(np.random.default_rng(7).normal(size=b.shape).astype("float32"))
    return model


def long_sequence_model():
    """Narrow layers over 16 positions, where each norm takes the outer form (each
    example's gradient formed and kept for the sum): a Dense 4 → 3 with its bias, and
    a Dense 3 → 8 with LoRA adapters of rank 1."""
    inputs = keras.Input((16, 4))
    h = keras.layers.Dense(3, activation="tanh")(inputs)
    adapted = keras.layers.Dense(8, activation="relu")
    h = keras.layers.GlobalAveragePooling1D()(adapted(h))
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    adapted.enable_lora(1)
    b = adapted.lora_kernel_b  # B starts at zero, which would hide A's gradient
    b.assign(np.random.default_rng(6).normal(size=b.shape).astype("float32"))
    return model


def tied_lm_model(tie_weights=True, soft_cap=None):
    """A language model's head: a ReversibleEmbedding read as a lookup and, tied, in
    reverse as the logits (the table's two taps), the logits averaged over positions."""
    inputs = keras.Input((8,), dtype="int32")
    embed = keras.layers.ReversibleEmbedding(
        7, 4, tie_weights=tie_weights, logit_soft_cap=soft_cap, name="table"
    )
    h = keras.layers.Dense(4, activation="tanh")(embed(inputs))
    logits = embed(h, reverse=True)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(logits))


def seq2seq_model():
    """BART's and T5's table: one ReversibleEmbedding looked up for the encoder's ids
    (the first 6) and the decoder's (the last 4) and read in reverse twice, as the
    decoder's logits and as the encoder's mean's (a read of another rank): four taps,
    their norm each side's over its reads plus the cross term of the two sides."""
    inputs = keras.Input((10,), dtype="int32")
    table = keras.layers.ReversibleEmbedding(7, 4, name="table")
    context = keras.ops.mean(keras.layers.Dense(4, activation="tanh")(table(inputs[:, :6])), 1)
    h = keras.layers.Dense(4, activation="tanh")(table(inputs[:, 6:]) + context[:, None])
    logits = keras.layers.GlobalAveragePooling1D()(table(h, reverse=True))
    return keras.Model(inputs, logits + table(context, reverse=True))


def untied_lm_model():  # reverse_embeddings: a second table, read once
    return tied_lm_model(tie_weights=False, soft_cap=0.1)


def conv_model():  # 1-D convolutions: a causal one (dilated), grouped ones
    inputs = keras.Input((7, 2))
    h = keras.layers.Conv1D(3, 2, activation="relu")(inputs)
    h = keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2, name="causal")(h)
    h = keras.layers.Conv1D(6, 2, padding="causal", groups=2, name="causal_grouped")(h)
    h = keras.layers.Conv1D(2, 2, strides=2, groups=2, name="grouped")(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def causal_model():  # causal convolutions alone
    inputs = keras.Input((7, 2))
    h = keras.layers.Conv1D(3, 3, strides=2, padding="causal", activation="relu")(inputs)
    h = keras.layers.Conv1D(2, 2, padding="causal", dilation_rate=2)(h)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))


def conv2d_model():  # strides, "same" padding, dilation, groups
    inputs = keras.Input((7, 6, 2))
    h = keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(6, 2, dilation_rate=2, groups=3)(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def depthwise_model():  # depthwise (strided, "same", 2 filters a channel), separable (dilated)
    inputs = keras.Input((7, 6, 2))
    h = keras.layers.DepthwiseConv2D(
        3, strides=2, padding="same", depth_multiplier=2, activation="relu"
    )(inputs)
    h = keras.layers.SeparableConv2D(3, 2, dilation_rate=2, activation="tanh")(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def depthwise1d_model():  # separable ("same", no bias), then depthwise (strided, no bias)
    inputs = keras.Input((9, 2))
    h = keras.layers.SeparableConv1D(4, 3, padding="same", depth_multiplier=2, use_bias=False)(
        inputs
    )
    h = keras.layers.DepthwiseConv1D(2, strides=2, use_bias=False, activation="relu")(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def long_conv_model():  # 128 positions: ghost norms cost 86× the kernels' sizes
    inputs = keras.Input((130, 2))
    h = keras.layers.Conv1D(4, 3, activation="relu")(inputs)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def shared_model():  # one Dense called twice: its kernel has two uses
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(4, activation="tanh")
    return keras.Model(inputs, keras.layers.Dense(3)(dense(dense(inputs))))


def shared_sequence_model():
    """Layers called more than once, their norms one einsum's over every call's
    positions: a Dense over a sequence, its mean and its own output (three calls, two
    ranks); an EinsumDense twice; a narrow Dense twice over 40 positions (the outer form:
    80 positions of 2 → 2); a LoRA Dense twice (its adapters shared)."""
    inputs = keras.Input((40, 2))
    narrow = keras.layers.Dense(2, activation="tanh", name="narrow")
    h = narrow(narrow(inputs))
    dense = keras.layers.Dense(2, activation="tanh", name="dense")
    seq = dense(h)
    mean = dense(keras.ops.mean(h, axis=1))
    ein = keras.layers.EinsumDense("abc,cd->abd", (40, 2), bias_axes="d", name="ein")
    seq = ein(ein(seq))
    lora = keras.layers.Dense(3, name="lora")
    out = lora(dense(keras.layers.GlobalAveragePooling1D()(seq) + mean)) + lora(mean)
    model = keras.Model(inputs, out)
    lora.enable_lora(1)
    b = lora.lora_kernel_b  # B starts at zero, which would hide A's gradient
    b.assign(np.random.default_rng(6).normal(size=b.shape).astype("float32"))
    return model


def shared_recurrent_model():
    """Einsum taps of other rules called twice: an LSTM (its input and recurrent products
    and bias), a DepthwiseConv1D (patches) and a GRU, once on a sequence reversed."""
    inputs = keras.Input((5, 3))
    lstm = keras.layers.LSTM(3, return_sequences=True, name="lstm")
    depthwise = keras.layers.DepthwiseConv1D(2, name="depthwise")
    gru = keras.layers.GRU(2, name="gru")
    h = keras.ops.concatenate([lstm(lstm(inputs)), depthwise(depthwise(inputs))], axis=1)
    out = gru(h) + gru(keras.ops.flip(h, axis=1))
    return keras.Model(inputs, keras.layers.Dense(3)(out))


def shared_conv_model():
    """Convolutions called twice (a Siamese CNN): a Conv2D on an image and on a crop of
    it (72 positions of 18 → 3: the outer form), a Conv1D on two short sequences after
    a Dense called twice (4 positions of 32 → 16)."""
    inputs = keras.Input((7, 6, 2))
    conv = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv")
    a, b = conv(inputs), conv(inputs[:, 1:, 1:])
    wide = keras.layers.Dense(16, name="wide")
    conv1d = keras.layers.Conv1D(16, 2, strides=3, name="conv1d")
    u, v = (conv1d(wide(keras.ops.mean(h, axis=2))) for h in (a, b))
    pooled = [keras.ops.mean(h, axis=(1, 2)) for h in (a, b)]
    pooled += [keras.ops.mean(h, axis=1) for h in (u, v)]
    return keras.Model(inputs, keras.layers.Dense(3)(keras.ops.concatenate(pooled, axis=-1)))


def time_distributed_model():
    """Layers under ``TimeDistributed``, whose call folds the example's time axis into
    the batch axis: each example's norm must be its whole sequence's (the tap sees T
    rows of one example, not T examples)."""
    inputs = keras.Input((5, 4))
    h = keras.layers.TimeDistributed(keras.layers.Dense(6, activation="tanh"))(inputs)
    h = keras.layers.TimeDistributed(keras.layers.Conv1D(2, 2))(keras.ops.reshape(h, (-1, 5, 3, 2)))
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))


def transpose_model():
    """Transposed convolutions (a decoder's upsampling): strided with "same" padding,
    with output padding, a Conv1DTranspose called twice (one einsum over both calls'
    positions) and a dilated one; each an einsum of its undilated input, folded."""
    inputs = keras.Input((5, 4, 2))
    h = keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same", activation="relu")(h)
    h = keras.layers.Conv2DTranspose(2, (2, 3), strides=(2, 1), output_padding=(1, 0))(h)
    twice = keras.layers.Conv1DTranspose(2, 3, strides=2, name="t1d")
    h = keras.ops.mean(h, axis=1)
    h = keras.ops.concatenate([twice(h), twice(keras.ops.flip(h, axis=1))], axis=-1)
    h = keras.layers.Conv1DTranspose(3, 3, padding="same", dilation_rate=2, name="dilated")(h)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))


class TiedHead(keras.layers.Layer):
    """Reads another layer's kernel: a use that no tap sees."""

    def __init__(self, dense, **kwargs):
        super().__init__(**kwargs)
        self.dense = dense

    def call(self, h):
        return keras.ops.matmul(h, keras.ops.transpose(self.dense.kernel))


def tied_model():
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(3, activation="tanh")
    h = dense(inputs)
    return keras.Model(inputs, TiedHead(dense)(keras.layers.Dense(3)(h)))


def regularized_conv_model():  # a convolution's kernel that falls back
    inputs = keras.Input((7, 6, 2))
    h = keras.layers.Conv2D(3, 3, kernel_regularizer="l2", activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))


def regularized_model():
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, activation="tanh", kernel_regularizer="l2"),
            keras.layers.Dense(3),
        ]
    )


class ScaledDense(keras.layers.Dense):
    """A Dense subclass with its own call: ghost clipping must not replace it."""

    def call(self, inputs, training=None):
        return super().call(inputs * 2.0) + 1.0


def subclass_model():
    return keras.Sequential(
        [keras.Input((6,)), ScaledDense(5, activation="tanh"), keras.layers.Dense(3)]
    )


class Subclassed(keras.Model):
    """A subclassed model: its layers are found and tapped like any other's."""

    def __init__(self):
        super().__init__()
        self.embed = keras.layers.Embedding(5, 4)
        self.project = keras.layers.EinsumDense("abc,cd->abd", output_shape=(8, 3))
        self.head = keras.layers.Dense(3)

    def call(self, ids):
        h = self.project(self.embed(ids))
        return self.head(keras.ops.mean(h, axis=1))


class MappedAndBranched(keras.layers.Layer):
    """A Dense under ``ops.vectorized_map``, then one of two under ``ops.cond``, each
    on an input computed inside the map or branch."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.mapped = keras.layers.Dense(4)
        self.left, self.right = keras.layers.Dense(4), keras.layers.Dense(4)

    def build(self, input_shape):
        for dense in (self.mapped, self.left, self.right):
            dense.build(input_shape)

    def call(self, h):
        h = keras.ops.vectorized_map(lambda row: self.mapped(keras.ops.tanh(row)), h)
        return keras.ops.cond(
            keras.ops.sum(h) > 0, lambda: self.left(h * 2.0), lambda: self.right(-h)
        )


def looped_model():  # Dense layers inside a scan, a map and a branch: per-example
    inputs = keras.Input((5, 4))
    h = keras.layers.RNN(DenseCell(), return_sequences=True)(inputs)
    h = keras.layers.Flatten()(MappedAndBranched()(h))
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(h))


def spectral_model():  # assigns its kernel in call (normalised), then reads it
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.SpectralNormalization(keras.layers.Dense(5, activation="tanh")),
            keras.layers.Dense(3, name="head"),
        ]
    )


def recurrent_model():
    """LSTM, GRU and SimpleRNN rules without a mask: a sequence and states out of an
    LSTM (input dropout), a GRU from the LSTM's last state, backwards and unrolled, no
    bias, and a SimpleRNN (relu, input dropout) backwards from the same state."""
    inputs = keras.Input((6, 3))
    seq, h, c = keras.layers.LSTM(4, dropout=0.25, return_sequences=True, return_state=True)(inputs)
    g = keras.layers.GRU(4, go_backwards=True, unroll=True, use_bias=False)(seq, initial_state=h)
    simple = keras.layers.SimpleRNN(4, activation="relu", dropout=0.25, go_backwards=True)
    s = simple(seq, initial_state=h)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Concatenate()([g, c, s])))


def masked_recurrent_model():
    """Under padding masks (an example's first tokens too): a bidirectional LSTM whose
    masked outputs carry the state, then a GRU backwards whose masked outputs are zeros,
    then a SimpleRNN whose masked outputs carry the state."""
    inputs = keras.Input((8,), dtype="int32")
    h = keras.layers.Embedding(5, 3, mask_zero=True)(inputs)
    lstm = keras.layers.LSTM(4, return_sequences=True, zero_output_for_mask=False)
    h = keras.layers.Bidirectional(lstm)(h)
    h = keras.layers.GRU(3, return_sequences=True, go_backwards=True, zero_output_for_mask=True)(h)
    h = keras.layers.SimpleRNN(3, return_sequences=True, zero_output_for_mask=False)(h)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalMaxPooling1D()(h)))


def uncovered_recurrent_model():
    """Recurrent dropout, and a GRU whose reset gate acts before its recurrent product:
    the layer's own loop, per-example gradients."""
    return keras.Sequential(
        [
            keras.Input((5, 3)),
            keras.layers.GRU(4, reset_after=False, return_sequences=True, name="before"),
            keras.layers.LSTM(4, recurrent_dropout=0.25, return_sequences=True, name="dropped"),
            keras.layers.SimpleRNN(4, recurrent_dropout=0.5, return_sequences=True, name="rnn"),
            keras.layers.LSTM(3, name="covered"),
            keras.layers.Dense(3, name="head"),
        ]
    )


def data(kind, n=9, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    if kind in ("text", "max_text", "subclassed", "embedding_lora", "masked_recurrent"):
        x = rng.integers(0, 5, (n, 8)).astype("int32")
        x[:, 5:] = 0  # padding tokens
        if kind == "masked_recurrent":
            x[: n // 3, :2] = 0  # and some at the start
        return x, y
    if kind in ("tied_lm", "untied_lm"):  # 8 tokens of 7: repeated ids
        return rng.integers(0, 7, (n, 8)).astype("int32"), y
    if kind == "seq2seq":  # ids repeating across the encoder's and the decoder's
        return rng.integers(0, 7, (n, 10)).astype("int32"), y
    kind = {"pooled_text": "mid_text", "pooled_negative_ids": "negative_ids"}.get(kind, kind)
    if kind in TEXT_LENGTHS:
        return rng.integers(0, 7, (n, TEXT_LENGTHS[kind])).astype("int32"), y
    if kind == "shared_text":
        return rng.integers(-7, 7, (n, 10)).astype("int32"), y
    if kind == "negative_ids":  # -1 reads row 6 as 6 does (NumPy's wrap): one row
        return rng.integers(-7, 7, (n, TEXT_LENGTHS["mid_text"])).astype("int32"), y
    shape = {
        "sequence": (5, 4),
        "lora": (5, 4),
        "long_sequence": (16, 4),
        "conv": (7, 2),
        "looped": (5, 4),
        "conv2d": (7, 6, 2),
        "regularized_conv": (7, 6, 2),
        "depthwise": (7, 6, 2),
        "depthwise1d": (9, 2),
        "recurrent": (6, 3),
        "uncovered_recurrent": (5, 3),
        "long_conv": (130, 2),
        "shared": (4,),
        "shared_sequence": (40, 2),
        "shared_recurrent": (5, 3),
        "shared_conv": (7, 6, 2),
        "transpose": (5, 4, 2),
        "time_distributed": (5, 4),
        "tied": (4,),
    }
    return (rng.normal(size=(n, *shape.get(kind, (6,)))) * 2).astype("float32"), y


MODELS = {
    "mlp": mlp,
    "sequence": sequence_model,
    "text": text_model,
    "max_text": max_text_model,
    "mid_text": mid_text_model,
    "pooled_text": pooled_text_model,
    "negative_ids": mid_text_model,
    "pooled_negative_ids": pooled_text_model,
    "long_text": long_text_model,
    "lora": lora_model,
    "embedding_lora": embedding_lora_model,
    "long_sequence": long_sequence_model,
    "conv": conv_model,
    "conv2d": conv2d_model,
    "depthwise": depthwise_model,
    "depthwise1d": depthwise1d_model,
    "long_conv": long_conv_model,
    "recurrent": recurrent_model,
    "masked_recurrent": masked_recurrent_model,
    "uncovered_recurrent": uncovered_recurrent_model,
    "shared": shared_model,
    "shared_sequence": shared_sequence_model,
    "shared_recurrent": shared_recurrent_model,
    "shared_conv": shared_conv_model,
    "shared_text": shared_text_model,
    "transpose": transpose_model,
    "time_distributed": time_distributed_model,
    "tied": tied_model,
    "tied_lm": tied_lm_model,
    "untied_lm": untied_lm_model,
    "seq2seq": seq2seq_model,
    "regularized": regularized_model,
    "regularized_conv": regularized_conv_model,
    "subclass": subclass_model,
    "subclassed": Subclassed,
    "looped": looped_model,
    "spectral": spectral_model,
}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("clip", [0.05, 100.0])  # every example clipped; none clipped
def test_ghost_equals_per_example(kind, clip):
    x, y = data(kind)
    want = clipped_sum(MODELS[kind], x, y, "per_example", clip)
    got = clipped_sum(MODELS[kind], x, y, "ghost", clip)
    assert_same_sums(want, got)


@pytest.mark.parametrize("kind", ["conv", "conv2d", "long_conv", "shared_conv"])
def test_each_conv_norm_form_gives_per_examples_update(kind, monkeypatch):
    """Whichever form a convolution's norm takes (gcn.norm_form forced to each; a kernel
    read twice takes the outer or Gram form over both reads), ghost clipping's update
    is per-example clipping's: causal, strided "same", dilated and long convolutions,
    and one called on an image and on its crop, every example clipped."""
    x, y = data(kind)
    want = clipped_sum(MODELS[kind], x, y, "per_example")
    for form in ("outer", "gram", "shifted"):
        monkeypatch.setattr(gcn, "norm_form", lambda *args, form=form, **kwargs: form)
        assert_same_sums(want, clipped_sum(MODELS[kind], x, y, "ghost"))
    # The outer norm with each example's gradient not kept (gn.keeps refuses: too large
    # for the rows), so that the sum is the convolution's own kernel gradient.
    monkeypatch.setattr(gcn, "norm_form", lambda *args, **kwargs: "outer")
    monkeypatch.setattr(gn, "keeps", lambda *args: False)
    assert_same_sums(want, clipped_sum(MODELS[kind], x, y, "ghost"))


@pytest.mark.parametrize(
    "kind",
    [
        "sequence",
        "lora",
        "long_sequence",
        "conv2d",
        "transpose",
        "recurrent",
        "shared_sequence",
        "shared_conv",
        "untied_lm",
        "seq2seq",
    ],
)
def test_each_dense_norm_form_gives_per_examples_update(kind, monkeypatch):
    """Whichever form an einsum's norm takes (gn.outer_is_faster forced each way: the
    outer form keeps each example's gradient for the sum, the Gram form contracts x and
    g again; a kernel read more than once takes it over all its reads), ghost
    clipping's update is per-example clipping's: Dense and EinsumDense layers over
    sequences, LoRA's adapters, a grouped convolution's patches, a transposed one's
    folded einsum, recurrent layers' products, layers called more than once, a language
    model's untied head and a tied table read four times, every example clipped."""
    x, y = data(kind)
    want = clipped_sum(MODELS[kind], x, y, "per_example")
    for outer in (True, False):
        monkeypatch.setattr(gn, "outer_is_faster", lambda *args, outer=outer, **kw: outer)
        assert_same_sums(want, clipped_sum(MODELS[kind], x, y, "ghost"))
    # The outer norm with each example's gradient not kept (gn.keeps refuses), taken in
    # chunks of rows, and the sum the contraction of x and g.
    monkeypatch.setattr(gn, "outer_is_faster", lambda *args, **kw: True)
    monkeypatch.setattr(gn, "keeps", lambda *args: False)
    monkeypatch.setattr(gn, "NORM_PASS_NUMBERS", 0)
    monkeypatch.setattr(gn, "NORM_CHUNK_NUMBERS", 1)
    assert_same_sums(want, clipped_sum(MODELS[kind], x, y, "ghost"))


@pytest.mark.parametrize(
    "kind, formed",
    [
        ("long_sequence", {(4, 3), (3, 1), (1, 8)}),  # a Dense kernel, LoRA's A and B
        # the strided convolution over 4×3 positions, the grouped one's einsum
        ("conv2d", {(3, 3, 2, 3), (2, 2, 1, 6)}),
        # depthwise, separable's depthwise, and its pointwise 1×1 (small: the outer form)
        ("depthwise", {(3, 3, 2, 2), (2, 2, 4, 1), (1, 1, 4, 3)}),
    ],
)
def test_outer_form_kernels_keep_each_examples_gradient(kind, formed, monkeypatch):
    """A kernel whose norm takes the outer form keeps each example's gradient for the
    sum (Tap.grads) instead of contracting x and g again (Tap.sums): the update is
    per-example clipping's, every example clipped or none."""
    seen = set()
    grads = ghost.Tap.grads

    def spy(self, x, g):
        out = grads(self, x, g)
        if self.formed(x, g):
            seen.add(self.kernel_shape)
            assert self.kernel in out and not self.sums(x, g, jnp.ones(x.shape[0]))
        return out

    monkeypatch.setattr(ghost.Tap, "grads", spy)
    x, y = data(kind)
    for clip in (0.05, 100.0):
        want = clipped_sum(MODELS[kind], x, y, "per_example", clip)
        assert_same_sums(want, clipped_sum(MODELS[kind], x, y, "ghost", clip))
    assert seen == formed


@pytest.mark.parametrize(
    "kind",
    ["conv", "conv2d", "depthwise", "shared_conv", "text", "mid_text", "long_text", "shared_text"],
)
def test_norms_in_row_chunks_equal_per_example(kind, monkeypatch):
    """A large batch takes its convolution and embedding norms a chunk of rows at a
    time; forced down to 4 rows (of 9: the last chunk overlaps) and to 1 row, the
    update is per-example clipping's."""
    x, y = data(kind)
    want = clipped_sum(MODELS[kind], x, y, "per_example")
    by_row_chunks = gn.by_row_chunks
    for rows in (4, 1):
        chunked = []

        def forced(norms, _, *arrays, rows=rows, chunked=chunked):
            chunked.append(arrays[0].shape[0])
            return by_row_chunks(norms, rows, *arrays)

        monkeypatch.setattr(gn, "by_row_chunks", forced)
        assert_same_sums(want, clipped_sum(MODELS[kind], x, y, "ghost"))
        assert chunked and max(chunked) > rows  # the loop ran


def test_a_kernel_assigned_in_call_is_clipped_as_keras_trains_it():
    """SpectralNormalization assigns its normalised kernel in ``call(training=True)``
    and its Dense reads that: each example's gradient goes through the normalisation,
    as in plain Keras' fit. Brute force: ``jax.grad`` of each example's training call."""
    x, y = data("spectral")
    got = clipped_sum(spectral_model, x, y, "ghost", clip=0.05)
    keras.utils.set_random_seed(0)
    model = spectral_model()
    params = [v.value for v in model.trainable_variables]
    state = [v.value for v in model.non_trainable_variables]

    def loss(p, xi, yi):
        out, _ = model.stateless_call(p, state, xi[None], training=True)
        return SCE(yi[None], out)

    want = [np.zeros(p.shape) for p in params]
    for xi, yi in zip(x, y):
        g = [np.asarray(a, np.float64) for a in jax.grad(loss)(params, xi, yi)]
        scale = min(1.0, 0.05 / math.sqrt(sum(float(np.sum(a * a)) for a in g)))
        want = [w + scale * a for w, a in zip(want, g)]
    assert_same_sums(want, got)


def test_sample_weights():
    x, y = data("sequence")
    weights = np.random.default_rng(3).uniform(0.0, 3.0, len(y)).astype("float32")
    want = clipped_sum(sequence_model, x, y, "per_example", 0.5, weights)
    got = clipped_sum(sequence_model, x, y, "ghost", 0.5, weights)
    assert_same_sums(want, got)


def test_what_falls_back():
    """Only what ghost norms cannot cover exactly gets per-example gradients."""
    x = {k: data(k)[0] for k in MODELS}
    norm = fallback_of(mlp, x["mlp"])  # LayerNormalization's gamma and beta
    assert len(norm) == 2 and all("layer_normalization" in p for p in norm)
    assert fallback_of(sequence_model, x["sequence"]) == set()
    assert fallback_of(text_model, x["text"]) == set()
    assert fallback_of(lora_model, x["lora"]) == set()
    adapters = fallback_of(embedding_lora_model, x["embedding_lora"])
    assert adapters == {"table/lora_embeddings_a", "table/lora_embeddings_b"}
    assert fallback_of(conv_model, x["conv"]) == set()
    assert fallback_of(conv2d_model, x["conv2d"]) == set()
    assert fallback_of(depthwise_model, x["depthwise"]) == set()
    assert fallback_of(depthwise1d_model, x["depthwise1d"]) == set()
    assert fallback_of(shared_model, x["shared"]) == set()  # one einsum over both calls
    assert fallback_of(shared_sequence_model, x["shared_sequence"]) == set()
    assert fallback_of(shared_recurrent_model, x["shared_recurrent"]) == set()
    assert fallback_of(shared_conv_model, x["shared_conv"]) == set()
    assert fallback_of(shared_text_model, x["shared_text"]) == set()  # its lookups' tokens
    assert fallback_of(time_distributed_model, x["time_distributed"]) == set()
    assert fallback_of(transpose_model, x["transpose"]) == set()  # an einsum, folded
    tied = fallback_of(tied_model, x["tied"])
    assert any(p.endswith("kernel") for p in tied)
    assert fallback_of(tied_lm_model, x["tied_lm"]) == set()  # lookup and logits: one table
    # auto on a CPU: the table's norm costs more than twice its size (ghost._cheaper)
    assert fallback_of(tied_lm_model, x["tied_lm"], "auto") == {"table/embeddings"}
    assert fallback_of(untied_lm_model, x["untied_lm"]) == set()
    assert fallback_of(seq2seq_model, x["seq2seq"]) == set()  # two lookups, two reversed
    assert fallback_of(seq2seq_model, x["seq2seq"], "auto") == {"table/embeddings"}  # a CPU
    assert any("kernel" in p for p in fallback_of(regularized_model, x["regularized"]))
    assert len(fallback_of(subclass_model, x["subclass"])) == 2  # the subclass' kernel, bias
    assert fallback_of(Subclassed, x["subclassed"]) == set()
    looped = fallback_of(looped_model, x["looped"])  # 3 in the cell, 2 mapped, 4 branched
    assert len(looped) == 9 and not any(p.startswith("head") for p in looped)
    assert fallback_of(recurrent_model, x["recurrent"]) == set()
    assert fallback_of(masked_recurrent_model, x["masked_recurrent"]) == set()
    uncovered = fallback_of(uncovered_recurrent_model, x["uncovered_recurrent"])
    assert {p.split("/")[1] for p in uncovered} == {"before", "dropped", "rnn"}, uncovered
    assert len(uncovered) == 9
    spectral = fallback_of(spectral_model, x["spectral"])  # its assigned kernel alone
    assert len(spectral) == 1 and "spectral_normalization" in spectral.pop()


def test_rules_leave_no_instance_attribute():
    """The rules' ``call`` (and the recurrent rules' ``inner_loop``) are set on the
    instances only while the step is traced: after fit, every layer is its class'."""
    x, y = data("masked_recurrent")
    model = keras_dp.make_private(
        masked_recurrent_model(), whole_batch_update(len(y), 1.0, "ghost")
    )
    model.compile(optimizer="sgd", loss=SCE)
    model.fit(x, y, verbose=0)
    layers = [model, *model._flatten_layers(include_self=False)]
    # The LSTM both ways, the GRU and the SimpleRNN.
    assert sum(isinstance(layer, keras.layers.RNN) for layer in layers) == 4
    assert not [layer.name for layer in layers if {"call", "inner_loop"} & set(vars(layer))]


def test_fallback_is_logged_once(caplog):
    x, y = data("mlp")
    with caplog.at_level(logging.INFO, logger="keras_dp"):
        clipped_sum(mlp, x, y, "ghost")
    lines = [r.message for r in caplog.records if "Ghost clipping" in r.message]
    assert len(lines) == 1 and "layer_normalization" in lines[0] and "dense" not in lines[0]


@pytest.mark.parametrize("kind", ["mlp", "text", "pooled_text"])
def test_nonfinite_example_contributes_nothing(kind):
    """A row whose loss is NaN adds nothing: features of NaN (MLP), or an id past the
    table, which Keras' ``take`` reads as NaN (text: the embedding's ids go to the
    ghost sum's scatter as they are, not zeroed like its float arrays)."""
    x, y = data(kind)
    bad = x.copy()
    if kind == "mlp":
        bad[4] = np.nan
    else:
        bad[4, 1] = 99
    model_fn = MODELS[kind]
    keep = np.arange(len(y)) != 4
    for clipping in ("ghost", "per_example"):
        got = clipped_sum(model_fn, bad, y, clipping)
        assert all(np.all(np.isfinite(g)) for g in got)
        # The same sum as over the other examples alone.
        assert_same_sums(clipped_sum(model_fn, x[keep], y[keep], clipping), got)


@pytest.mark.parametrize(  # Gram forms; outer, kept; per-example LayerNorm; tied; untied; pooled;
    # depthwise patches; grouped patches
    "kind",
    [
        "sequence",
        "long_sequence",
        "mlp",
        "tied_lm",
        "untied_lm",
        "text",
        "depthwise",
        "recurrent",
        "conv",
        "transpose",
    ],
)
def test_mixed_bfloat16_never_exceeds_the_clip_norm(kind):
    """Under mixed_bfloat16 the norms and the clipped sum are float32 and read one
    stored copy of each bfloat16 gradient (clipping.stored: the MLP reached 1.00003 C,
    the LM heads 1.0007 C without it): one example's contribution (a batch of one) is
    at most C, and ghost agrees with per-example."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        x, y = data(kind, n=4)
        clip = 0.01
        for i in range(4):
            one = clipped_sum(MODELS[kind], x[i : i + 1], y[i : i + 1], "ghost", clip)
            norm = math.sqrt(sum(float(np.sum(g * g)) for g in one))
            assert norm <= clip * (1 + 1e-5), norm
            assert norm > 0.5 * clip
        want = clipped_sum(MODELS[kind], x, y, "per_example", clip)
        got = clipped_sum(MODELS[kind], x, y, "ghost", clip)
        assert_same_sums(want, got, rtol=3e-2)  # per-example's gradients are bfloat16
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _cancelling_pairs(rng, batch, length, x_dim, g_dim, scale=100.0):
    """Examples of ``length`` positions whose inputs come in equal pairs (a token read
    twice) with nearly opposite gradients: each pair's shares of G_b = Σ_t x_t ⊗ g_t
    cancel to a fraction η (1e-6 to 1e-2) of either."""
    half = length // 2
    x = rng.normal(size=(batch, half, x_dim)) * scale
    g = rng.normal(size=(batch, half, g_dim))
    eta = 10.0 ** rng.uniform(-6, -2, size=(batch, half, 1))
    x, g = np.concatenate([x, x], 1), np.concatenate([g, -g * (1 - eta)], 1)
    return x.astype(np.float32), g.astype(np.float32)


def test_gram_norms_bound_examples_whose_shares_cancel(monkeypatch):
    """Where an example's shares cancel, a Gram form's float32 rounding (units of 2⁻²⁴
    of the products, not of the norm) would be most of its norm or all of it. With
    ROUNDING's margin the norm is never below the example's gradient, neither its exact
    one nor the one float32 forms; without it, some draws fall below (so the draw
    exercises the margin)."""
    monkeypatch.setattr(gn, "outer_is_faster", lambda *args, **kwargs: False)  # Gram forms
    rng = np.random.default_rng(7)
    x, g = _cancelling_pairs(rng, 64, 8, 48, 24)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    exact = np.sum(np.square(np.einsum("bta,btc->bac", x64, g64)), axis=(1, 2))
    formed = np.asarray(gn.kernel_grads(gn.DENSE, x, g, (48, 24)), np.float64)
    formed = np.sum(np.square(formed), axis=(1, 2))
    # Embeddings: ids in equal pairs, their g nearly opposite (the Gram form).
    ids = np.tile(rng.permutation(40)[:4].reshape(1, 4), (64, 2))
    _, e = _cancelling_pairs(rng, 64, 8, 1, 64, scale=1.0)
    e64 = e.astype(np.float64)
    table = np.sum(np.square(e64[:, :4] + e64[:, 4:]), axis=(1, 2))  # each id's row, squared
    # A tied table: the lookup's gradient A_b nearly -R_b, its reversed read's.
    vocab, dim, positions = 6, 16, 5
    h = rng.normal(size=(64, positions, dim)).astype(np.float32) * 10
    delta = rng.normal(size=(64, positions, vocab)).astype(np.float32)
    reverse = np.einsum("bsv,bsd->bvd", delta, h)  # R_b, float32
    eta = 10.0 ** rng.uniform(-6, -2, size=(64, vocab, 1))
    lookup = (-reverse * (1 - eta)).astype(np.float32)  # g_t for ids 0…V-1: A_b
    tied_ids = np.tile(np.arange(vocab), (64, 1))
    spec = gn.parse("...d,vd->...v", 2)
    tied_exact = np.sum(
        np.square(
            lookup.astype(np.float64) + np.einsum("bsv,bsd->bvd", *map(np.float64, (delta, h)))
        ),
        axis=(1, 2),
    )
    tied_formed = np.sum(np.square((lookup + reverse).astype(np.float64)), axis=(1, 2))

    def norms():
        own = ge.embedding_sq_norms(tied_ids, lookup) + gn.kernel_sq_norms(spec, h, delta)
        return (
            np.asarray(gn.kernel_sq_norms(gn.DENSE, x, g), np.float64),
            np.asarray(ge.gram_sq_norms(jnp.asarray(ids), e), np.float64),
            np.asarray(
                own + ge.tied_term(tied_ids, lookup, *gn.grouped(spec, h, delta)), np.float64
            ),
        )

    wants = (np.maximum(exact, formed), table, np.maximum(tied_exact, tied_formed))
    for got, want in zip(norms(), wants):
        assert np.all(got >= want), np.min(got / want)
    # The sorted and first-position forms sum each row as the table's gradient does, so
    # the norm is the rows'; their margin bounds the clipped sum's rounding (below).
    margin = gn.ROUNDING * _grouped_gross(ids, e, 40)
    for form in (ge.sorted_sq_norms, ge.first_position_sq_norms):
        np.testing.assert_allclose(form(jnp.asarray(ids), e), table + margin, rtol=1e-3)
    monkeypatch.setattr(gn, "ROUNDING", 0.0)
    for got, want in zip(norms(), wants):
        assert np.any(got < want)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    pairs=st.integers(1, 16),
    x_dim=st.integers(1, 96),
    g_dim=st.integers(1, 96),
    scale=st.floats(-2, 4),
    seed=st.integers(0, 2**16),
)
def test_kernel_norms_are_never_below_cancelling_gradients(pairs, x_dim, g_dim, scale, seed):
    """Over drawn shapes and magnitudes, in both forms: 16 examples whose positions
    come in nearly cancelling pairs get a squared norm at least their gradient's, as
    float32 forms it (what the outer form keeps and sums) and, for the Gram form,
    exactly."""
    rng = np.random.default_rng(seed)
    x, g = _cancelling_pairs(rng, 16, 2 * pairs, x_dim, g_dim, scale=10.0**scale)
    formed = np.asarray(gn.kernel_grads(gn.DENSE, x, g, (x_dim, g_dim)), np.float64)
    formed = np.sum(np.square(formed), axis=(1, 2))
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    exact = np.sum(np.square(np.einsum("bta,btc->bac", x64, g64)), axis=(1, 2))
    for outer in (True, False):
        got = gn.grouped_sq_norms(*gn.grouped(gn.DENSE, x, g), outer)
        got = np.asarray(got, np.float64)
        assert np.all(got >= formed * (1 - 1e-6)), np.min(got / formed)
        if not outer:
            assert np.all(got >= exact), np.min(got / exact)


def given_gradient(y_true, y_pred):
    """A loss whose gradient at the outputs [B, T, d] is y itself (the label chooses it)."""
    return keras.ops.sum(y_true * y_pred, axis=(1, 2))


@pytest.mark.parametrize("outer", [False, True])
def test_an_example_whose_shares_cancel_never_exceeds_the_clip_norm(outer, monkeypatch):
    """A token read twice with nearly opposite gradients at a Dense layer, its gradient
    2·C: its contribution is at most C, in either norm form (gn.outer_is_faster forced).
    Without the Gram forms' rounding margin its norm came out below C and it contributed
    2.0·C, unclipped."""
    monkeypatch.setattr(gn, "outer_is_faster", lambda *args, **kwargs: outer)

    def model():
        return keras.Sequential([keras.Input((8, 48)), keras.layers.Dense(24, use_bias=False)])

    for seed in (83, 359):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(4, 48)) * 100
        g = rng.normal(size=(4, 24))
        eta = 10 ** np.random.default_rng(seed + 999).uniform(-6, -3)
        g = np.concatenate([g, -g * (1 - eta * rng.uniform(0.5, 2, size=(4, 1)))])
        x, g = np.concatenate([x, x]).astype(np.float32), g.astype(np.float32)
        norm = math.sqrt(np.sum(np.square(x.astype(np.float64).T @ g.astype(np.float64))))
        clip = norm / 2
        for clipping in ("ghost", "per_example"):
            one = clipped_sum(model, x[None], g[None], clipping, clip, loss=given_gradient)
            got = math.sqrt(sum(float(np.sum(t * t)) for t in one))
            assert 0 < got <= clip * (1 + 1e-5), (seed, clipping, got / clip)


def test_an_embeddings_cancelling_shares_never_exceed_the_clip_norm():
    """An example of 64 tokens, each id twice with nearly opposite gradients of size 10⁴
    (the first-position form), among 7 others: what it adds to the clipped sum is at
    most C. The sum adds each position's share f_b·g_t one by one, rounded by units of
    2⁻²⁴ of the shares' size: without the norm's margin on that size it added 1.004·C."""

    def model():
        return keras.Sequential([keras.Input((64,), dtype="int32"), keras.layers.Embedding(40, 64)])

    assert ge.embedding_form(64, 64) == "first"
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 40, size=(8, 64)).astype("int32")
    y = rng.normal(size=(8, 64, 64)).astype("float32")
    ids[-1] = np.tile(np.arange(32), 2)
    big = rng.normal(size=(32, 64)) * 1e4
    y[-1] = np.concatenate([big, -big * (1 - 1e-6)]).astype("float32")
    clip = 0.01
    for clipping in ("ghost", "per_example"):
        both = clipped_sum(model, ids, y, clipping, clip, loss=given_gradient)
        others = clipped_sum(model, ids[:-1], y[:-1], clipping, clip, loss=given_gradient)
        added = math.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(both, others)))
        assert 0 < added <= clip * (1 + 1e-5), (clipping, added / clip)


@pytest.mark.parametrize("model_fn", [mid_text_model, pooled_text_model])
def test_negative_token_ids_never_exceed_the_clip_norm(model_fn):
    """An example whose ids hold -1 and V-1 (the same table row, as NumPy's take wraps
    it): its contribution (a batch of one) is at most C. Counted as two rows, the norm
    lost their cross term and this contribution reached 1.21 C (max-pooled; averaged,
    the pooled norm would be half the row's)."""
    x = np.array([[-1, 6] * 32], dtype="int32")
    clip = 0.01
    one = clipped_sum(model_fn, x, np.array([1]), "ghost", clip)
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in one))
    assert 0.99 * clip < norm <= clip * (1 + 1e-5), norm


def test_refused_with_user_level_blocks():
    with pytest.raises(ValueError, match="clipping"):
        keras_dp.DPConfig(
            target_epsilon=1.0,
            batch_size=4,
            steps=1,
            privacy_unit="user",
            examples_per_user=2,
            clipping="ghost",
        )
    with pytest.raises(ValueError, match="DPConfig.clipping"):
        keras_dp.DPConfig(target_epsilon=1.0, batch_size=4, steps=1, clipping="fast")


def test_forward_flops_are_xlas_count_of_the_products():
    def f(x, w, k):
        conv = jax.lax.conv_general_dilated(
            x, k, (2, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return (
            conv,
            jnp.einsum("bij,jk->bik", x.reshape(6, 16, 5), w[:5, :7]),
            x.reshape(12, 40) @ w,
        )

    args = (jnp.ones((3, 8, 10, 2)), jnp.ones((40, 40)), jnp.ones((3, 3, 2, 5)))
    cost = jax.jit(f).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = ghost_cost.flops(jax.make_jaxpr(f)(*args).jaxpr)
    assert flops == cost["flops"]
    # Inside pjit and a scan of 3 trips (which XLA's count takes once):
    g = jax.jit(lambda *a: jax.lax.scan(lambda c, _: (c, f(*a)), 0.0, None, length=3)[1])
    assert ghost_cost.flops(jax.make_jaxpr(g)(*args).jaxpr) == 3 * flops


def test_small_models_run_one_pass_on_a_cpu_and_others_keep_their_chunks():
    config = keras_dp.DPConfig(target_epsilon=2.0, batch_size=64, steps=1, dataset_size=1000)
    small = ghost.Plan((), frozenset(), (), flops=10**5, fallback_size=100)
    assert ghost_cost.one_pass(small, config, 128)
    assert not ghost_cost.one_pass(None, config, 128)  # per-example clipping
    assert not ghost_cost.one_pass(dataclasses.replace(small, flops=2 * 10**6), config, 128)
    # Per-example gradients in one pass: an MLP's middle layer without a ghost rule,
    # 96×96 (3.3 MB at 88 rows) ran as fast in one pass as in chunks of 16, 128×128
    # (5.8 MB) 1.1-1.25× slower, 256×256 1.3×, 512×512 2.5× (benchmarks/fallback_pass.py).
    for width, whole in [(96, True), (128, False), (256, False), (512, False)]:
        layer = dataclasses.replace(small, fallback_size=width * width + width)
        assert ghost_cost.one_pass(layer, config, 88) is whole
    chosen = dataclasses.replace(config, microbatch_size=16)
    assert not ghost_cost.one_pass(small, chosen, 128)  # the user's microbatch_size is kept
    # A convolution's kernel without a ghost rule: autodiff's grouped convolution over
    # the rows, 2.3x slower in one pass (benchmarks/clipping.py --models autoencoder).
    assert not ghost_cost.one_pass(dataclasses.replace(small, fallback_convolved=True), config, 88)


@pytest.mark.parametrize(
    "kind, convolved",
    [("regularized_conv", True), ("regularized", False), ("mlp", False)],
)
def test_a_plan_tells_a_convolutions_kernel_among_its_fallback(kind, convolved):
    """Plan.fallback_convolved: a fallback variable reaches a convolution's kernel
    operand (a regularised Conv2D's), and not a Dense's or a LayerNormalization's."""
    plan = plan_of(MODELS[kind], data(kind)[0], "ghost")
    assert plan.fallback and plan.fallback_convolved is convolved


def test_reaches_convolution_follows_a_kernel_into_inner_jaxprs():
    """ghost_cost.reaches_convolution: only the kernel operand counts (an input that
    reaches a convolution's data does not), through other operations and jitted calls."""
    x, k = jnp.ones((1, 6, 2)), jnp.ones((3, 2, 4))

    def f(x, k, scale):
        conv = jax.jit(
            lambda a, b: jax.lax.conv_general_dilated(
                a, b, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
            )
        )
        return conv(x * scale, jnp.flip(k, 0))

    jaxpr = jax.make_jaxpr(f)(x, k, 2.0).jaxpr
    assert ghost_cost.reaches_convolution(jaxpr, [1])
    assert not ghost_cost.reaches_convolution(jaxpr, [0, 2])


def test_tap_costs_count_the_kernel_axes_from_x():
    """Tap.costs: (the cheaper exact norm, forming the gradient) in multiply-adds an
    example, from the positions S, the kernel's axes from x (Kx, sized by the kernel:
    x's shape is not kept) and from out (Ko): outer S·Kx·Ko, Gram S²·(Kx + Ko).
    lora_model: a Dense 4 → 6 over 5 positions with adapters of rank 2, an EinsumDense
    6 → 5 with adapters of rank 3, a Dense 5 → 3 on the pooled vector. (Kx was
    counted as 1 before: the adapters' norms cost 4 and 6 times less than they do.)"""
    lora = plan_of(lora_model, data("lora")[0], "ghost")
    got = [(t.kernel_shape, t.costs()) for t in lora.taps if t.kind == "einsum"]

    def costs(s, kx, ko):
        return min(s * kx * ko, s * s * (kx + ko)), s * kx * ko

    want = [  # the frozen base kernels are not tapped
        ((4, 2), costs(5, 4, 2)),  # Dense's adapter A: x → rank
        ((2, 6), costs(5, 2, 6)),  # its adapter B: rank → out
        ((6, 3), costs(5, 6, 3)),
        ((3, 5), costs(5, 3, 5)),
        ((5, 3), costs(1, 5, 3)),  # on a vector: Gram ‖x‖²‖g‖², 5 + 3
    ]
    assert got == want


def embedding_classifier(tokens: int, vocab: int, dim: int, pool=keras.layers.GlobalMaxPooling1D):
    def build():
        return keras.Sequential(
            [
                keras.Input((tokens,), dtype="int32"),
                keras.layers.Embedding(vocab, dim, name="table"),
                pool(),
                keras.layers.Dense(2),
            ]
        )

    return build


@pytest.mark.parametrize(
    "tokens, vocab, dim, per_example",
    [
        (64, 1000, 64, False),
        (128, 1000, 32, False),
        (256, 5000, 32, False),
        (256, 1000, 16, True),
        (512, 256, 32, True),
        (128, 200, 32, True),
    ],
)
def test_auto_gives_a_table_per_example_gradients_where_they_cost_less(
    tokens, vocab, dim, per_example
):
    """auto's choice for an Embedding's table, as timed through fit on 2 CPU cores
    (benchmarks/embedding_table.py): its per-example gradient is a zeroed V×d table an
    example, which cost far more than its numbers counted alone (64 tokens of a 1,000 ×
    64 table: 15.9 ms a step per-example, 0.87 ms ghost)."""
    ids = np.random.default_rng(0).integers(0, vocab, (2, tokens)).astype("int32")
    fallback = fallback_of(embedding_classifier(tokens, vocab, dim), ids, "auto")
    assert [p.endswith("table/embeddings") for p in fallback] == ([True] if per_example else [])


def test_auto_takes_per_example_gradients_only_for_convolutions_over_many_positions(caplog):
    """On a CPU, auto runs a whole step as clipping="per_example" (bit for bit, with one
    log line) only for a CNN whose norms cost 80× its kernels' sizes (a convolution over
    many positions; a transposed one: the next test), one pass or chunked, unless those
    per-example gradients would
    exceed 256 MiB. LoRA adapters over a sequence keep ghost norms in chunks too, though
    each norm costs more multiply-adds than the adapter holds numbers: their outer
    form's gradients are kept for the sum (measured faster than the per-example program
    on BERT-LoRA and Gemma3 LoRA, ghost_cost.ghost_pays); so does an MLP."""
    assert jax.default_backend() == "cpu"
    chunked = whole_batch_update(9, 0.05, "auto", microbatch_size=3)
    one_pass = whole_batch_update(9, 0.05, "auto")
    lora = plan_of(lora_model, data("lora")[0], "auto")
    costs = [t.costs()[0] for t in lora.active if t.use_kernel]
    sizes = [math.prod(t.kernel_shape) for t in lora.active if t.use_kernel]
    assert len(costs) == 5 and sum(costs) >= sum(sizes)  # 4 adapter kernels and the head
    assert ghost_cost.ghost_pays(lora, chunked) and ghost_cost.ghost_pays(lora, one_pass)
    assert ghost_cost.ghost_pays(plan_of(mlp, data("mlp")[0], "auto"), chunked)
    conv = plan_of(conv2d_model, data("conv2d")[0], "auto")
    costs = [t.costs()[0] for t in conv.active if t.use_kernel]
    sizes = [math.prod(t.kernel_shape) for t in conv.active if t.use_kernel]
    assert sum(sizes) <= sum(costs) < 80 * sum(sizes)  # a CNN's bar: 80× its kernels' sizes
    assert ghost_cost.ghost_pays(conv, chunked) and ghost_cost.ghost_pays(conv, one_pass)
    conv = plan_of(long_conv_model, data("long_conv")[0], "auto")
    assert not ghost_cost.ghost_pays(conv, chunked)
    assert not ghost_cost.ghost_pays(conv, one_pass)
    sizes = sum(math.prod(t.kernel_shape) for t in conv.active if t.use_kernel)
    huge = dataclasses.replace(chunked, batch_size=2**28 // (4 * sizes) + 1)
    assert ghost_cost.ghost_pays(conv, huge)  # its per-example gradients: over 256 MiB
    assert not ghost_cost.ghost_pays(
        conv, dataclasses.replace(huge, batch_size=huge.batch_size - 1)
    )

    x, y = data("long_conv")
    with caplog.at_level(logging.INFO, logger="keras_dp"):
        auto = clipped_sum(long_conv_model, x, y, "auto", microbatch_size=3)
    assert sum("per-example gradients for every variable" in r.message for r in caplog.records)
    want = clipped_sum(long_conv_model, x, y, "per_example", microbatch_size=3)
    for a, b in zip(auto, want):
        np.testing.assert_array_equal(a, b)
    for model, name in ((lora_model, "lora"), (mlp, "mlp")):
        caplog.clear()
        x, y = data(name)
        with caplog.at_level(logging.INFO, logger="keras_dp"):
            assert_same_sums(
                clipped_sum(model, x, y, "per_example", microbatch_size=3),
                clipped_sum(model, x, y, "auto", microbatch_size=3),
            )
        assert not any("every variable" in r.message for r in caplog.records)


def test_auto_charges_a_convolution_left_unformed_its_sum():
    """ghost_cost.ghost_pays: a convolution kernel whose norm does not form each
    example's gradient (read twice, as a Siamese tower reads it) pays a second
    contraction over its positions for its sum. One 3×3 convolution (2 → 4 channels, 25
    positions, the outer form): read once, its norm costs 25× its kernel's size and
    ghost pays; read twice, the norm over both reads costs 50× and the sums as much
    again, 100×, over the bar of 80×: per-example (the Siamese CNN of
    benchmarks/clipping.py measured 36–56% faster so)."""
    assert jax.default_backend() == "cpu"
    config = whole_batch_update(9, 0.05, "auto")

    def siamese(reads):
        def build():
            inputs = keras.Input((reads, 7, 7, 2))
            conv = keras.layers.Conv2D(4, 3, use_bias=False)
            pooled = [keras.ops.mean(conv(inputs[:, i]), axis=(1, 2)) for i in range(reads)]
            return keras.Model(inputs, sum(pooled[1:], pooled[0]))

        x = np.random.default_rng(reads).normal(size=(9, reads, 7, 7, 2)).astype("float32")
        return plan_of(build, x, "auto")

    once, twice = siamese(1), siamese(2)
    assert [t.shared for t in twice.active] == [True, True]
    assert ghost_tap.norm_costs(once.active)[0] == 25 * 72 and ghost_cost.ghost_pays(once, config)
    assert ghost_tap.norm_costs(twice.active)[0] == 50 * 72 < 80 * 72
    assert not ghost_cost.ghost_pays(twice, config)


def test_auto_runs_a_model_with_transposed_convolutions_per_example_on_a_cpu():
    """ghost_cost.ghost_pays: a transposed convolution's rule (its einsum, told by
    ghost_transpose.is_transposed) sends a CPU step to per-example gradients, measured
    faster on four such models, unless they would exceed 256 MiB; an EinsumDense with
    another equation is not one."""
    assert jax.default_backend() == "cpu"
    config = whole_batch_update(9, 0.05, "auto", microbatch_size=3)
    plan = plan_of(transpose_model, data("transpose")[0], "auto")
    kernels = [t for t in plan.active if t.use_kernel]
    # four layers, one called twice: five taps
    assert sum(t.kind == "einsum" and gt.is_transposed(t.spec) for t in kernels) == 5
    assert not ghost_cost.ghost_pays(plan, config)
    sizes = sum(math.prod(t.kernel_shape) for t in {t.kernel: t for t in kernels}.values())
    huge = dataclasses.replace(config, batch_size=2**28 // (4 * sizes) + 1)
    assert ghost_cost.ghost_pays(plan, huge)
    lora = plan_of(lora_model, data("lora")[0], "auto")  # "abc,cd->abd" and Dense
    assert not any(gt.is_transposed(t.spec) for t in lora.active)
