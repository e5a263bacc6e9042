"""DP training: checked against naive per-example loops and exact distributions."""

import math
import re

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from scipy import stats

import keras_dp
from keras_dp import DPConfig, _backend

DEBUG = dict(target_epsilon=math.inf, noise_multiplier=0.0)  # explicit non-private debug
pytestmark = pytest.mark.filterwarnings("ignore:DPConfig\\(noise_multiplier=0")


def mlp(seed=0, dropout=0.0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((5,)), keras.layers.Dense(4, activation="tanh")]
    if dropout:
        layers.append(keras.layers.Dropout(dropout))
    return keras.Sequential(layers + [keras.layers.Dense(3)])


def data(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype("float32") * 3, rng.integers(0, 3, n)


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def private(model, lr=1.0, **config):
    model = keras_dp.make_private(model, DPConfig(**config))
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=LOSS)
    return model


def naive_clipped_mean(model, x, y, clip, loss_fn=None):
    """-(1/B) Σ clip(g_i), one example at a time with jax.grad (no vmap); ``loss_fn(w,
    xi, yi)`` of the trainable variables ``w`` (default: LOSS of the model's output)."""
    import jax

    weights = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def model_loss(w, xi, yi):
        pred, _ = model.stateless_call(w, non_trainable, xi[None])
        return LOSS(yi[None], pred)

    loss_fn = loss_fn or model_loss

    total = [np.zeros(w.shape, np.float64) for w in weights]
    for xi, yi in zip(x, y):
        g = [np.asarray(a, np.float64) for a in jax.grad(loss_fn)(weights, xi, yi)]
        norm = math.sqrt(sum(float(np.sum(a * a)) for a in g))
        scale = min(1.0, clip / norm)
        total = [t + scale * a for t, a in zip(total, g)]
    return [-t / len(x) for t in total]


def recorded_draws(monkeypatch) -> list:
    """The indices ``data.draw_indices`` returns during the test, one array per update."""
    drawn, draw = [], keras_dp.data.draw_indices
    monkeypatch.setattr(
        keras_dp.data, "draw_indices", lambda *a: drawn.append(draw(*a)) or drawn[-1]
    )
    return drawn


# 3, 4: a padded last chunk; 64: no loop
@pytest.mark.parametrize("microbatch", [None, 1, 3, 4, 64])
def test_update_is_minus_mean_of_clipped_gradients(microbatch):
    x, y = data(10)
    model = private(
        mlp(), batch_size=10, steps=1, l2_clip_norm=0.5, microbatch_size=microbatch, seed=1, **DEBUG
    )
    model.build((None, 5))
    before = [np.array(v.value) for v in model.trainable_variables]
    expected = naive_clipped_mean(model, x, y, 0.5)
    model.fit(x, y, verbose=0)  # q = 1: every example in the one step
    for b, v, e in zip(before, model.trainable_variables, expected):
        np.testing.assert_allclose(np.array(v.value) - b, e, rtol=1e-4, atol=1e-6)
    # Clipping was active: some example's norm exceeded 0.5.
    assert model.privacy_spent().steps == 1


class OwnLoss(keras.Model):
    """A subclassed model whose compute_loss never calls the compiled loss."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return LOSS(y, y_pred) + 0.01 * keras.ops.sum(self.dense.kernel**2)


@pytest.mark.parametrize("clipping", ["per_example", "ghost"])
def test_a_compute_loss_override_is_the_loss_each_example_clips(clipping):
    """Keras' compile(loss=...) beside it is unused (and left unbuilt by Keras)."""
    import jax.numpy as jnp

    x, y = data(10)
    keras.utils.set_random_seed(3)
    model = private(OwnLoss(), batch_size=10, steps=1, l2_clip_norm=0.5, clipping=clipping, **DEBUG)
    model(x[:1])  # builds it

    def own_loss(w, xi, yi):  # the override, written out for one example
        logits = xi[None] @ w[0] + w[1]
        return LOSS(yi[None], logits) + 0.01 * jnp.sum(w[0] ** 2)

    before = [np.array(v.value) for v in model.trainable_variables]
    expected = naive_clipped_mean(model, x, y, 0.5, own_loss)
    model.fit(x, y, verbose=0)  # q = 1: every example in the one step
    for b, v, e in zip(before, model.trainable_variables, expected):
        np.testing.assert_allclose(np.array(v.value) - b, e, rtol=1e-4, atol=1e-6)


