"""What fit feeds the step: the samplers, tfds sources, fixed-size batches, compilations,
keys."""

import collections
import itertools
import math

import jax
import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_dp
from keras_dp import DPConfig, _backend, data, noise, sampling
from keras_dp import rows as batch_rows

from .test_training import LOSS, mlp


class TinyRecords(tfds.core.GeneratorBasedBuilder):
    """A 40-example dataset written locally as array_record (no download)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "x": tfds.features.Tensor(shape=(5,), dtype=np.float32),
                    "y": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("x", "y"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        x, y = arrays()
        for i in range(len(x)):
            yield i, {"x": x[i], "y": y[i]}


def arrays(n=40):
    rng = np.random.default_rng(3)
    return rng.normal(size=(n, 5)).astype("float32"), rng.integers(0, 3, n)


def dp_fit(x, y=None, **config):
    model = keras_dp.make_private(mlp(), DPConfig(target_epsilon=4.0, seed=7, **config))
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS)
    model.fit(x, y, verbose=0)
    return model


def _chisquare_of_subsets(draws, n, probability):
    """p-value of the subsets drawn against ``probability(subset)`` over all 2^n."""
    from scipy import stats

    subsets = [frozenset(c) for k in range(n + 1) for c in itertools.combinations(range(n), k)]
    expected = np.array([probability(s) for s in subsets])
    assert abs(expected.sum() - 1) < 1e-12
    seen = collections.Counter(frozenset(d.tolist()) for d in draws)
    assert set(seen) <= {s for s, p in zip(subsets, expected) if p > 0}
    observed = np.array([seen[s] for s in subsets])
    keep = expected > 0
    return stats.chisquare(observed[keep], expected[keep] * len(draws)).pvalue


@pytest.mark.parametrize("q, truncate_to", [(0.35, None), (0.5, 3), (0.8, 5)])
def test_poisson_draws_are_the_accountants_sampler(q, truncate_to):
    """Each example in independently with probability q; a draw of more than B_max keeps
    a uniformly random B_max of them (dp_accounting's TruncatedSubsampledGaussianDpEvent).
    Checked on every subset of 6 examples: P(S) = q^|S|(1-q)^(6-|S|) below B_max, and at
    B_max also 1/C(k, B_max) of each larger draw of k that holds S."""
    n, trials = 6, 6000
    draws = [
        sampling.poisson_indices(sampling.step_rng(11, t), n, q, truncate_to) for t in range(trials)
    ]
    assert all(np.all(np.diff(d) > 0) for d in draws)  # sorted, without repeats
    top = n if truncate_to is None else truncate_to

    def probability(subset):
        s = len(subset)
        if s > top:
            return 0.0
        p = q**s * (1 - q) ** (n - s)
        if s == top:  # larger draws cut to this subset: C(n-s, k-s) supersets of size k
            p += sum(
                math.comb(n - s, k - s) * q**k * (1 - q) ** (n - k) / math.comb(k, s)
                for k in range(s + 1, n + 1)
            )
        return p

    assert _chisquare_of_subsets(draws, n, probability) > 1e-3


def test_fixed_draws_are_uniform_subsets_of_b():
    n, b, trials = 6, 2, 3000
    draws = [sampling.fixed_indices(sampling.step_rng(12, t), n, b) for t in range(trials)]
    pvalue = _chisquare_of_subsets(draws, n, lambda s: (len(s) == b) / math.comb(n, b))
    assert pvalue > 1e-3


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    steps=st.lists(st.integers(0, 2**40), min_size=1, max_size=6),
)
def test_step_streams_are_step_rng_in_any_order(seed, steps):
    """The fit's reused generator gives update t exactly step_rng(seed, t), whatever
    was drawn before (a resumed run, steps revisited); other steps, other numbers."""
    streams = sampling.StepStreams(seed)
    for step in steps + steps[::-1]:
        a = streams.at(step)
        drawn = (a.binomial(1000, 0.05), a.random(3), a.choice(50, 5, replace=False))
        b = sampling.step_rng(seed, step)
        expected = (b.binomial(1000, 0.05), b.random(3), b.choice(50, 5, replace=False))
        assert drawn[0] == expected[0]
        np.testing.assert_array_equal(drawn[1], expected[1])
        np.testing.assert_array_equal(drawn[2], expected[2])
    # Neighbouring updates' streams do not overlap (a counter in the block's word would).
    here, after = (set(sampling.step_rng(seed, t).random(64)) for t in (steps[0], steps[0] + 1))
    assert not here & after
    assert (
        sampling.step_rng(seed, steps[0]).random() != sampling.step_rng(seed ^ 1, steps[0]).random()
    )


def test_draw_indices_runs_the_configs_sampler():
    poisson = DPConfig(target_epsilon=4.0, batch_size=8, epochs=2).calibrate(60)
    untruncated = DPConfig(target_epsilon=4.0, batch_size=8, epochs=2, accountant="rdp")
    fixed = DPConfig(target_epsilon=4.0, batch_size=8, epochs=2, sampling="fixed", accountant="rdp")
    untruncated, fixed = untruncated.calibrate(60), fixed.calibrate(60)
    assert poisson.max_batch_size is not None and untruncated.max_batch_size is None
    for step in range(5):
        rng = lambda step=step: sampling.step_rng(3, step)  # noqa: E731
        for config in (poisson, untruncated):
            np.testing.assert_array_equal(
                data.draw_indices(config, 3, step),
                sampling.poisson_indices(rng(), 60, 8 / 60, config.max_batch_size),
            )
        np.testing.assert_array_equal(
            data.draw_indices(fixed, 3, step), sampling.fixed_indices(rng(), 60, 8)
        )


def test_tfds_array_record_source_trains_like_the_same_arrays(tmp_path):
    builder = TinyRecords(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    source = builder.as_data_source(split="train")
    assert len(source) == 40 and isinstance(source[0], dict)
    from_source = dp_fit(source, batch_size=8, epochs=2)
    # tfds shuffles records on write: compare with arrays in the source's order.
    items = [source[i] for i in range(len(source))]
    x = np.stack([item["x"] for item in items])
    y = np.array([item["y"] for item in items])
    assert sorted(map(tuple, x.tolist())) == sorted(map(tuple, arrays()[0].tolist()))
    from_arrays = dp_fit(x, y, batch_size=8, epochs=2)
    assert from_source.dp_steps == from_arrays.dp_steps == 10
    # The same seed draws the same examples, so the two runs end identical.
    for a, b in zip(from_source.trainable_variables, from_arrays.trainable_variables):
        np.testing.assert_allclose(np.asarray(a.value), np.asarray(b.value), rtol=1e-6)
    assert from_source.privacy_spent().epsilon == from_arrays.privacy_spent().epsilon


def test_fixed_sampling_feeds_exactly_b_distinct_real_rows():
    x, y = arrays()
    config = DPConfig(
        target_epsilon=4.0, batch_size=8, epochs=2, sampling="fixed", accountant="rdp", seed=1
    ).calibrate(40)
    model = keras_dp.make_private(mlp(), config)
    model._dp_seed = 1
    source = sampling.ExampleSource(x, y)
    batches = data.DPBatches(model, source, config, chunk=2, per_epoch=5)
    seen = []
    for i in range(5):
        (packed, yb) = batch_rows.unpack_rows(batches[i])
        mask, _ = batch_rows.split_mask_key(packed["dp_mask_key"])
        assert mask.sum() == 8 and mask[:8].all()  # real rows first, exactly B
        rows = {tuple(r) for r in packed["dp_x"][:8]}
        assert len(rows) == 8  # without replacement
        seen.append(rows)
    assert seen[0] != seen[1]  # a fresh draw every step
    model = dp_fit(x, y, batch_size=8, epochs=2, sampling="fixed", accountant="rdp")
    assert model.dp_steps == 10
    assert model.privacy_spent().epsilon == model.dp_config.epsilon(10)


def test_one_compilation_per_fit():
    traces = []

    class Counting(keras_dp.DPModel, keras.Sequential):
        def train_step(self, state, batch):
            traces.append(jax.tree.map(np.shape, batch))  # runs only when jit traces
            return super().train_step(state, batch)

    keras.utils.set_random_seed(0)
    model = Counting(
        [keras.Input((5,)), keras.layers.Dense(3)],
        dp_config=DPConfig(target_epsilon=4.0, batch_size=4, epochs=3, seed=0),
    )
    model.compile(optimizer="sgd", loss=LOSS)
    model.fit(*arrays(), verbose=0)
    assert model.dp_steps == 30
    assert 1 <= len(traces) <= 2, traces


def fold_in_key_data(seed: int, step: int) -> np.ndarray:
    """JAX's own fold_in(fold_in(key(low word), high word), step) of the 64-bit seed:
    the data of the noise key that update ``step`` must be fed."""
    low = jax.random.key(np.uint32(seed & 0xFFFFFFFF))
    key = jax.random.fold_in(jax.random.fold_in(low, seed >> 32), step)
    return np.asarray(jax.random.key_data(key))


def test_noise_keys_follow_the_ledger_across_hash_blocks(monkeypatch):
    """The noise key fed with update t is JAX's fold_in(fold_in(key(low), high), t),
    hashed on the host a few updates at a time: across blocks, after a new secret seed,
    and after a resume that goes back."""
    monkeypatch.setattr(data, "_KEYS_AT_ONCE", 3)
    x, y = np.zeros((40, 3), "float32"), np.zeros(40, "int32")
    config = DPConfig(target_epsilon=8.0, noise_multiplier=1.0, batch_size=4, epochs=2)
    config = config.calibrate(40)
    model = keras_dp.make_private(mlp(), config)
    model._dp_seed = seed = 2**40 + 17
    batches = data.DPBatches(model, sampling.ExampleSource(x, y), config, 4, 20)

    for start, stop in ((5, 14), (2, 4)):
        batches.resume_at(start)
        for step in range(start, stop):
            if step == 9:  # a restored checkpoint can bring a new secret seed
                model._dp_seed = seed = seed ^ 0x5A5A5A5A5A
            mask, key = batch_rows.split_mask_key(
                batch_rows.unpack_rows(batches[0])[0]["dp_mask_key"]
            )
            np.testing.assert_array_equal(
                key, np.tile(fold_in_key_data(seed, step), (len(mask), 1))
            )


def test_noise_root_uses_all_64_bits_of_the_seed():
    low = 12345
    keys = [noise.root_key(low + (hi << 32)) for hi in range(3)]
    draws = [np.asarray(jax.random.normal(k, (4,))) for k in keys]
    assert not np.allclose(draws[0], draws[1]) and not np.allclose(draws[1], draws[2])
    np.testing.assert_array_equal(
        draws[0], np.asarray(jax.random.normal(noise.root_key(low), (4,)))
    )


def test_unknown_item_structures_are_x_only():
    items = [np.ones(3) * i for i in range(4)]

    class Seq:
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    x, y, sw = sampling.ExampleSource(Seq()).gather(np.array([2, 0]))
    np.testing.assert_array_equal(x, np.stack([items[2], items[0]]))
    assert y is None and sw is None


@pytest.mark.parametrize("bad", [[(np.ones(3), 1), (np.ones(4), 1)]])
def test_ragged_examples_are_refused(bad):
    with pytest.raises(ValueError, match="ragged"):
        sampling.ExampleSource(bad).gather(np.array([0, 1]))


def packed_batches(config, usual, n):
    x, y = arrays(n)
    model = keras_dp.make_private(mlp(), config)
    model._dp_seed = 5
    return data.DPBatches(model, sampling.ExampleSource(x, y), config, 4, 1, usual)


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(2, 40),
    extra=st.integers(1, 300),
    usual=st.integers(1, 60),
    seed=st.integers(0, 2**20),
)
def test_usual_size_batches_hold_the_same_draws(batch, extra, usual, seed):
    """A draw of at most ``usual`` examples comes in ``usual_physical`` rows, a larger
    one in the bound's; either way the same real rows, in the same order."""
    n = batch + extra
    config = DPConfig(
        target_epsilon=50.0, noise_multiplier=1.0, batch_size=batch, epochs=2, seed=seed
    ).calibrate(n)
    bound, ladder = packed_batches(config, None, n), packed_batches(config, usual, n)
    assert bound.usual is None
    smaller = ladder.usual is not None
    assert smaller == (usual < bound.physical)  # rows are not rounded to chunks of 4
    for i in range(6):
        (a, ya), (b, yb) = batch_rows.unpack_rows(bound[i]), batch_rows.unpack_rows(ladder[i])
        (mask_a, key_a), (mask_b, key_b) = (
            batch_rows.split_mask_key(p["dp_mask_key"]) for p in (a, b)
        )
        real = int(mask_a.sum())
        assert int(mask_b.sum()) == real
        rows = usual if smaller and real <= usual else bound.physical
        assert len(mask_b) == len(yb) == rows
        assert mask_b[:real].all()  # one shard: real rows first
        np.testing.assert_array_equal(b["dp_x"][:real], a["dp_x"][:real])
        np.testing.assert_array_equal(yb[:real], ya[:real])
        assert (key_b == key_a[0]).all()


def test_a_fit_over_both_batch_shapes_trains_as_one_over_the_bound(monkeypatch):
    """Half the draws fit the usual rows, half need the bound's: two compiled shapes,
    and the same weights as a fit that always feeds the bound's rows."""
    from keras_dp import step as dp_step

    def run(usual):
        traces = []

        class Counting(keras_dp.DPModel, keras.Sequential):
            def train_step(self, state, batch):
                traces.append(len(batch_rows.unpack_rows(batch)[1]))  # runs only when jit traces
                return super().train_step(state, batch)

        monkeypatch.setattr(dp_step, "usual_rows", lambda *args: usual)
        keras.utils.set_random_seed(0)
        model = Counting(
            [keras.Input((5,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)],
            dp_config=DPConfig(target_epsilon=4.0, batch_size=16, epochs=2, seed=3),
        )
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS)
        model.fit(*arrays(160), verbose=0)
        return model, traces

    bound, one_shape = run(None)
    ladder, two_shapes = run(16)
    assert len(one_shape) == 1 and sorted(two_shapes) == [16, one_shape[0]]
    assert ladder.dp_steps == bound.dp_steps == 20
    for a, b in zip(ladder.trainable_variables, bound.trainable_variables):
        np.testing.assert_allclose(np.asarray(a.value), np.asarray(b.value), rtol=1e-5, atol=1e-6)


def test_usual_rows_only_where_a_one_pass_step_computes_its_padding(monkeypatch):
    from keras_dp import step as dp_step

    small = mlp()
    example = np.zeros((1, 5), "float32")
    config = DPConfig(target_epsilon=1.0, batch_size=64, steps=1)
    assert dp_step.usual_rows(small, config, example) == 88  # 64 + 3·8, to a multiple of 8
    for other in (
        DPConfig(target_epsilon=1.0, batch_size=64, steps=1, clipping="per_example"),
        DPConfig(target_epsilon=1.0, batch_size=64, steps=1, microbatch_size=16),
        DPConfig(target_epsilon=1.0, batch_size=64, steps=1, sampling="fixed", accountant="rdp"),
    ):
        assert dp_step.usual_rows(small, other, example) is None
    wide = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1024), keras.layers.Dense(600)])
    assert dp_step.usual_rows(wide, config, example) is None  # 1.2 MFLOP: chunked
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    assert dp_step.usual_rows(unbuilt, config, example) is None and not unbuilt.built
    monkeypatch.setattr(_backend, "on_cpu", lambda: False)
    assert dp_step.usual_rows(small, config, example) is None


