"""An embedding read only through a sum over its positions: its norm from each
position's gradient norm (keras_dp.ghost_pooling), against brute force and against
per-example clipping; and which traces the plan finds pooled."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

from keras_dp import ghost_embedding as ge

from .helpers import ghost_plan
from .test_ghost import assert_norm_bound, assert_same_sums, clipped_sum

L = keras.layers
pytestmark = pytest.mark.filterwarnings("ignore:DPConfig\\(noise_multiplier=0")


POOLED_FORMS = {
    "chosen": lambda ids, g, vocab: ge.pooled_sq_norms(ids, g, vocab),
    "binned": lambda ids, g, vocab: ge.binned_sq_norms(ids, _norms(g), vocab),
    "first": lambda ids, g, vocab: ge.first_position_sq_norms(ids, _norms(g)[..., None]),
    "sorted": lambda ids, g, vocab: ge.sorted_sq_norms(ids, _norms(g)[..., None]),
}


def _norms(g):
    return jnp.linalg.norm(g, axis=-1)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    length=st.integers(1, 40),
    vocab=st.integers(1, 6),
    dim=st.integers(1, 5),
    parallel=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_pooled_norms_bound_the_norm_and_equal_it_for_one_direction(
    length, vocab, dim, parallel, seed
):
    """Σ_v (Σ_{t: id_t = v} ‖g_t‖)², by each form, is never below ‖A_b‖² (brute force:
    jax.grad of each example's lookup), and equals it (to the rounding margin) when
    every g_t of an example is one vector times a number ≥ 0 (some 0: masked positions)."""
    rng = np.random.default_rng(seed)
    batch = 3
    ids = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
    if parallel:
        weights = rng.uniform(0, 2, (batch, length, 1)) * (
            rng.uniform(size=(batch, length, 1)) > 0.3
        )
        g = weights * rng.normal(size=(batch, 1, dim))
    else:
        g = rng.normal(size=(batch, length, dim))
    g = jnp.asarray(g, jnp.float32)
    table = jnp.zeros((vocab, dim))

    def norm(b):
        grad = jax.grad(lambda t: jnp.sum(jnp.take(t, ids[b], axis=0) * g[b]))(table)
        return float(np.sum(np.square(np.asarray(grad, np.float64))))

    want = np.array([norm(b) for b in range(batch)])
    gross = length * np.sum(np.square(np.asarray(g, np.float64)), axis=(1, 2))
    for form, norms in POOLED_FORMS.items():
        got = np.asarray(norms(ids, g, vocab), np.float64)
        assert np.all(got >= want * (1 - 1e-6)), (form, got, want)
        if parallel:
            assert_norm_bound(got, want, gross)
        elif length > 1 and dim > 1:
            assert np.all(got > want), (form, got, want)  # random directions: strictly above


@pytest.mark.parametrize(
    "length, vocab, form",
    [(64, 1000, "binned"), (64, 32000, "first"), (512, 5000, "binned"), (512, 300000, "sorted")],
)
def test_a_pooled_norm_takes_its_cheapest_form(length, vocab, form):
    """As measured (88 examples, 2 CPU cores): (64, 1,000) binned 0.06 ms, first 0.12;
    (64, 32,000) first 0.14, binned 1.45; (512, 5,000) binned 0.52, sorted 9.3."""
    costs = dict(zip(("binned", "sorted", "first"), ge.pooled_costs(length, vocab)))
    assert min(costs, key=costs.get) == form


class _Both(L.Layer):  # the positions read twice: averaged and max-pooled
    def call(self, h):
        return ops.concatenate([ops.mean(h, 1), ops.max(h, 1)], -1)


class _Summed(L.Layer):
    def call(self, h):
        return ops.sum(h * 2.0, axis=1)


class _Centered(L.Layer):  # the positions read twice (the average, then each)
    def call(self, h):
        return ops.mean(h - ops.mean(h, 1, keepdims=True), 1) + ops.mean(h, 1)


class _Signed(L.Layer):  # each position scaled alike across its features, some by < 0
    def call(self, h):
        return ops.mean(h * (ops.arange(h.shape[1], dtype="float32") - 3.5)[:, None], 1)


class _ByFeature(L.Layer):  # each feature scaled alike at every position
    def call(self, h):
        return ops.mean(h * ops.arange(h.shape[-1], dtype="float32"), 1)


class _ByPosition(L.Layer):  # each position scaled alike across its features
    def call(self, h):
        return ops.mean(h * ops.arange(h.shape[1], dtype="float32")[:, None], 1)


class _Partial(L.Layer):  # a sum over half of the positions only: two sums
    def call(self, h):
        return ops.reshape(
            ops.sum(ops.reshape(h, (-1, 2, 4, h.shape[-1])), 2), (-1, 2 * h.shape[-1])
        )


class _Logged(L.Layer):  # an effect beside the average (no result, no shape)
    def call(self, h):
        jax.debug.callback(lambda: None)
        return ops.mean(h, axis=1)


class _Jitted(L.Layer):  # the average inside a jitted function (an inner jaxpr)
    def call(self, h):
        return jax.jit(lambda v: jnp.mean(v, axis=1))(h)


POOLINGS = {  # name: (the layers after the embedding, mask_zero, pooled)
    "average": (lambda: [L.GlobalAveragePooling1D()], False, True),
    "masked average": (lambda: [L.GlobalAveragePooling1D()], True, True),
    "spatial dropout": (lambda: [L.SpatialDropout1D(0.3), L.GlobalAveragePooling1D()], False, True),
    "sum": (lambda: [_Summed()], False, True),
    "scaled by position": (lambda: [_ByPosition()], False, True),
    "scaled by feature": (lambda: [_ByFeature()], False, True),
    "jitted average": (lambda: [_Jitted()], False, True),
    "average beside a callback": (lambda: [_Logged()], False, True),
    "dropout": (lambda: [L.Dropout(0.3), L.GlobalAveragePooling1D()], False, False),
    "max": (lambda: [L.GlobalMaxPooling1D()], False, False),
    "average and max": (lambda: [_Both()], False, False),
    "centered": (lambda: [_Centered()], False, False),
    "signed by position": (lambda: [_Signed()], False, False),
    "convolution before": (lambda: [L.Conv1D(4, 3), L.GlobalAveragePooling1D()], False, False),
    "half sums": (lambda: [_Partial()], False, False),
    "dense before": (
        lambda: [L.Dense(4, activation="tanh"), L.GlobalAveragePooling1D()],
        False,
        False,
    ),
    "flatten": (lambda: [L.Flatten()], False, False),
}


def pooling_model(name):
    after, mask, _ = POOLINGS[name]
    inputs = keras.Input((8,), dtype="int32")
    h = L.Embedding(5, 4, mask_zero=mask, name="table")(inputs)
    for layer in after():
        h = layer(h)
    return keras.Model(inputs, L.Dense(3)(h))


@pytest.mark.parametrize("name", sorted(POOLINGS))
def test_the_plan_finds_a_lookup_pooled_only_where_each_position_has_one_gradient(name):
    keras.utils.set_random_seed(0)
    ids = np.random.default_rng(0).integers(0, 5, (2, 8)).astype("int32")
    plan = ghost_plan(pooling_model(name), ids)
    lookups = [t for t in plan.taps if t.kind == "embedding"]
    assert len(lookups) == 1 and lookups[0].use_kernel
    assert lookups[0].pooled == POOLINGS[name][2]


@pytest.mark.parametrize(
    "name", ["average", "scaled by feature", "sum", "signed by position", "convolution before"]
)
@pytest.mark.parametrize("clip", [0.05, 100.0])  # every example clipped; none clipped
def test_ghost_equals_per_example_whether_pooled_or_not(name, clip):
    """Pooled (each position's norm) or not (the forms over all features), the update
    is per-example clipping's. The last two give positions of one id different
    gradients (a signed scale, a convolution): there the pooled bound is loose, and
    taken for them it clips these examples more than per-example clipping does."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, (9, 8)).astype("int32")
    y = rng.integers(0, 3, 9)
    want = clipped_sum(lambda: pooling_model(name), x, y, "per_example", clip)
    got = clipped_sum(lambda: pooling_model(name), x, y, "ghost", clip)
    assert_same_sums(want, got)


def test_a_pooled_norm_costs_less_than_the_features_forms():
    """auto weighs the pooled norm at one feature (64 tokens × 64 features, 7 ids: their
    norms added into 7 bins) against the forms over all 64 features."""
    keras.utils.set_random_seed(0)
    ids = np.random.default_rng(0).integers(0, 7, (2, 64)).astype("int32")

    def plan(pool):
        inputs = keras.Input((64,), dtype="int32")
        h = pool()(L.Embedding(7, 64)(inputs))
        return ghost_plan(keras.Model(inputs, L.Dense(3)(h)), ids).taps[0]

    pooled, unpooled = plan(L.GlobalAveragePooling1D), plan(L.GlobalMaxPooling1D)
    assert pooled.pooled and not unpooled.pooled
    assert pooled.costs()[0] == min(ge.pooled_costs(64, 7)) + 64 * 64
    assert unpooled.costs()[0] == min(ge.embedding_costs(64, 64))
    assert pooled.costs()[0] < unpooled.costs()[0] and pooled.costs()[1] == unpooled.costs()[1]
