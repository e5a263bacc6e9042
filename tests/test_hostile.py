"""The catalogue of hostile and broken inputs.

Each refusal must name what is wrong and what to pass instead, and come before
any update: the model's ledger stays at 0 and its weights are unchanged (no noise
was spent). Inputs that cannot be refused up front (NaN/inf values inside the
data) are contained instead: the example contributes nothing and is counted.
Also refused elsewhere: a non-JAX backend at import (tests/test_package.py), a
checkpoint from another plan or without a ledger (tests/test_saving.py), ragged
tfds items (tests/test_data.py), and 37 bad DPConfig fields (tests/test_config.py).
"""

import math
import warnings

import keras
import numpy as np
import pytest

import keras_dp
from keras_dp import DPConfig

from .test_training import LOSS, data, mlp

PLAN = dict(batch_size=10, epochs=1, target_epsilon=10.0)


def private(model=None, compile=True, **overrides):
    model = keras_dp.make_private(model or mlp(), DPConfig(**{**PLAN, **overrides}))
    if compile:
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    return model


def fit(model=None, x=None, y=None, **kwargs):
    """(model, the call that must be refused) for a fit on 40 good examples by default."""
    model = model or private()
    good_x, good_y = data(40)
    x = good_x if x is None else (None if x is NONE else x)
    y = good_y if y is None else (None if y is NONE else y)
    return model, lambda: model.fit(x, y, verbose=0, **kwargs)


NONE = object()  # passes None for x or y


def tf_batches():
    import tensorflow as tf  # keras-hub's dependency, in the test extras

    return tf.data.Dataset.from_tensor_slices(data(40)).batch(8)


def config(**fields):
    return None, lambda: DPConfig(**{**PLAN, **fields})


class Batches(keras.utils.PyDataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        return data(4)


def batch_norm():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(3)]
    )


def frozen():
    model = mlp()
    model.trainable = False
    return model


def accumulating():
    model = private(compile=False)
    model.compile(optimizer=keras.optimizers.SGD(gradient_accumulation_steps=4), loss=LOSS)
    return model


def multi_step_execution():
    model = private(compile=False)
    model.compile(optimizer="sgd", loss=LOSS, steps_per_execution=2)
    return model


def lossless():
    model = private(compile=False)
    model.compile(optimizer="sgd")  # plain Keras trains it (the loss is 0)
    return model


def spent():
    model = private(seed=0)
    model.fit(*data(40), verbose=0)
    return model