def _laid_out(indices, physical, shards):
    """The real rows dealt round-robin over ``shards`` equal shards, each real-first,
    padding example 0: written as a loop over the sampled examples."""
    per_shard = physical // shards
    padded, mask = [0] * physical, [False] * physical
    for k, index in enumerate(indices):
        at = (k % shards) * per_shard + k // shards
        padded[at], mask[at] = int(index), True
    return np.asarray(padded), np.asarray(mask)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(3, 200),
    batch=st.integers(1, 40),
    shards=st.sampled_from([1, 2, 4]),
    usual=st.one_of(st.none(), st.integers(1, 50)),
    sampler=st.sampled_from(["poisson", "fixed"]),
    form=st.sampled_from(["arrays", "dict", "weighted", "items"]),
    seed=st.integers(0, 2**62),
)
def test_each_batch_is_its_draw_laid_out(n, batch, shards, usual, sampler, form, seed):
    """Every batch fed to the step holds the sampler's draw for its update, laid out in
    shards (checked against a loop), the update's number and the seed's two words on
    every row; over several updates, sources and layouts."""
    from .helpers import on_devices

    batch = min(batch, n)
    rng = np.random.default_rng(seed % 2**32)
    x = rng.normal(size=(n, 3)).astype("float32")
    y, w = rng.integers(0, 3, n), rng.random(n).astype("float32")
    config = DPConfig(
        target_epsilon=50.0,
        noise_multiplier=1.0,
        batch_size=batch,
        epochs=2,
        sampling=sampler,
        accountant="rdp" if sampler == "fixed" else "pld",
    ).calibrate(n)
    source = {
        "arrays": lambda: sampling.ExampleSource(x, y),
        "dict": lambda: sampling.ExampleSource({"a": x, "b": x[:, :1]}, y),
        "weighted": lambda: sampling.ExampleSource(x, y, w),
        "items": lambda: sampling.ExampleSource([(x[i], y[i]) for i in range(n)]),
    }[form]()
    with on_devices(shards):
        model = keras_dp.make_private(mlp(), config)
        model._dp_seed = seed
        batches = data.DPBatches(model, source, config, 4, 3, usual)
        batches.resume_at(5)
        for step in range(5, 9):
            if step == 7:  # a restored checkpoint can bring a new secret seed
                seed = seed ^ 0x5A5A5A5A5A
                model._dp_seed = seed
            fed = batch_rows.unpack_rows(batches[step - 5])
            packed, labels = fed[0], fed[1]
            indices = data.draw_indices(config, seed, step)
            fed_mask, fed_key = batch_rows.split_mask_key(packed["dp_mask_key"])
            rows = len(fed_mask)
            if batches.usual is not None and len(indices) <= batches.usual:
                assert rows == batches.usual_physical
            else:
                assert rows == batches.physical
            padded, mask = _laid_out(indices, rows, shards)
            np.testing.assert_array_equal(fed_mask, mask)
            x_fed = packed["dp_x"]["a"] if form == "dict" else packed["dp_x"]
            np.testing.assert_array_equal(x_fed, x[padded])
            np.testing.assert_array_equal(labels, y[padded])
            if form == "weighted":
                np.testing.assert_array_equal(fed[2], w[padded])
            else:
                assert len(fed) == 2
            words = fold_in_key_data(seed, step)
            np.testing.assert_array_equal(fed_key, np.tile(words, (rows, 1)))
            assert packed["dp_mask_key"].dtype == np.uint32


