"""User-level DP: each part against an independent computation.

- ULS: the real train step equals a Python loop over the sampled users (each user's
  mean loss over their drawn examples, its gradient clipped as a whole in float64);
  a user's contribution never exceeds C whatever their number of examples;
- ELS: ε equals jax-privacy's ``DpsgdTrainingUserLevelAccountant`` on several plans;
  examples above the bound are dropped at random and reported;
- the sampler over users runs as the accountant assumes;
- 1 device == 4 devices; save/load keeps the plan; bad inputs are refused before any
  noise.
"""

import math

import jax
import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import keras_dp
from keras_dp import data, noise, sampling, user_data

from .helpers import gaussian_like, load_example, on_devices

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(n=300, users=40, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 6)) * 3).astype("float32")
    y = rng.integers(0, 3, n)
    weights = 1 / np.arange(1, users + 1) ** 1.2  # skewed: a few users own many examples
    ids = rng.choice(users, size=n, p=weights / weights.sum())
    return x, y, ids


def _model(config, lr=0.5, dropout=False):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((6,)), keras.layers.Dense(8, activation="tanh")]
    if dropout:
        layers.append(keras.layers.Dropout(0.3))
    model = keras.Sequential([*layers, keras.layers.Dense(3)])
    model = keras_dp.make_private(model, config)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=LOSS)
    return model


def _weights(model):
    return [np.asarray(v.value, np.float64) for v in model.trainable_variables]


def _config(**kw):
    base = dict(
        target_epsilon=math.inf,
        noise_multiplier=0.0,
        batch_size=6,
        steps=2,
        seed=7,
        privacy_unit="user",
        examples_per_user=4,
        l2_clip_norm=0.05,
    )
    return keras_dp.DPConfig(**{**base, **kw})


# ULS: the step against a loop over users ------------------------------------------


@pytest.mark.filterwarnings("ignore:DPConfig\\(noise_multiplier=0")
@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    clip=st.sampled_from([0.05, 0.5, 100.0]),
    sigma=st.sampled_from([0.0, 0.8]),
    batch=st.integers(1, 30),
    k=st.integers(1, 9),
    microbatch=st.one_of(st.none(), st.integers(1, 20)),
    devices=st.sampled_from([1, 2, 4]),
)
def test_uls_step_equals_a_loop_over_users(clip, sigma, batch, k, microbatch, devices):
    x, y, ids = _data()
    target = math.inf if sigma == 0 else 1e6
    config = _config(
        l2_clip_norm=clip, noise_multiplier=sigma, target_epsilon=target, batch_size=batch,
        examples_per_user=k, microbatch_size=microbatch,
    )  # fmt: skip
    with on_devices(devices):
        _check_uls_against_loop(config, x, y, ids, k, clip, sigma)


def _check_uls_against_loop(config, x, y, ids, k, clip, sigma):
    model = _model(config)
    model.build((None, 6))
    before = _weights(model)
    blocks = []
    original = user_data.UserSource.blocks

    def record(self, units, rng):
        indices, inner = original(self, units, rng)
        blocks.append((np.asarray(units), indices, inner))
        return indices, inner

    user_data.UserSource.blocks = record
    try:
        model.fit(x, y, user_ids=ids, verbose=0)
    finally:
        user_data.UserSource.blocks = original
    assert model.dp_steps == 2 and len(blocks) == 2

    owners = user_data.group_by_user(ids, len(y))
    weights = [w.copy() for w in before]

    def mean_loss(w, xs, ys):
        pred, _ = model.stateless_call(w, [], xs)
        return LOSS(ys, pred)  # the mean over the user's drawn examples

    grad = jax.jit(jax.grad(mean_loss))
    for step, (padded_users, indices, inner) in enumerate(blocks):
        drawn = data.draw_indices(model.dp_config, model._dp_seed, step)
        total = [np.zeros_like(w) for w in weights]
        for user in drawn:  # every drawn user exactly once, padding never
            row = int(np.flatnonzero(padded_users == user)[0])
            chosen = indices[row][inner[row]]
            assert set(chosen) <= set(owners[user])
            assert len(chosen) == min(k, len(owners[user]))
            assert len(set(chosen)) == len(chosen)
            w32 = [np.asarray(w, np.float32) for w in weights]
            g = [np.asarray(a, np.float64) for a in grad(w32, x[chosen], y[chosen])]
            norm = math.sqrt(sum(float(np.sum(a * a)) for a in g))
            scale = min(1.0, clip / max(norm, 1e-12))
            total = [t + scale * a for t, a in zip(total, g)]
        key = noise.step_key(noise.root_key(model._dp_seed), step)
        draws = gaussian_like(key, total, sigma * clip)
        weights = [
            w - 0.5 * (t + np.asarray(n, np.float64)) / config.batch_size
            for w, t, n in zip(weights, total, draws)
        ]
    for got, want, start in zip(_weights(model), weights, before):
        np.testing.assert_allclose(
            got - start, want - start, atol=2e-6 + 1e-4 * np.abs(want - start).max()
        )