def planless():
    class Plain(keras_dp.DPModel, keras.Sequential):
        pass

    model = Plain([keras.Input((5,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=LOSS)
    return model


def replanned():
    model = private(seed=0, epochs=2)
    model.fit(*data(40), epochs=1, verbose=0)
    return model, lambda: model.set_dp_config(DPConfig(**{**PLAN, "l2_clip_norm": 0.1}))


x40, y40 = data(40)
CATALOGUE = [
    # The plan itself.
    ("epsilon is NaN", lambda: config(target_epsilon=math.nan), "target_epsilon"),
    ("negative clip norm", lambda: config(l2_clip_norm=-1.0), "l2_clip_norm.*positive"),
    ("zero batch", lambda: config(batch_size=0), "batch_size.*positive integer"),
    ("unknown accountant", lambda: config(accountant="moments"), "accountant.*'pld'"),
    ("δ ≥ 1/N", lambda: fit(private(target_delta=0.1)), "below 1/dataset_size"),
    ("data smaller than the batch", lambda: fit(private(batch_size=64)), "exceeds dataset_size"),
    ("plan for other data", lambda: fit(private(dataset_size=50)), "DPConfig.dataset_size=50"),
    # The data.
    ("empty data", lambda: fit(x=x40[:0], y=y40[:0]), "no training examples"),
    ("no inputs", lambda: fit(x=NONE), "fit got no inputs"),
    ("x/y length mismatch", lambda: fit(y=y40[:30]), "same number of examples"),
    (
        "sample_weight length mismatch",
        lambda: fit(sample_weight=np.ones(7)),
        "same number of examples",
    ),
    (
        "ragged examples",
        lambda: fit(x=[(np.ones(i % 3 + 1), 0) for i in range(40)], y=NONE),
        "ragged",
    ),
    ("scalar input", lambda: fit(x=np.float32(1.0)), r"leading example axis.*shaped \(N, \.\.\.\)"),
    ("string labels", lambda: fit(y=np.array(["a", "b"] * 20)), "dtype <U1.*StringLookup"),
    ("object inputs", lambda: fit(x=np.array([[1, "a"]] * 40, object)), "dtype object"),
    ("labels out of range", lambda: fit(y=y40 + 5), r"not class indices in \[0, 3\)"),
    ("fractional labels", lambda: fit(y=y40 + 0.5), "not class indices"),
    ("missing labels", lambda: fit(y=NONE), "no labels"),
    ("wrong feature size", lambda: fit(x=x40[:, :4]), "expected axis -1 .* value 5"),
    ("a PyDataset stream", lambda: fit(x=Batches(), y=NONE), "PyDataset.*random-access"),
    ("a generator", lambda: fit(x=(i for i in range(3)), y=NONE), "generator.*random-access"),
    ("a tf.data.Dataset", lambda: fit(x=tf_batches(), y=NONE), r"tf\.data\.Dataset.*data_source"),
    (
        "labels beside examples that hold their own",
        lambda: fit(x=[(a, b) for a, b in zip(x40, y40)]),
        r"each item must hold its own label.*pass y=None",
    ),
    # The model and its compilation.
    ("BatchNormalization", lambda: fit(private(batch_norm())), "'bn'.*mixes examples"),
    (
        "no trainable variables",
        lambda: fit(private(frozen())),
        "no trainable variables.*trainable = True.*enable_lora",
    ),
    ("gradient accumulation", lambda: fit(accumulating()), "microbatch_size"),
    ("not compiled", lambda: fit(private(compile=False)), r"model.compile\("),
    (
        "steps_per_execution",
        lambda: fit(multi_step_execution()),
        r"steps_per_execution=2\).*steps_per_execution=1 \(the default\)",
    ),
    ("no DP plan", lambda: fit(planless()), "set_dp_config"),
    ("no loss", lambda: fit(lossless()), "does not depend on its trainable.*loss=..."),
    ("dp_config not a DPConfig", lambda: (None, lambda: private().set_dp_config({})), "DPConfig"),
    (
        "make_private of a layer",
        lambda: (None, lambda: keras_dp.make_private(keras.layers.Dense(3), DPConfig(**PLAN))),
        "keras.Model",
    ),
    # fit arguments that contradict the plan.
    ("fit batch_size", lambda: fit(batch_size=5), "drop batch_size"),
    ("shuffle=False", lambda: fit(shuffle=False), "shuffle=False"),
    ("validation_split leaving no training rows", lambda: fit(validation_split=0.999), "split"),
    (
        "validation_split under a plan for all rows",
        lambda: fit(private(dataset_size=40), validation_split=0.25),
        "30 examples after validation_split.*dataset_size=40",
    ),
    (
        "validation_split of users' rows",
        lambda: fit(
            private(privacy_unit="user", examples_per_user=2, batch_size=5),
            validation_split=0.2,
            user_ids=np.arange(40) // 2,
        ),
        "Split by user yourself.*validation_data=",
    ),
    ("steps_per_epoch", lambda: fit(steps_per_epoch=3), "DPConfig\\(steps="),
    ("class_weight missing a class", lambda: fit(class_weight={0: 1.0}), "every class"),
    ("more epochs than planned", lambda: fit(epochs=5), "only 1 are left"),
    ("zero epochs", lambda: fit(epochs=0), "runs no epoch; pass epochs > initial_epoch"),
    # The budget.
    ("budget spent", lambda: fit(spent()), "budget of this plan is spent.*new plan.*new model"),
    (
        "PrivacyBudget stop_at_epsilon not positive",
        lambda: (None, lambda: keras_dp.callbacks.PrivacyBudget(stop_at_epsilon=0.0)),
        r"stop_at_epsilon=0.0\) must be positive.*None for the config's target_epsilon",
    ),
    (
        "PrivacyBudget delta outside (0, 1)",
        lambda: (None, lambda: keras_dp.callbacks.PrivacyBudget(delta=1.5)),
        r"delta=1.5\) must be in \(0, 1\)",
    ),
    ("another plan after training", replanned, "another plan"),
]


@pytest.mark.parametrize("build, match", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_hostile_input_is_refused_before_any_noise(build, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, call = build()
    before = [np.array(v.value) for v in model.weights] if model is not None else []
    steps = model.dp_steps if model is not None else 0
    with pytest.raises((ValueError, TypeError), match=match):
        call()
    if model is not None:
        assert model.dp_steps == steps  # no update was taken or counted
        for b, v in zip(before, model.weights):
            np.testing.assert_array_equal(b, np.array(v.value))


def test_catalogue_has_at_least_25_kinds():
    assert len(CATALOGUE) >= 25 and len({c[0] for c in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize(
    "poison",
    [
        lambda x, y, w: x.__setitem__(3, np.nan),
        lambda x, y, w: x.__setitem__((5, 2), np.inf),
        lambda x, y, w: w.__setitem__(7, np.nan),
    ],
    ids=["NaN input", "inf input", "NaN sample weight"],
)
def test_nonfinite_values_are_contained_and_counted(poison):
    x, y = data(10)
    w = np.ones(10, "float32")
    poison(x, y, w)
    model = private(
        batch_size=10, steps=1, epochs=None, target_epsilon=math.inf, noise_multiplier=0.0
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, metrics=["accuracy"])
    model.build((None, 5))
    good = np.isfinite(x).all(axis=1) & np.isfinite(w)
    predicted = model.predict(x[good], verbose=0)
    before = float(LOSS(y[good], predicted, sample_weight=w[good]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = model.fit(x, y, sample_weight=w, verbose=0)
    assert history.history["nonfinite_examples"] == [1]  # that example contributed nothing
    # ... and the logs are those of the 9 rows that trained (q = 1): no NaN loss.
    assert history.history["loss"][0] == pytest.approx(before, rel=1e-5)
    accuracy = np.mean(np.argmax(predicted, -1) == y[good])
    assert history.history["accuracy"][0] == pytest.approx(accuracy)
    assert all(np.all(np.isfinite(np.array(v.value))) for v in model.trainable_variables)
    assert model.dp_steps == 1