def test_the_adapter_feeds_the_batches_in_order_as_they_are():
    x, y = arrays()
    config = DPConfig(target_epsilon=4.0, batch_size=8, epochs=2).calibrate(40)
    model = keras_dp.make_private(mlp(), config)
    model._dp_seed = 21
    twins = [data.DPBatches(model, sampling.ExampleSource(x, y), config, 4, 5) for _ in range(2)]
    fed = list(data.adapter(twins[0]).get_jax_iterator())
    assert len(fed) == 5
    for i, batch in enumerate(fed):
        expected = twins[1][i]
        assert jax.tree.structure(batch) == jax.tree.structure(expected)
        for a, b in zip(jax.tree.leaves(batch), jax.tree.leaves(expected)):
            assert type(a) is np.ndarray
            np.testing.assert_array_equal(a, b)


# One matrix a batch (batch_rows.pack_rows) ------------------------------------------------

_DTYPES = ["float64", "float32", "int64", "int32", "uint32", "bool", "int8", "float16"]


@st.composite
def batch_parts(draw):
    """(x, y, sw, mask, key) of a batch: arrays of any dtype and trailing shape, x a
    dict (keys a keras-hub model uses, and one that cannot name columns) or an array."""
    rows = draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))

    def array():
        dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
        shape = (rows, *draw(st.lists(st.integers(0, 3), max_size=2)))
        if dtype.kind == "b":
            return rng.random(shape) < 0.5
        if dtype.kind in "iu":  # within int32's range: JAX's conversion raises beyond it
            low = 0 if dtype.kind == "u" else -(2**31)
            return rng.integers(low, 2**31 - 1, shape, endpoint=True).astype(dtype)
        values = rng.normal(size=shape) * 10.0 ** rng.integers(-30, 30, shape)
        with np.errstate(over="ignore"):  # float16: ±inf
            return values.astype(dtype)

    keys = draw(st.lists(st.sampled_from(["token_ids", "padding_mask", "a1", "b-2"]),
                         min_size=1, max_size=3, unique=True))  # fmt: skip
    x = {k: array() for k in keys} if draw(st.booleans()) else array()
    y = array() if draw(st.booleans()) else None
    sw = array() if draw(st.booleans()) else None
    mask = rng.random(rows) < 0.7
    key = rng.integers(0, 2**32, 2, dtype=np.uint32)
    return x, y, sw, mask, key


