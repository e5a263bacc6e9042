"""σ's calibration runs while fit compiles the DP step: the step takes σ as an input.

Checked end to end through ``fit``: the noise has the calibrated σ (not the value the
step was compiled with), the step is compiled once and while the search runs, the search
starts once the step is lowered, and a search that fails raises its error before any
update.
"""

import logging
import math
import threading

import jax
import keras
import numpy as np
import pytest
from scipy import stats

import keras_dp
from keras_dp import DPConfig, _keras, accounting, calibration, noise

ZERO_LOSS = lambda y_true, y_pred: 0.0 * keras.ops.mean(y_pred)  # noqa: E731


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype("float32"), rng.normal(size=(n, 1)).astype("float32")


def zero_loss_model(units, **config):
    """Dense(units) on a zero loss with SGD(1): an update is the noise alone."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(units)])
    model = keras_dp.make_private(model, DPConfig(**config))
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=ZERO_LOSS)
    return model


@pytest.fixture
def fresh_calibrations(monkeypatch):
    """No σ remembered from other tests: every plan is searched (in fit's thread)."""
    monkeypatch.setattr(calibration, "_CALIBRATED", {})


def test_the_noise_has_the_calibrated_sigma_not_the_one_compiled_with(fresh_calibrations):
    clip, batch = 3.0, 8
    model = zero_loss_model(
        400, target_epsilon=0.5, batch_size=batch, steps=2, l2_clip_norm=clip, seed=5
    )
    model.build((None, 5))
    w0 = np.array(model.trainable_variables[0].value)
    model.fit(*data(16), epochs=1, verbose=0)
    w1 = np.array(model.trainable_variables[0].value)
    sigma = model.dp_config.noise_multiplier
    assert sigma > 2.5  # far from the 1.0 the step was compiled with
    assert model.privacy_spent().epsilon <= 0.5
    update = (w1 - w0).ravel() / math.sqrt(model.privacy_spent().steps)
    expected_std = sigma * clip / batch
    assert stats.kstest(update, "norm", args=(0, expected_std)).pvalue > 0.01
    # The compiled-with value (σ = 1) is rejected by the same test.
    assert stats.kstest(update, "norm", args=(0, clip / batch)).pvalue < 1e-6


@pytest.mark.parametrize(
    "plan",
    [
        {},
        # Adaptive clipping: its clip norm, a state variable, was a weak-typed float
        # until the first step returned it, and the second step compiled again.
        {"clip_quantile": 0.5, "clip_count_noise": 2.0},
        {"privacy_unit": "user", "examples_per_user": 2},
    ],
    ids=["examples", "adaptive", "users"],
)
def test_fit_compiles_its_step_once_while_sigma_is_searched(plan, fresh_calibrations, monkeypatch):
    compiled = threading.Event()
    seen = []
    compile_ahead = _keras.compile_ahead
    search = calibration.calibrate_noise_multiplier

    def compile_then_signal(*args, **kwargs):
        compile_ahead(*args, **kwargs)
        compiled.set()

    def search_after_the_compile(*args):
        seen.append(compiled.wait(timeout=60))  # the compile runs meanwhile, or never
        return search(*args)

    monkeypatch.setattr(_keras, "compile_ahead", compile_then_signal)
    monkeypatch.setattr(calibration, "calibrate_noise_multiplier", search_after_the_compile)
    # microbatch_size: one physical shape (no usual-rows step beside the bound's).
    model = zero_loss_model(
        20, target_epsilon=2.0, batch_size=8, epochs=2, microbatch_size=4, seed=1, **plan
    )
    users = {"user_ids": np.arange(40) // 2} if "privacy_unit" in plan else {}
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    dispatch = logging.getLogger("jax._src.dispatch")
    dispatch.addHandler(handler)
    try:
        with jax.log_compiles():
            model.fit(*data(40), verbose=0, **users)
    finally:
        dispatch.removeHandler(handler)
    assert seen == [True]  # the search waited for the compile: they overlapped
    compiles = [
        r.getMessage()
        for r in records
        if "XLA compilation" in r.getMessage() and "_dp_noised_train_step" in r.getMessage()
    ]
    assert len(compiles) == 1, compiles
    assert model.privacy_spent().steps == model.dp_config.steps > 1
    assert model.privacy_spent().epsilon <= 2.0


def test_the_search_starts_after_the_step_is_traced_and_lowered(fresh_calibrations, monkeypatch):
    """Tracing and lowering are Python, as the search mostly is: beside each other they
    only take turns for the GIL. The search starts between the lowering and XLA's
    compile, and runs beside the compile (which releases the GIL)."""
    events = []
    compile_ahead = _keras.compile_ahead
    search = calibration.calibrate_noise_multiplier

    def traced_then_lowered(model, jitted, batch, multiplier, lowered):
        events.append("trace")

        def then():
            events.append("lowered")
            lowered()

        compile_ahead(model, jitted, batch, multiplier, lowered=then)
        events.append("compiled")

    def searched(*args):
        events.append("search")
        return search(*args)

    monkeypatch.setattr(_keras, "compile_ahead", traced_then_lowered)
    monkeypatch.setattr(calibration, "calibrate_noise_multiplier", searched)
    model = zero_loss_model(20, target_epsilon=2.0, batch_size=8, epochs=1, seed=1)
    model.fit(*data(40), verbose=0)
    assert events[:2] == ["trace", "lowered"] and "search" in events[2:], events
    assert model.privacy_spent().epsilon <= 2.0


def test_a_search_that_fails_in_its_thread_raises_before_any_update(
    fresh_calibrations, monkeypatch
):
    def unreachable(*args):
        raise accounting.UnreachableEpsilon("No noise multiplier in (1e-4, 1e6) gives it.")

    monkeypatch.setattr(calibration, "calibrate_noise_multiplier", unreachable)
    model = zero_loss_model(20, target_epsilon=2.0, batch_size=8, epochs=1, seed=1)
    model.build((None, 5))
    w0 = [np.array(v) for v in model.get_weights()]
    with pytest.raises(ValueError, match="target_epsilon=2.0.*No noise multiplier"):
        model.fit(*data(40), verbose=0)
    assert model.privacy_spent().steps == 0
    assert all(np.array_equal(a, b) for a, b in zip(w0, model.get_weights()))
    assert model.dp_config.noise_multiplier is None


@pytest.mark.parametrize("delta", [None, 1e-6])
def test_privacy_budgets_first_epsilon_is_computed_beside_the_compile(
    delta, fresh_calibrations, monkeypatch
):
    """With a PrivacyBudget, ε after the first epoch is computed in the search's thread
    (beside XLA's compile), at the callback's δ, and the callback's own call at the
    epoch's end finds it: that ε is computed once, and not in fit's thread."""
    accounting.epsilon.cache_clear()
    computed = []
    real = accounting.pld_discretization

    def spied(event, delta, relation):
        computed.append((event.count, delta, threading.current_thread().name))
        return real(event, delta, relation)

    monkeypatch.setattr(accounting, "pld_discretization", spied)
    model = zero_loss_model(20, target_epsilon=2.0, batch_size=8, epochs=2, seed=1)
    budget = keras_dp.callbacks.PrivacyBudget(delta=delta)
    history = model.fit(*data(40), verbose=0, callbacks=[budget])
    per_epoch = 40 // 8  # at δ = 1e-6 the budget stops the second epoch early
    at = delta if delta is not None else model.dp_config.delta
    first = [c for c in computed if c[:2] == (per_epoch, at)]
    assert [thread for _, _, thread in first] == ["keras_dp-calibration"], computed
    assert history.history["epsilon"][0] == model.dp_config.epsilon(per_epoch, at)


def test_a_budgets_last_update_is_searched_beside_the_compile(fresh_calibrations, monkeypatch):
    """A PrivacyBudget below the plan's target searches its last update (ε queries
    over the update counts) in the search's thread, beside XLA's compile: fit's own
    thread then finds every ε it asks kept, and the budget stops where it should."""
    accounting.epsilon.cache_clear()
    computed = []
    real = accounting.pld_discretization

    def spied(event, delta, relation):
        computed.append((event.count, threading.current_thread().name))
        return real(event, delta, relation)

    monkeypatch.setattr(accounting, "pld_discretization", spied)
    model = zero_loss_model(20, target_epsilon=2.0, batch_size=8, epochs=4, seed=1)
    budget = keras_dp.callbacks.PrivacyBudget(stop_at_epsilon=1.5)
    model.fit(*data(40), verbose=0, callbacks=[budget])
    in_fit = list(computed)
    assert {thread for _, thread in in_fit} == {"keras_dp-calibration"}, in_fit
    config = model.dp_config
    counts = {count for count, _ in in_fit}
    assert len(counts - {config.steps, 40 // 8}) >= 2, in_fit  # the search's own queries
    last = model.privacy_spent().steps
    assert 0 < last < config.steps
    assert config.epsilon(last) <= 1.5 < config.epsilon(last + 1)


def test_the_step_input_is_the_smallest_float32_not_below_sigma():
    rng = np.random.default_rng(0)
    sigmas = np.concatenate([rng.uniform(0.3, 20.0, 2000), [1.0, 0.5, 2.0**-20]])
    for sigma in sigmas:
        value = noise.multiplier_input(sigma)
        assert value.dtype == np.float32 and value.shape == ()
        assert float(value) >= sigma
        below = np.nextafter(value, np.float32(0))
        assert float(below) < sigma  # the next float32 down would under-noise
    assert float(noise.multiplier_input(1.0)) == 1.0  # exact values stay
