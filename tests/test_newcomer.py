"""What a newcomer trips on (issue 21): logs that tell the truth, errors that name the cause."""

import math

import keras
import numpy as np
import pytest

import keras_dp
from keras_dp import DPConfig

from .test_training import LOSS, data, mlp

pytestmark = pytest.mark.filterwarnings("ignore:DPConfig\\(noise_multiplier=0")


def private(model=None, **config):
    plan = {**dict(batch_size=10, target_epsilon=8.0), **config}
    if "steps" not in plan:
        plan.setdefault("epochs", 2)
    model = keras_dp.make_private(model or mlp(), DPConfig(**plan))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    return model


def test_epsilon_reaches_loggers_listed_before_privacy_budget(tmp_path):
    x, y = data(40)
    path = tmp_path / "log.csv"
    model = private()
    model.fit(
        x, y, verbose=0,
        callbacks=[keras.callbacks.CSVLogger(str(path)), keras_dp.callbacks.PrivacyBudget()],
    )  # fmt: skip
    header, *rows = path.read_text().splitlines()
    assert "epsilon" in header.split(",") and len(rows) == 2
    column = header.split(",").index("epsilon")
    assert float(rows[-1].split(",")[column]) == pytest.approx(model.privacy_spent().epsilon)


def test_nonfinite_examples_is_the_epochs_total_not_its_last_steps():
    x, y = data(40)
    x[:6] = np.nan  # drawn now and then; the last step of an epoch may hold none
    model = private(batch_size=4, epochs=2, target_epsilon=math.inf, noise_multiplier=0.0)
    history = model.fit(x, y, verbose=0)
    drawn = [keras_dp.data.draw_indices(model.dp_config, model._dp_seed, t) for t in range(20)]
    per_epoch = [sum(int(np.sum(d < 6)) for d in drawn[e * 10 : e * 10 + 10]) for e in (0, 1)]
    assert history.history["nonfinite_examples"] == per_epoch


class OwnStep(keras_dp.DPModel, keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x)

    def train_step(self, state, data):  # a hand-written step that never calls keras_dp's
        x, y = data[0], data[1]
        return {"n": len(x) + len(y)}, state


def test_errors_name_the_real_cause():
    x, y = data(40)
    own = OwnStep(dp_config=DPConfig(batch_size=10, epochs=1, target_epsilon=8.0))
    own.compile(optimizer="sgd", loss=LOSS)
    with pytest.raises(ValueError, match="OwnStep overrides train_step"):
        own.fit(x, y, verbose=0)

    def examples():
        yield from zip(x, y)

    with pytest.raises(ValueError, match="got a function"):
        private().fit(examples, verbose=0)
    with pytest.raises(TypeError, match="did you mean l2_clip_norm"):
        DPConfig(target_epsilon=1, batch_size=10, epochs=1, l2_norm_clip=1.0)
    with pytest.raises(TypeError, match="'max_grad_norm' \\(did you mean l2_clip_norm"):
        DPConfig(target_epsilon=1, batch_size=10, epochs=1, max_grad_norm=1.0)
    with pytest.raises(TypeError, match="did you mean target_delta"):
        DPConfig(target_epsilon=1, batch_size=10, epochs=1, delta=1e-5)
    # An overspending σ whose every step is too much does not suggest "steps=0".
    with pytest.raises(ValueError, match="even one step") as refused:
        DPConfig(target_epsilon=0.1, batch_size=50, epochs=1, noise_multiplier=0.3).calibrate(100)
    assert "steps=0" not in str(refused.value)
    model = private()
    model.fit(x, y, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="calibrated for the 40 examples of its earlier fit"):
        model.fit(x[:20], y[:20], epochs=2, initial_epoch=1, verbose=0)


def test_class_weight_becomes_a_per_example_weight():
    x, y = data(30)
    weights = {0: 0.5, 1: 2.0, 2: 1.0}
    plan = dict(batch_size=30, steps=1, target_epsilon=math.inf, noise_multiplier=0.0,
                l2_clip_norm=1e6, seed=1)  # fmt: skip
    one = private(**plan)
    one.fit(x, y, class_weight=weights, verbose=0)
    two = private(**plan)
    two.fit(x, y, sample_weight=np.asarray([weights[int(c)] for c in y], "float32"), verbose=0)
    for a, b in zip(one.get_weights(), two.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # One-hot labels weigh by their class, as Keras reads them (the argmax).
    hot = private(**plan)
    hot.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    hot.fit(x, np.eye(3, dtype="float32")[y], class_weight=weights, verbose=0)
    for a, b in zip(hot.get_weights(), two.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="labels y as one array.*sample_weight="):
        private().fit({"x": x}, {"y": y}, class_weight=weights, verbose=0)


def test_offline_is_reachable_as_an_attribute():
    assert keras_dp.offline.gemma3_backbone is not None


def test_the_last_short_epoch_shows_the_updates_that_ran(capsys):
    x, y = data(120)
    model = private(batch_size=10, steps=23)  # 2 epochs of 12: the second stops at 11
    model.fit(x, y, verbose=2)
    out = capsys.readouterr().out
    assert "12/12" in out and "11/11" in out and "12/12" in out.split("Epoch 2/2")[0]
    assert "11/12" not in out.split("Epoch 2/2")[1] and "12/12" not in out.split("Epoch 2/2")[1]
    assert model.dp_steps == 23


def test_epsilon_can_be_logged_at_every_step():
    x, y = data(40)
    seen = []
    spy = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(logs))
    model = private(batch_size=10, epochs=1)
    model.fit(x, y, verbose=0, callbacks=[keras_dp.callbacks.PrivacyBudget(per_step=True), spy])
    config = model.dp_config
    assert [float(logs["epsilon"]) for logs in seen] == pytest.approx(
        [config.epsilon(k) for k in range(1, 5)]
    )
    quiet = []
    spy = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: quiet.append(logs))
    private(batch_size=10, epochs=1).fit(
        x, y, verbose=0, callbacks=[keras_dp.callbacks.PrivacyBudget(), spy]
    )
    assert quiet and all("epsilon" not in logs for logs in quiet)  # per epoch by default
