"""What fit feeds the step: tfds sources, fixed-size batches, compilations, keys."""

import jax
import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_dp
from keras_dp import DPConfig, data, noise, sampling

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
        (packed, yb) = batches[i]
        mask = packed["dp_mask"]
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
        (a, ya), (b, yb) = bound[i], ladder[i]
        real = int(a["dp_mask"].sum())
        assert int(b["dp_mask"].sum()) == real
        rows = usual if smaller and real <= usual else bound.physical
        assert len(b["dp_mask"]) == len(yb) == rows
        assert b["dp_mask"][:real].all()  # one shard: real rows first
        np.testing.assert_array_equal(b["dp_x"][:real], a["dp_x"][:real])
        np.testing.assert_array_equal(yb[:real], ya[:real])
        assert (b["dp_step"] == a["dp_step"][0]).all()


def test_a_fit_over_both_batch_shapes_trains_as_one_over_the_bound(monkeypatch):
    """Half the draws fit the usual rows, half need the bound's: two compiled shapes,
    and the same weights as a fit that always feeds the bound's rows."""
    from keras_dp import step as dp_step

    def run(usual):
        traces = []

        class Counting(keras_dp.DPModel, keras.Sequential):
            def train_step(self, state, batch):
                traces.append(len(batch[1]))  # runs only when jit traces
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
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert dp_step.usual_rows(small, config, example) is None