@pytest.mark.filterwarnings("ignore:DPConfig\\(noise_multiplier=0")
def test_a_users_contribution_never_exceeds_c_whatever_their_examples():
    """One user owning 200 examples with huge gradients (q = 1, no noise, SGD(1), B = 1):
    the update is that user's gradient clipped as a whole, norm exactly C, for any k."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(200, 6)) * 50).astype("float32")
    y = rng.integers(0, 3, 200)
    for k in (1, 16, 200):
        config = _config(batch_size=1, steps=1, examples_per_user=k, l2_clip_norm=0.01)
        model = _model(config, lr=1.0)
        model.build((None, 6))
        before = _weights(model)
        model.fit(x, y, user_ids=np.zeros(200, int), verbose=0)
        after = _weights(model)
        moved = math.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(after, before)))
        assert moved == pytest.approx(0.01, rel=1e-4), k


# ELS -------------------------------------------------------------------------------


def _random_plans(count: int, seed: int = 0) -> list[tuple]:
    """Random (σ, B, N, steps, k) drawn once with a fixed seed (hypothesis' shrinking of
    a failing accountant comparison took minutes)."""
    rng = np.random.default_rng(seed)
    return [
        (
            float(rng.uniform(0.8, 4.0)),
            int(rng.integers(1, 65)),
            int(rng.integers(1000, 20_001)),
            int(rng.integers(1, 121)),
            int(rng.integers(1, 9)),
        )
        for _ in range(count)
    ]


@pytest.mark.parametrize("sigma, batch, n, steps, k", _random_plans(6))
def test_els_epsilon_equals_jax_privacy_user_level_accountant(sigma, batch, n, steps, k):
    from jax_privacy.accounting import accountants, analysis

    config = keras_dp.DPConfig(
        target_epsilon=1e4,
        batch_size=batch,
        steps=steps,
        dataset_size=n,
        noise_multiplier=sigma,
        privacy_unit="user",
        user_sampling="els",
        examples_per_user=k,
    )
    reference = analysis.DpsgdTrainingUserLevelAccountant(
        accountants.PldAccountantConfig(value_discretization_interval=1e-4)
    )
    params = analysis.DpParams(
        noise_multipliers=sigma,
        num_samples=n,
        delta=config.delta,
        batch_size=batch,
        examples_per_user=k,
    )
    expected = reference.compute_epsilon(steps, params)
    # Within 0.5% (our PLD grid is refined until stable to 0.5%) or a grid step.
    assert config.epsilon() == pytest.approx(expected, rel=0.006, abs=1e-4)


def test_els_with_one_example_per_user_is_the_poisson_subsampled_gaussian():
    from keras_dp import accounting

    els = keras_dp.DPConfig(
        target_epsilon=3.0, batch_size=32, steps=200, dataset_size=5000,
        privacy_unit="user", user_sampling="els", examples_per_user=1, noise_multiplier=1.1,
    )  # fmt: skip
    poisson = accounting.poisson_event(5000, 32 / 5000, 1.1, 200)  # untruncated
    assert els.epsilon() == pytest.approx(accounting.epsilon(poisson, els.delta), rel=0.005)
    # and a user with k = 4 examples spends more than one with 1
    assert keras_dp.DPConfig(**{**els.__dict__, "examples_per_user": 4}).epsilon() > 1.5 * (
        els.epsilon()
    )


def test_els_drops_examples_above_the_bound_at_random_and_reports_it(caplog):
    users = user_data.group_by_user(np.asarray([0] * 10 + [1] * 3 + [2] * 6), 19)
    kept_a, dropped = user_data.bound_examples(users, 4, seed=1)
    kept_b, _ = user_data.bound_examples(users, 4, seed=2)
    assert dropped == 6 + 2 and len(kept_a) == 4 + 3 + 4
    assert set(kept_a) != set(kept_b)  # random, keyed by the secret seed
    assert set(range(10, 13)) <= set(kept_a)  # a user under the bound keeps everything
    x, y, ids = _data()
    config = _config(user_sampling="els", batch_size=10, steps=2, target_epsilon=math.inf)
    model = _model(config)
    with caplog.at_level("WARNING", logger="keras_dp"):
        model.fit(x, y, user_ids=ids, verbose=0)
    assert "were dropped at random" in caplog.text
    owners = user_data.group_by_user(ids, len(y))
    assert model.dp_config.dataset_size == sum(min(len(o), 4) for o in owners)


# The sampler over users -----------------------------------------------------------


def test_user_sampler_draws_users_as_the_accountant_assumes():
    x, y, ids = _data(n=600, users=120)
    owners = user_data.group_by_user(ids, len(y))
    config = keras_dp.DPConfig(
        target_epsilon=3.0,
        batch_size=12,
        steps=300,
        dataset_size=len(owners),
        privacy_unit="user",
        examples_per_user=3,
    ).calibrate()
    source = user_data.UserSource(sampling.ExampleSource(x, y), owners, 3)
    counts, picks = [], np.zeros(len(y))
    for step in range(300):
        users = data.draw_indices(config, 5, step)
        assert len(users) <= config.max_batch_size and len(set(users)) == len(users)
        counts.append(len(users))
        indices, inner = source.blocks(users, np.random.default_rng([5, step]))
        for row in range(len(users)):
            picks[indices[row][inner[row]]] += 1
    # users per update ~ Binomial(N_users, q)
    q = config.sampling_probability
    assert stats.binomtest(sum(counts), 300 * len(owners), q).pvalue > 0.001
    # a big user's examples are picked uniformly (k = 3 of them at each of its draws)
    big = max(owners, key=len)
    assert len(big) > 3
    assert stats.chisquare(picks[big]).pvalue > 0.001


# Devices, saving, refusals --------------------------------------------------------


@pytest.mark.filterwarnings("ignore:DPConfig\\(noise_multiplier=0")
def test_user_level_four_devices_equal_one():
    x, y, ids = _data()
    config = _config(noise_multiplier=1.0, target_epsilon=1e6, steps=4, microbatch_size=3)
    results = []
    for devices in (1, 4):
        with on_devices(devices):
            model = _model(config, dropout=True)
            model.fit(x, y, user_ids=ids, verbose=0)
            results.append(_weights(model))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_user_level_plan_survives_save_and_load(tmp_path):
    x, y, ids = _data()
    config = _config(noise_multiplier=None, target_epsilon=3.0, steps=6, seed=None)
    model = _model(config)
    model.fit(x, y, user_ids=ids, verbose=0, epochs=1)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.dp_config.privacy_unit == "user" and loaded.dp_config.examples_per_user == 4
    assert loaded.privacy_spent().epsilon == model.privacy_spent().epsilon
    statement = keras_dp.privacy_statement(loaded)
    assert "user-level" in statement and "at most k = 4 examples per update" in statement


@pytest.mark.parametrize(
    "config_kw, fit_kw, match",
    [
        ({}, {}, "user_ids=ids"),  # user-level plan without ids
        ({}, {"user_ids": np.zeros(5)}, "5 user_ids for 300 examples"),
        ({"privacy_unit": "example", "examples_per_user": None}, {"user_ids": "same"},
         "protects examples"),
        ({}, {"user_ids": [[1], [2]] * 150}, "hashable"),
    ],
)  # fmt: skip
def test_bad_user_inputs_are_refused_before_any_noise(config_kw, fit_kw, match):
    x, y, ids = _data()
    if isinstance(fit_kw.get("user_ids"), str):
        fit_kw = {"user_ids": ids}
    model = _model(_config(target_epsilon=3.0, noise_multiplier=None, **config_kw))
    model.build((None, 6))
    before = _weights(model)
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, verbose=0, **fit_kw)
    for a, b in zip(before, _weights(model)):
        np.testing.assert_array_equal(a, b)
    assert model.dp_steps == 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"privacy_unit": "person"}, "privacy_unit"),
        ({"user_sampling": "both"}, "user_sampling"),
        ({"examples_per_user": None}, "examples_per_user"),
        ({"examples_per_user": 0}, "examples_per_user"),
        ({"privacy_unit": "example"}, "examples_per_user"),  # k without user level
        ({"user_sampling": "els", "accountant": "rdp"}, "accountant"),
        ({"sampling": "fixed", "accountant": "rdp"}, "sampling"),
        ({"noise": "bandmf", "bands": 2}, "noise"),
        ({"user_sampling": "els", "clip_quantile": 0.5}, "clip_quantile"),
    ],
)
def test_bad_user_level_plans_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"DPConfig.{field}="):
        _config(target_epsilon=3.0, noise_multiplier=None, **kwargs)


def test_the_uls_vs_els_example_runs_in_a_small_setting(tmp_path):
    example = load_example("user_level_digits")
    out = str(tmp_path / "table")
    args = ["--epsilons", "8", "--seeds", "1", "--ks", "4", "--steps", "80", "--out", out]
    (row,) = example.main(args)
    assert row["uls"]["k"] == row["els"]["k"] == 4
    assert min(row["uls"]["accuracy"] + row["els"]["accuracy"]) > 0.2  # chance is 0.1
    assert "| 8 | 80 | 4 |" in open(out + ".md").read()