def as_jax_would(tree):
    """``tree``'s arrays in the dtypes jax gives numpy arrays (64-bit mode off)."""
    return jax.tree.map(lambda a: a.astype(jax.dtypes.canonicalize_dtype(a.dtype)), tree)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(parts=batch_parts(), inner=st.booleans())
def test_a_packed_batch_unpacks_to_its_leaves_bit_for_bit(parts, inner):
    """batch_rows.pack_rows, then batch_rows.unpack_rows (numpy and traced), gives the batch that
    batch_rows.leaf_rows builds, in the dtypes jax would give it: every value's bits (floats
    from 1e-30 to 1e30, both signs, int32's whole range, booleans, empty trailing
    axes), x's dict keys, and the leaves it does not pack (int8, float16, a key that
    cannot name columns, an extra leaf)."""
    extra = {"dp_inner": parts[3].copy()} if inner else {}
    want = as_jax_would(batch_rows.leaf_rows(*parts, **extra))
    packed = batch_rows.pack_rows(*parts, **extra)
    unpacked = jax.jit(batch_rows.unpack_rows)(packed)
    for got in (as_jax_would(batch_rows.unpack_rows(packed)), unpacked):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert a.dtype == b.dtype and a.shape == b.shape
            bits = {4: np.uint32, 2: np.uint16, 1: np.uint8}[b.dtype.itemsize]
            np.testing.assert_array_equal(np.asarray(a).view(bits), np.asarray(b).view(bits))
    # Every array of 32-bit numbers or booleans is in the matrix, but an extra leaf and
    # a dict x whose keys cannot all name columns.
    x = parts[0]
    unnamed = jax.tree.leaves(x) if isinstance(x, dict) and "b-2" in x else []
    for leaf in jax.tree.leaves({k: v for k, v in packed[0].items() if k != batch_rows.ROWS}):
        dtype = jax.dtypes.canonicalize_dtype(leaf.dtype)
        packs = dtype.kind == "b" or dtype.itemsize == 4
        assert not packs or any(leaf is a for a in [*unnamed, *extra.values()])