class Reconstructs(keras.Model):
    """An autoencoder: its loss reads x alone, and fit gets no labels."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encode, self.decode = keras.layers.Dense(2, activation="tanh"), keras.layers.Dense(5)

    def call(self, x):
        return self.decode(self.encode(x))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return keras.ops.mean((y_pred - x) ** 2)


@pytest.mark.parametrize("clipping", ["per_example", "ghost"])
def test_a_fit_without_labels_clips_each_examples_own_loss(clipping):
    import jax.numpy as jnp

    x, _ = data(10)
    keras.utils.set_random_seed(4)
    model = keras_dp.make_private(
        Reconstructs(),
        DPConfig(batch_size=10, steps=1, l2_clip_norm=0.5, clipping=clipping, **DEBUG),
    )
    model.compile(optimizer=keras.optimizers.SGD(1.0))
    model(x[:1])  # builds it

    def own_loss(w, xi, _):  # the loss written out for one example
        decoded = jnp.tanh(xi[None] @ w[0] + w[1]) @ w[2] + w[3]
        return jnp.mean((decoded - xi[None]) ** 2)

    before = [np.array(v.value) for v in model.trainable_variables]
    expected = naive_clipped_mean(model, x, np.zeros(len(x)), 0.5, own_loss)
    history = model.fit(x, verbose=0)  # q = 1: every example in the one step
    for b, v, e in zip(before, model.trainable_variables, expected):
        np.testing.assert_allclose(np.array(v.value) - b, e, rtol=1e-4, atol=1e-6)
    assert history.history["clipped_fraction"][0] > 0  # clipping was active


def test_a_frozen_batch_normalization_is_per_example_and_keeps_its_statistics():
    """Keras' transfer-learning recipe: a frozen BatchNormalization normalises with its
    moving statistics (one example at a time), so it is accepted; a trainable one is
    refused (test_hostile)."""
    x, y = data(10)
    keras.utils.set_random_seed(0)
    norm = keras.layers.BatchNormalization()
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4), norm, keras.layers.Dense(3)]
    )
    norm.moving_mean.assign(np.linspace(-1.0, 1.0, 4))
    norm.moving_variance.assign(np.linspace(0.5, 2.0, 4))
    norm.trainable = False
    statistics = [np.array(v.value) for v in norm.non_trainable_variables]
    model = private(model, batch_size=10, steps=1, l2_clip_norm=0.5, **DEBUG)
    before = [np.array(v.value) for v in model.trainable_variables]
    expected = naive_clipped_mean(model, x, y, 0.5)  # one example at a time, as Keras infers
    model.fit(x, y, verbose=0)  # q = 1: every example in the one step
    for b, v, e in zip(before, model.trainable_variables, expected):
        np.testing.assert_allclose(np.array(v.value) - b, e, rtol=1e-4, atol=1e-6)
    for s, v in zip(statistics, norm.non_trainable_variables):
        np.testing.assert_array_equal(np.array(v.value), s)


def test_default_microbatch_follows_the_platform(monkeypatch):
    """CPU: a quarter of the batch. GPU/TPU: ghost clipping in one pass; per-example
    gradients within a byte budget."""
    from keras_dp import step as dp_step

    model = mlp()  # 5*4 + 4 + 4*3 + 3 = 39 trainable parameters
    config = DPConfig(target_epsilon=1.0, batch_size=64, steps=1)
    assert dp_step.chunk_size(config, 1, model) == 16
    assert dp_step.chunk_size(config, 4, model) == 4  # per device
    monkeypatch.setattr(_backend, "on_cpu", lambda: False)
    assert dp_step.step_chunk(72, dp_step.chunk_size(config, 1, model)) == 72  # one pass
    config = DPConfig(target_epsilon=1.0, batch_size=64, steps=1, clipping="per_example")
    assert dp_step.chunk_size(config, 1, model) == 2**30 // (4 * 39)
    monkeypatch.setattr(dp_step, "_CHUNK_GRADIENT_BYTES", 4 * 39 * 5)
    assert dp_step.chunk_size(config, 1, model) == 5
    assert (
        dp_step.chunk_size(
            DPConfig(target_epsilon=1.0, batch_size=64, steps=1, microbatch_size=3), 1, model
        )
        == 3
    )


ZERO_LOSS = lambda y_true, y_pred: 0.0 * keras.ops.mean(y_pred)  # noqa: E731


def zero_loss_fit(units, n, initial=None, **config):
    """A Dense(units) model trained on a zero loss: its update is the noise alone.

    Returns the model and its kernel before and after ``fit`` (``initial`` sets
    the weights first).
    """
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(units)])
    model = keras_dp.make_private(model, DPConfig(target_epsilon=1e6, **config))
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=ZERO_LOSS)
    model.build((None, 5))
    if initial is not None:
        model.set_weights(initial)
    w0 = np.array(model.trainable_variables[0].value)
    model.fit(*data(n), epochs=1, verbose=0)
    return model, w0, np.array(model.trainable_variables[0].value)


def test_noise_is_gaussian_with_std_sigma_c_over_b():
    sigma, clip, batch = 2.0, 3.0, 8
    model, w0, w1 = zero_loss_fit(
        400, 16, batch_size=batch, steps=2, noise_multiplier=sigma, l2_clip_norm=clip, seed=7
    )
    steps = model.privacy_spent().steps
    update = (w1 - w0).ravel() / math.sqrt(steps)  # sum of `steps` independent draws
    expected_std = sigma * clip / batch
    assert stats.kstest(update, "norm", args=(0, expected_std)).pvalue > 0.01
    # A noise std scaled wrongly by 2 is rejected by the same test.
    assert stats.kstest(update, "norm", args=(0, 2 * expected_std)).pvalue < 1e-6
    assert stats.kstest(update, "norm", args=(0, expected_std / 2)).pvalue < 1e-6


def test_noise_key_changes_every_step_and_is_not_a_weight():
    config = dict(batch_size=4, noise_multiplier=1.0, seed=3)
    model, w0, w1 = zero_loss_fit(50, 8, steps=2, **config)
    names = [w.path for w in model.weights]
    assert not any("seed" in n or "key" in n for n in names)
    assert model.privacy_spent().steps == 2
    # Two equal noise draws would give an update exactly 2x one draw; check the
    # correlation of the two steps' noise instead via a fresh one-step run.
    _, _, one_step = zero_loss_fit(50, 8, initial=[w0, np.zeros(50, "float32")], steps=1, **config)
    first = one_step - w0
    second = (w1 - w0) - first
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 0.2


def test_identical_examples_get_their_own_dropout_masks():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="ones"),
        ]
    )
    model = keras_dp.make_private(
        model, DPConfig(batch_size=2, steps=3, l2_clip_norm=1e6, seed=0, **DEBUG)
    )
    model.compile(
        optimizer=keras.optimizers.SGD(1.0), loss=lambda y_true, y_pred: keras.ops.mean(y_pred)
    )
    x = np.ones((2, 8), "float32")
    seed_var = next(v for v in model.non_trainable_variables if "seed_generator" in v.path)
    seed_before = np.array(seed_var.value)
    w = np.array(model.trainable_variables[0].value)
    model.fit(x, np.zeros(2), verbose=0)
    assert model.privacy_spent().steps == 3
    updates = (np.array(model.trainable_variables[0].value) - w).ravel()
    # Each step: Δw_j = -(2 m1_j + 2 m2_j) / 2 (dropout scale 2), in {0, -1, -2}. Identical
    # masks would make every step's entries 0 or -2: an odd total shows different masks.
    assert np.any(np.isclose(np.mod(-updates, 2), 1))
    assert not np.array_equal(seed_before, np.array(seed_var.value))  # the seed state advanced


def test_epsilon_after_fit_equals_config_and_steps_are_updates():
    x, y = data(200)
    model = private(
        mlp(), lr=0.1, batch_size=50, epochs=2, target_epsilon=5.0, microbatch_size=7, seed=0
    )
    history = model.fit(x, y, callbacks=[keras_dp.callbacks.PrivacyBudget()], verbose=0)
    spent = model.privacy_spent()
    assert spent.steps == 8 == model.dp_config.steps  # round(2 * 200 / 50)
    assert int(model.optimizer.iterations.value) == 8  # one update per accounted step
    assert spent.epsilon == pytest.approx(model.dp_config.epsilon(8))
    assert spent.epsilon <= 5.0
    assert history.history["epsilon"][-1] == pytest.approx(spent.epsilon)
    assert len(history.history["epsilon"]) == 2
    assert keras_dp.privacy_statement(model).count("8 of 8 planned") == 1


def test_fit_beyond_the_plan_is_refused_before_noise():
    x, y = data(100)
    model = private(mlp(), lr=0.1, batch_size=25, epochs=2, target_epsilon=5.0, seed=0)
    model.fit(x, y, epochs=1, verbose=0)
    assert model.privacy_spent().steps == 4
    with pytest.raises(ValueError, match="only 1 are left"):
        model.fit(x, y, epochs=2, verbose=0)
    model.fit(x, y, epochs=1, verbose=0)
    weights = [np.array(v.value) for v in model.trainable_variables]
    with pytest.raises(ValueError, match="privacy budget of this plan is spent"):
        model.fit(x, y, verbose=0)
    for w, v in zip(weights, model.trainable_variables):
        np.testing.assert_array_equal(w, np.array(v.value))
    assert model.privacy_spent().steps == 8


def test_privacy_budget_callback_stops_at_its_limit():
    x, y = data(100)
    model = private(mlp(), lr=0.1, batch_size=25, epochs=4, target_epsilon=8.0, seed=0)
    model.fit(x, y, epochs=0 + 1, verbose=0)
    config = model.dp_config
    limit = config.epsilon(9) + 1e-9  # allows 9 of the 16 planned updates
    model.fit(
        x,
        y,
        epochs=3,
        verbose=0,
        callbacks=[keras_dp.callbacks.PrivacyBudget(stop_at_epsilon=limit)],
    )
    assert model.privacy_spent().steps == 9
    assert model.privacy_spent().epsilon <= limit
    # At the limit, a further fit is refused before any step runs.
    weights = [np.array(v.value) for v in model.trainable_variables]
    tenth = f"ε={config.epsilon(10):.4g}"  # what the refused update would spend
    with pytest.raises(ValueError, match=f"allows no further update: 9 taken.*{re.escape(tenth)}"):
        model.fit(
            x,
            y,
            epochs=1,
            verbose=0,
            callbacks=[keras_dp.callbacks.PrivacyBudget(stop_at_epsilon=limit)],
        )
    assert model.privacy_spent().steps == 9
    for w, v in zip(weights, model.trainable_variables):
        np.testing.assert_array_equal(w, np.array(v.value))


def test_only_real_rows_count_in_loss_and_metrics():
    x, y = data(30)
    model = keras_dp.make_private(mlp(), DPConfig(batch_size=30, steps=1, **DEBUG))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSS, metrics=["accuracy"])
    history = model.fit(x, y, verbose=0)  # q = 1; the physical batch has padding rows
    predictions = model.predict(x, verbose=0)
    assert history.history["loss"][0] == pytest.approx(float(LOSS(y, predictions)), rel=1e-5)
    accuracy = float(np.mean(np.argmax(predictions, -1) == y))
    assert history.history["accuracy"][0] == pytest.approx(accuracy)


@pytest.mark.parametrize("clipping,microbatch", [("per_example", None), ("ghost", 7)])
def test_each_outputs_loss_is_its_mean_over_the_real_examples(clipping, microbatch, monkeypatch):
    x, y = data(40)
    weight = np.random.default_rng(1).uniform(0.5, 2.0, 40).astype("float32")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(4, activation="tanh")(inputs)
    outputs = {
        "a": keras.layers.Dense(3, name="a")(hidden),
        "b": keras.layers.Dense(1, name="b")(hidden),
    }
    plan = DPConfig(batch_size=10, epochs=1, clipping=clipping, microbatch_size=microbatch, **DEBUG)
    model = keras_dp.make_private(keras.Model(inputs, outputs), plan)
    losses = {"a": LOSS, "b": keras.losses.MeanSquaredError()}
    model.compile(
        optimizer=keras.optimizers.SGD(0.0), loss=losses, loss_weights={"a": 1.0, "b": 0.5}
    )
    drawn = recorded_draws(monkeypatch)
    labels = {"a": y, "b": x[:, :1]}
    history = model.fit(x, labels, sample_weight=weight, verbose=0)  # 4 updates, one epoch
    rows = np.concatenate(drawn)
    assert len(drawn) == 4 and len(rows) > 10
    predictions = model.predict(x[rows], verbose=0)  # lr 0: the weights of every update
    expected = {}
    for k, loss in losses.items():
        per_example = type(loss).from_config({**loss.get_config(), "reduction": None})
        each = np.asarray(per_example(labels[k][rows], predictions[k])) * weight[rows]
        expected[k] = float(np.mean(each))
        # Keras' own a_loss/b_loss: each output's loss, before loss_weights
        assert history.history[f"{k}_loss"][0] == pytest.approx(expected[k], rel=1e-5)
    total = expected["a"] + 0.5 * expected["b"]
    assert history.history["loss"][0] == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("clipping,microbatch", [("per_example", None), ("ghost", 7)])
def test_metrics_skip_positions_the_keras_mask_hides(clipping, microbatch):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 30, (40, 10))
    for row, length in zip(tokens, rng.integers(2, 10, 40)):
        row[length:] = 0  # padding tokens: masked by Embedding(mask_zero=True)
    tags = rng.integers(0, 4, (40, 10))
    keras.utils.set_random_seed(0)
    tagger = keras.Sequential(
        [keras.Input((10,)), keras.layers.Embedding(30, 8, mask_zero=True), keras.layers.Dense(4)]
    )
    plan = DPConfig(batch_size=40, steps=1, clipping=clipping, microbatch_size=microbatch, **DEBUG)
    model = keras_dp.make_private(tagger, plan)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSS, metrics=["accuracy"])
    history = model.fit(tokens, tags, verbose=0)  # q = 1: all rows, and padding rows
    hits = np.argmax(model.predict(tokens, verbose=0), -1) == tags
    assert history.history["accuracy"][0] == pytest.approx(float(np.mean(hits[tokens != 0])))


def test_validation_split_holds_out_the_last_rows_as_keras_does(monkeypatch):
    x, y = data(40)
    drawn = recorded_draws(monkeypatch)
    model = keras_dp.make_private(mlp(), DPConfig(batch_size=10, epochs=2, target_epsilon=3.0))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, metrics=["accuracy"])
    history = model.fit(x, y, validation_split=0.25, verbose=0)
    assert model.dp_config.dataset_size == 30  # the plan covers the 30 training rows
    assert len(drawn) == model.dp_steps == 6 and np.concatenate(drawn).max() < 30
    held_out = model.evaluate(x[30:], y[30:], verbose=0, return_dict=True)
    assert float(history.history["val_loss"][-1]) == pytest.approx(
        float(held_out["loss"]), rel=1e-5
    )
    assert history.history["val_accuracy"][-1] == pytest.approx(held_out["accuracy"])


@pytest.mark.parametrize("compiled", [dict(run_eagerly=True), dict(jit_compile=False)])
def test_an_eager_or_unjitted_fit_takes_the_jitted_fits_updates(compiled):
    """Keras' debugging modes keep Keras' own train function (no σ input, no compile
    ahead): the step reads the calibrated σ from the plan, and the same seed gives the
    same draws, dropout masks, noise and so the same weights and logs."""
    x, y = data(120)

    def fit(**compile_args):
        model = keras_dp.make_private(
            mlp(dropout=0.2), DPConfig(target_epsilon=3.0, batch_size=16, epochs=2, seed=5)
        )
        model.compile(optimizer="sgd", loss=LOSS, metrics=["accuracy"], **compile_args)
        return model, model.fit(x, y, verbose=0).history

    jitted, jitted_logs = fit()
    other, other_logs = fit(**compiled)
    assert other._dp_jitted_step is None  # Keras' own train function ran
    assert jitted.dp_config.noise_multiplier == other.dp_config.noise_multiplier > 0.5
    for a, b in zip(jitted.get_weights(), other.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert other_logs.keys() == jitted_logs.keys()
    for key, values in jitted_logs.items():
        np.testing.assert_allclose(other_logs[key], values, rtol=1e-5)
    assert other.privacy_spent() == jitted.privacy_spent()


def test_mixin_subclass_and_make_private_keep_keras_behaviour():
    class Mine(keras_dp.DPModel, keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    x, y = data(40)
    model = Mine(dp_config=DPConfig(batch_size=10, epochs=1, target_epsilon=10.0, seed=0))
    model.compile(optimizer="sgd", loss=LOSS)
    model.fit(x, y, verbose=0)
    assert model.privacy_spent().steps == 4
    functional = mlp()
    private_model = keras_dp.make_private(
        functional, DPConfig(batch_size=10, epochs=1, target_epsilon=10.0)
    )
    assert private_model is functional and isinstance(functional, keras_dp.DPModel)
    assert isinstance(functional, keras.Sequential)
    assert functional.predict(x, verbose=0).shape == (40, 3)
    assert functional.privacy_spent() == keras_dp.PrivacySpent(0.0, None, 0)


def test_sequence_of_examples_is_sampled():
    x, y = data(40)
    examples = [(x[i], y[i]) for i in range(40)]
    model = private(mlp(), lr=0.1, batch_size=10, epochs=1, target_epsilon=10.0, seed=0)
    model.fit(examples, verbose=0)
    assert model.dp_config.dataset_size == 40
    assert model.privacy_spent().steps == 4


def test_per_step_hooks_read_no_device_value(monkeypatch):
    """keras_dp's per-step progress-bar hook reads no logged value (reading a device
    value would make Keras wait for every step); Keras' bar gets the logs without the
    count."""
    from keras_dp import callbacks as dp_callbacks

    class Unread:  # stands for a value still being computed on the device
        def _read(self, *args):
            raise AssertionError("a per-step hook read a logged value")

        __float__ = __array__ = __bool__ = __int__ = __format__ = _read

    handed = []
    monkeypatch.setattr(
        keras.callbacks.ProgbarLogger,
        "on_train_batch_end",
        lambda self, batch, logs=None: handed.append(logs),
    )
    loss = Unread()
    dp_callbacks.DPProgbarLogger().on_train_batch_end(
        0, {"loss": loss, "nonfinite_examples": Unread()}
    )
    assert handed == [{"loss": loss}]


def test_the_dp_steps_trace_runs_with_the_collector_paused_and_restores_it(monkeypatch):
    """Keras' first train call (the DP step's trace and compile) runs with Python's
    cyclic collector paused; later calls, and the collector afterwards, run as before."""
    import gc

    from keras_dp import step

    seen = []
    traced = step.train_step

    def recording(model, state, data):  # runs while jit traces the step
        seen.append(gc.isenabled())
        return traced(model, state, data)

    monkeypatch.setattr(step, "train_step", recording)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    config = DPConfig(target_epsilon=1e6, noise_multiplier=1.0, batch_size=8, steps=3)
    model = keras_dp.make_private(model, config)
    model.compile(optimizer="sgd", loss="mse")
    assert gc.isenabled()
    model.fit(np.ones((32, 3), "float32"), np.zeros((32, 2), "float32"), verbose=0)
    assert seen[0] is False  # the first trace (a draw above the usual size adds one)
    assert gc.isenabled()

    calls = []
    paused = step.paused_gc_on_first_call(lambda: calls.append(gc.isenabled()))
    paused(), paused()
    assert calls == [False, True] and gc.isenabled()

    def failing():
        raise RuntimeError("trace failed")

    with pytest.raises(RuntimeError):
        step.paused_gc_on_first_call(failing)()
    assert gc.isenabled()  # restored after an error
    gc.disable()
    try:  # a collector the user turned off stays off
        step.paused_gc_on_first_call(lambda: None)()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_steps_logs_are_read_only_by_callbacks_that_read_them(monkeypatch, capsys):
    """Keras converts every step's logs for the batch-end hooks, whether or not any
    callback has one (a transfer, and on a GPU a wait for the step). DP fit reads no
    step at ``verbose=0`` with epoch-level callbacks; at ``verbose=1`` its bar reads a
    step only when it redraws; a batch-end hook (``LambdaCallback`` sets it on the
    instance) gets every step's floats, as in Keras, also from a CallbackList."""
    from keras_dp import step_logs

    fetches = []
    host = step_logs._Fetched.host

    def counted_host(self):
        if self._host is None:
            fetches.append(self)
        return host(self)

    monkeypatch.setattr(step_logs._Fetched, "host", counted_host)
    x, y = data(300)

    def fit(verbose, callbacks=()):
        fetches.clear()
        model = private(mlp(), lr=0.1, batch_size=10, epochs=1, target_epsilon=10.0, seed=0)
        history = model.fit(x, y, verbose=verbose, callbacks=callbacks)
        return model.privacy_spent().steps, history

    quiet = [keras.callbacks.EarlyStopping(monitor="loss"), keras_dp.callbacks.PrivacyBudget()]
    steps, history = fit(0, quiet)
    assert steps >= 20 and fetches == []
    assert np.isfinite(history.history["loss"][0]) and history.history["epsilon"][0] > 0

    capsys.readouterr()
    steps, history = fit(1)
    out = capsys.readouterr().out
    redraws = out.count("\r") - 1  # each redraw returns to the line's start; less the epoch's
    assert 1 <= redraws < steps and len(fetches) == redraws
    assert f"{steps}/{steps}" in out and f"loss: {history.history['loss'][0]:.4f}" in out

    seen = []
    hook = keras.callbacks.LambdaCallback(on_batch_end=lambda batch, logs: seen.append(logs))
    steps, history = fit(0, keras.callbacks.CallbackList([hook]))  # Keras' list is taken too
    assert len(seen) == len(fetches) == steps
    assert all(type(v) is float for logs in seen for v in logs.values())
    assert seen[-1]["loss"] == history.history["loss"][0]


