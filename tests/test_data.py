"""What fit feeds the step: tfds sources, fixed-size batches, compilations, keys."""

import jax
import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds

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