def test_a_batch_is_one_matrix_where_keras_puts_each_leaf_on_the_devices(monkeypatch):
    """On an accelerator and under a keras.distribution, Keras' JAX loop puts each leaf
    of a batch on the devices in a call of its own; there a batch of arrays is one
    uint32 matrix (x float64, y int64 and the weights included). On one CPU, where
    the step takes numpy leaves as they are, it stays leaves."""
    x, y = arrays()
    w = np.ones(len(y))
    config = DPConfig(target_epsilon=4.0, batch_size=8, epochs=2).calibrate(40)
    model = keras_dp.make_private(mlp(), config)
    model._dp_seed = 5
    from .helpers import on_devices

    def first_batch():
        source = sampling.ExampleSource(x.astype("float64"), y.astype("int64"), w)
        return data.DPBatches(model, source, config, 4, 5)[0]

    assert len(jax.tree.leaves(first_batch())) == 4  # x, mask-key rows, y, weights
    with on_devices(2):
        (one,) = jax.tree.leaves(first_batch())
    monkeypatch.setattr(_backend, "on_cpu", lambda: False)
    (packed,) = first_batch()
    (layout,) = packed[batch_rows.ROWS]
    assert layout == "x:float32:5:0;y:int32::5;sw:float32::6;mk:uint32:3:7"
    assert one.dtype == np.uint32 and one.shape == packed[batch_rows.ROWS][layout].shape