def test_a_steps_logs_reach_the_host_in_one_transfer(monkeypatch):
    """Keras converts each logged value of each step to a float (one device-to-host
    transfer per value: 0.25 ms each on the H200 machine). A DP step's float32 logs
    arrive stacked: one fetch per step, no value converted alone, and the floats are
    the metrics' own (the last step's equal the epoch's, read from the variables)."""
    import keras.src.backend as keras_backend
    from keras.src.utils import python_utils

    from keras_dp import step_logs

    fetches, alone, in_step = [], [], [False]
    host = step_logs._Fetched.host

    def counted_host(self):
        if self._host is None:
            fetches.append(self)
        return host(self)

    convert = keras_backend.convert_to_numpy

    def counted_convert(x):
        # From a batch's begin to its end hook (the epoch's logs are not), a value on the
        # device (keras 3.12 also converts traced values while the first step traces).
        if in_step[0] and not isinstance(x, step_logs._TRACER):
            alone.append(x)
        return convert(x)

    monkeypatch.setattr(step_logs._Fetched, "host", counted_host)
    monkeypatch.setattr(keras_backend, "convert_to_numpy", counted_convert)

    class Recorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.logs = []

        def on_train_batch_begin(self, batch, logs=None):
            in_step[0] = True

        def on_train_batch_end(self, batch, logs=None):  # Keras converted the logs before
            in_step[0] = False
            self.logs.append(dict(logs))

    recorder = Recorder()
    x, y = data(40)
    model = private(mlp(), lr=0.1, batch_size=10, epochs=1, target_epsilon=10.0, seed=0)
    history = model.fit(x, y, verbose=0, callbacks=[recorder])
    steps = model.privacy_spent().steps
    assert len(recorder.logs) == steps == 4
    assert len(fetches) == steps and alone == []
    for logs in recorder.logs:
        assert set(logs) == {"loss", "clipped_fraction", "nonfinite_examples"}
        assert all(type(v) is float and np.isfinite(v) for v in logs.values())
    for key, values in history.history.items():
        assert recorder.logs[-1][key] == values[-1], key

    # Inside a traced step (a subclass's train_step) the values are the traced scalars.
    logs = {"loss": jnp.float32(1.5), "n": jnp.int32(2), "per_class": {"a": jnp.float32(1)}}
    doubled = jax.jit(lambda logs: step_logs.StepLogs.of(logs)["loss"] * 2)
    assert float(doubled(logs)) == 3.0
    out = jax.jit(step_logs.StepLogs.of)(logs)  # an int and a nested dict travel as they are
    assert out._positions == (("loss", 0),)
    assert python_utils.pythonify_logs(out) == {"loss": 1.5, "n": 2.0, "a": 1.0}

    def changed(logs):  # a subclass's train_step changing its parent's logs
        logs = step_logs.StepLogs.of(logs)
        logs["loss"], logs["extra"] = logs["loss"] * 3, logs["loss"] + 1
        del logs["n"]
        return logs

    assert python_utils.pythonify_logs(jax.jit(changed)(logs)) == {
        "loss": 4.5,
        "extra": 2.5,
        "a": 1.0,
    }
