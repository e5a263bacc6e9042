"""One test per bug of the two privacy reviews (issues 15 and 16); each failed before its fix.

The tail-chunk double sum (15.1) is in test_clipping.py and test_reference_step.py, and
every-plan validation (15.2) also as a property in test_reference_step.py.
"""

import logging
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import keras_dp
from keras_dp import DPConfig, clipping, data, distribute, metrics, noise
from keras_dp import rows as batch_rows

from .test_training import LOSS, mlp, naive_clipped_mean

pytestmark = pytest.mark.filterwarnings("ignore:DPConfig\\(noise_multiplier=0")
DEBUG = dict(target_epsilon=math.inf, noise_multiplier=0.0)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def xy(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype("float32") * 3, rng.integers(0, 3, n)


def private(model=None, lr=0.1, optimizer=None, **config):
    model = keras_dp.make_private(model or mlp(), DPConfig(**config))
    model.compile(optimizer=optimizer or keras.optimizers.SGD(lr), loss=LOSS)
    return model


def values(model):
    return [np.array(v.value) for v in model.weights]


# 15.2 ------------------------------------------------------------------------------


def test_a_given_sigma_with_dataset_size_is_checked_before_any_update():
    x, y = xy(1000)
    config = DPConfig(
        target_epsilon=1.0, dataset_size=1000, noise_multiplier=0.3, batch_size=50, epochs=2
    )
    assert config.is_calibrated  # this is what skipped the check
    model = private(**{f: getattr(config, f) for f in ("target_epsilon", "batch_size", "epochs")},
                    dataset_size=1000, noise_multiplier=0.3)  # fmt: skip
    model.build((None, 5))
    before = values(model)
    with pytest.raises(ValueError, match="target_epsilon=1"):
        model.fit(x, y, verbose=0)
    assert model.dp_steps == 0 and all(np.array_equal(a, b) for a, b in zip(before, values(model)))


# 15.3 ------------------------------------------------------------------------------


def one_update(optimizer, policy=None, dtype=None):
    """The weights' change after one full-batch update of clip 0.5, no noise."""
    x, y = xy(10)
    keras.mixed_precision.set_global_policy(policy or "float32")
    try:
        model = private(
            mlp(),
            optimizer=optimizer,
            batch_size=10,
            steps=1,
            l2_clip_norm=0.5,
            seed=1,
            **DEBUG,
        )
        model.build((None, 5))
        before = [np.array(v.value, np.float64) for v in model.trainable_variables]
        expected = naive_clipped_mean(model, x, y, 0.5)
        model.fit(x, y, verbose=0)
        after = [np.array(v.value, np.float64) for v in model.trainable_variables]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return [a - b for a, b in zip(after, before)], expected


def test_mixed_float16_loss_scale_optimizer_applies_the_true_gradient():
    moved, expected = one_update(keras.optimizers.SGD(1.0), policy="mixed_float16")
    for m, e in zip(moved, expected):  # was 32,768x too small
        np.testing.assert_allclose(m, e, rtol=2e-2, atol=1e-4)


def test_loss_scale_factor_is_undone_exactly():
    moved, expected = one_update(keras.optimizers.SGD(1.0, loss_scale_factor=128.0))
    for m, e in zip(moved, expected):  # was 128x too small
        np.testing.assert_allclose(m, e, rtol=1e-4, atol=1e-6)


def test_mixed_bfloat16_trains_like_float32():
    moved, expected = one_update(keras.optimizers.SGD(1.0), policy="mixed_bfloat16")
    for m, e in zip(moved, expected):
        np.testing.assert_allclose(m, e, rtol=5e-2, atol=2e-3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_clipped_norm_never_exceeds_c_in_low_precision(dtype):
    """Scaling in the leaves' dtype overshot C by up to 0.26% (bf16); now float32."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(200):
        tree = [jnp.asarray(rng.normal(size=s) * rng.uniform(1, 50), dtype) for s in (37, (5, 3))]
        clipped, finite, _ = clipping.clip_to_norm(tree, 1.0)
        assert bool(finite) and all(c.dtype == jnp.float32 for c in clipped)
        worst = max(worst, float(clipping.global_norm(clipped)))
    assert worst <= 1.0 + 1e-6


# 15.4 ------------------------------------------------------------------------------


def test_seed_state_advances_the_same_whatever_the_draw_holds():
    """A Dropout layer used twice advances its seed state by 2 per forward pass; empty
    Poisson draws advanced it by 1, so the saved state counted the empty draws."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    drop = keras.layers.Dropout(0.2)
    outputs = keras.layers.Dense(3)(drop(drop(inputs)))
    model = private(keras.Model(inputs, outputs), batch_size=1, steps=40, **DEBUG)
    model.build((None, 5))
    state = next(v for v in model.non_trainable_variables if "seed_generator" in v.path)
    before = np.array(state.value)
    x, y = xy(60)
    model.fit(x, y, verbose=0)
    sizes = [len(data.draw_indices(model.dp_config, model._dp_seed, t)) for t in range(40)]
    assert 0 in sizes and max(sizes) > 0  # both kinds of draw happened
    np.testing.assert_array_equal(np.array(state.value) - before, [0, 2 * 40])


# 15.5 and 16.3 ---------------------------------------------------------------------


def test_loading_older_weights_draws_a_new_secret_seed(tmp_path):
    x, y = xy(40)
    model = private(batch_size=4, epochs=2, target_epsilon=8.0)
    model.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "e1.weights.h5")
    model.save_weights(path)
    first_seed = model._dp_seed
    model.fit(x, y, epochs=2, initial_epoch=1, verbose=0)
    model.load_weights(path)  # the ledger goes back to update 10
    assert model._dp_seed != first_seed  # steps 10.. will not reuse samples and noise keys
    # A user-fixed seed (for tests) is kept: such runs are marked not private.
    fixed = private(batch_size=4, epochs=2, target_epsilon=8.0, seed=3)
    fixed.fit(x, y, epochs=1, verbose=0)
    fixed.load_weights(path)
    assert fixed._dp_seed == 3


def test_a_checkpoint_chosen_after_later_updates_is_accounted_for_all_of_them(tmp_path):
    x, y = xy(40)
    model = private(batch_size=4, epochs=4, target_epsilon=3.0)
    path = str(tmp_path / "best.weights.h5")
    score = keras.callbacks.LambdaCallback(  # a held-out score that was best at epoch 1
        on_epoch_end=lambda epoch, logs: logs.update(val_score=[3.0, 1.0, 2.0, 2.5][epoch])
    )
    best = keras.callbacks.ModelCheckpoint(
        path, monitor="val_score", mode="min", save_best_only=True, save_weights_only=True
    )
    model.fit(x, y, verbose=0, callbacks=[score, best])
    computed = model.dp_steps
    model.load_weights(path)
    assert model._dp_ledger.steps < computed  # an earlier checkpoint was the best...
    assert model.dp_steps == computed  # ...but all updates computed are accounted
    assert model.privacy_spent().epsilon == model.dp_config.epsilon(computed)
    again = private(batch_size=4, epochs=4, target_epsilon=3.0)
    again.load_weights(path)  # another model in the same process: the same count
    assert again.dp_steps == computed
    assert "without noise" in keras_dp.privacy_statement(model)


# 15.6 ------------------------------------------------------------------------------


def test_statement_says_n_is_treated_as_public():
    config = DPConfig(target_epsilon=3, batch_size=10, epochs=1, dataset_size=100)
    text = keras_dp.privacy_statement(config.calibrate())
    assert "N is treated as public" in text and "not assumed public" not in text


# 15.7 ------------------------------------------------------------------------------


def test_prior_updates_are_declared_and_counted():
    x, y = xy(40)
    plan = dict(batch_size=4, epochs=6, target_epsilon=4.0)
    trained = private(**plan)
    trained.fit(x, y, epochs=2, verbose=0)
    assert trained.dp_steps == 20
    plain = mlp()
    plain.set_weights(trained.get_weights())  # the ledger cannot follow this path
    model = keras_dp.make_private(plain, DPConfig(**plan), prior_updates=20)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    assert model.dp_steps == 20
    model.fit(x, y, epochs=6, initial_epoch=2, verbose=0)
    assert model.dp_steps == 60
    assert model.privacy_spent().epsilon == model.dp_config.epsilon(60)
    with pytest.raises(ValueError, match="prior_updates"):
        keras_dp.make_private(mlp(), DPConfig(**plan), prior_updates=-1)


# 15.8 ------------------------------------------------------------------------------


def test_train_on_batch_says_to_use_fit_and_test_on_batch_works():
    x, y = xy(20)
    model = private(batch_size=5, epochs=1, target_epsilon=8.0)
    with pytest.raises(ValueError, match="Use model.fit"):
        model.train_on_batch(x, y)
    model.fit(x, y, verbose=0)
    loss = model.test_on_batch(x, y)
    assert np.isfinite(loss)


class Counter(keras.layers.Layer):
    def build(self, shape):
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False)

    def call(self, x):
        self.calls.assign(self.calls + 1.0)
        return x


def test_state_assigned_in_call_is_named_in_a_warning(caplog):
    model = keras.Sequential([keras.Input((5,)), Counter(name="my_counter"), keras.layers.Dense(3)])
    model = private(model, batch_size=5, epochs=1, target_epsilon=8.0)
    with caplog.at_level(logging.WARNING, logger="keras_dp"):
        model.fit(*xy(20), verbose=0)
    assert any("my_counter" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="keras_dp"):
        private(batch_size=5, epochs=1, target_epsilon=8.0).fit(*xy(20), verbose=0)
    assert not any("assigned in call" in r.getMessage() for r in caplog.records)


def test_nonfinite_examples_shows_only_when_nonzero(capsys):
    x, y = xy(20)
    model = private(batch_size=20, steps=2, **DEBUG)
    history = model.fit(x, y, verbose=1)
    assert "nonfinite" not in capsys.readouterr().out
    assert history.history["nonfinite_examples"] == [0.0, 0.0]  # still countable
    x[3] = np.nan
    model = private(batch_size=20, steps=2, **DEBUG)
    history = model.fit(x, y, verbose=1)
    assert "nonfinite_examples: 1" in capsys.readouterr().out
    assert history.history["nonfinite_examples"] == [1.0, 1.0]  # q = 1: in every update


def test_audit_bounds_hold_jointly_and_fixed_sampling_is_refused():
    from keras_dp import audit

    def build():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
        m.compile(optimizer="sgd", loss=LOSS)
        return m

    x, y = xy(200)
    fixed = DPConfig(
        target_epsilon=2.0, batch_size=20, epochs=1, sampling="fixed", accountant="rdp"
    )
    with pytest.raises(ValueError, match="replace-one"):
        audit.run(build, (x, y), fixed, num_canaries=20)
    seen = []

    class Spy:
        def __init__(self, inside, outside):
            pass

        def epsilon_one_run(self, significance, delta):
            seen.append(significance)
            return 0.0

        epsilon_clopper_pearson = epsilon_one_run

        def attack_auroc(self):
            return 0.5

        def tpr_at_given_fpr(self, fpr):
            return fpr

    import jax_privacy.auditing

    original = jax_privacy.auditing.CanaryScoreAuditor
    jax_privacy.auditing.CanaryScoreAuditor = Spy
    try:
        config = DPConfig(target_epsilon=2.0, batch_size=20, epochs=1)
        report = audit.run(build, (x, y), config, num_canaries=20, confidence=0.95)
    finally:
        jax_privacy.auditing.CanaryScoreAuditor = original
    assert seen == pytest.approx([0.025, 0.025])  # Bonferroni: both bounds hold jointly at 95%
    assert report.confidence == 0.95


# 16.1 ------------------------------------------------------------------------------


def test_a_fixed_seed_is_reported_not_private_everywhere(tmp_path):
    x, y = xy(40)
    model = private(batch_size=4, epochs=1, target_epsilon=4.0, seed=0)
    model.fit(x, y, verbose=0)
    assert model.privacy_spent().private is False
    assert keras_dp.privacy_statement(model).startswith("NOT PRIVATE")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.privacy_spent().private is False  # the saved ledger says so too
    loaded.save_weights(tmp_path / "w.weights.h5")
    fresh = private(batch_size=4, epochs=1, target_epsilon=4.0)
    fresh.load_weights(tmp_path / "w.weights.h5")
    assert fresh.privacy_spent().private is False
    secret = private(batch_size=4, epochs=1, target_epsilon=4.0)
    secret.fit(x, y, verbose=0)
    assert secret.privacy_spent().private is True
    assert "NOT PRIVATE" not in keras_dp.privacy_statement(secret)


def dp_config_calls(text: str) -> list[str]:
    """The argument text of every ``DPConfig(...)`` call in ``text`` (nested parens too)."""
    calls = []
    for match in re.finditer(r"DPConfig\(", text):
        depth, end = 1, match.end()
        while depth and end < len(text):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        calls.append(text[match.end() : end - 1])
    return calls


def test_no_example_notebook_or_readme_fixes_the_dp_seed():
    files = [*ROOT.glob("examples/*.py"), ROOT / "README.md", *ROOT.glob("notebooks/*.ipynb"),
             ROOT / "scripts" / "build_notebook.py"]  # fmt: skip
    offenders = [
        f"{path.name}: DPConfig({call.strip()})"
        for path in files
        for call in dp_config_calls(path.read_text())
        if re.search(r"\bseed\s*=\s*(?!None\b)", call)
    ]
    assert offenders == []
    assert dp_config_calls("DPConfig(a=f(1), seed=0)") == ["a=f(1), seed=0"]  # the parser works


# 16.2 ------------------------------------------------------------------------------


def test_weights_are_reported_under_the_plan_they_were_trained_with(tmp_path):
    x, y = xy(40)
    loose = private(batch_size=4, steps=20, target_epsilon=50.0)
    loose.fit(x, y, verbose=0)
    path = str(tmp_path / "loose.weights.h5")
    loose.save_weights(path)
    strict = private(batch_size=4, steps=20, target_epsilon=1.0)
    strict.load_weights(path)
    assert strict.dp_config.target_epsilon == 50.0  # the weights' plan, adopted
    assert strict.privacy_spent().epsilon == loose.privacy_spent().epsilon
    strict.save(tmp_path / "m.keras")
    assert keras.models.load_model(tmp_path / "m.keras").dp_config.target_epsilon == 50.0
    with pytest.raises(ValueError, match="another plan"):
        strict.fit(x, y, verbose=0)  # refuses until the user chooses
    with pytest.raises(ValueError, match="another plan"):
        strict.set_dp_config(DPConfig(batch_size=4, steps=20, target_epsilon=1.0))


# 16.4 ------------------------------------------------------------------------------


def test_the_secret_seed_is_not_compiled_into_the_program():
    seed = 0x7A3B9C1D5E6F7081
    hi, lo = (int(w) for w in noise.seed_words(seed))
    x, y = xy(20)
    model = private(batch_size=5, epochs=1, target_epsilon=8.0)
    model.fit(x, y, verbose=0)
    model._dp_seed = seed
    batches = data.DPBatches(model, data.sampling.ExampleSource(x, y), model.dp_config, 2, 4)
    batch = batches[0]
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    text = jax.jit(model.train_step).lower(state, batch).as_text()
    assert str(hi) not in text and str(lo) not in text
    _, key_rows = batch_rows.split_mask_key(batch_rows.unpack_rows(batch)[0]["dp_mask_key"])
    key_words = [int(w) for w in key_rows[0]]  # the update's key: data too
    assert key_words == [int(w) for w in noise.step_key_data(seed, [model.dp_steps])[0]]
    assert not any(str(w) in text or str(w - 2**32) in text for w in key_words)
    # The search can fail: a step that closes over the key shows its words.
    leaky = jax.jit(lambda step: jax.random.key_data(noise.step_key(noise.root_key(seed), step)))
    leaked = leaky.lower(0).as_text()
    assert str(lo) in leaked or str(lo - 2**32) in leaked
    constant = np.asarray(key_words, np.uint32)
    leaked = jax.jit(lambda: jax.random.key_data(noise.wrap_step_key(constant))).lower()
    assert all(str(w) in leaked.as_text() or str(w - 2**32) in leaked.as_text() for w in key_words)


# 16.5 ------------------------------------------------------------------------------


def test_a_preprocessor_that_changes_the_number_of_rows_is_refused():
    source = data.sampling.ExampleSource(np.arange(10.0)[:, None], np.arange(10))

    def doubling(x, y, sw):
        return np.concatenate([x, x]), np.concatenate([y, y])

    with pytest.raises(ValueError, match="one row per example"):
        data.preprocess(doubling, source)
    out = data.preprocess(lambda x, y, sw: (x * 2, y), source)
    assert out.size == 10


# 16.6 ------------------------------------------------------------------------------


def test_padding_rows_never_poison_loss_or_metrics(monkeypatch):
    x, y = xy(60)
    x[0] = np.nan  # padding repeats example 0; it is never drawn here
    draw = data.draw_indices
    monkeypatch.setattr(data, "draw_indices", lambda *a: (lambda i: i[i != 0])(draw(*a)))
    model = keras_dp.make_private(
        mlp(), DPConfig(batch_size=6, steps=4, microbatch_size=128, **DEBUG)
    )  # one chunk covers the whole physical batch, padding included
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=LOSS,
        metrics=["accuracy"],
        weighted_metrics=[keras.metrics.SparseCategoricalCrossentropy(from_logits=True)],
    )
    history = model.fit(x, y, sample_weight=np.ones(60, "float32"), verbose=0)
    for key, series in history.history.items():
        assert np.all(np.isfinite(series)), key
    real = jnp.asarray([True, False])
    masked = metrics.masked(jnp.asarray([[1.0, 2.0], [np.nan, np.inf]]), real)
    assert np.array_equal(np.asarray(masked), [[1.0, 2.0], [0.0, 0.0]])


# 16.7 ------------------------------------------------------------------------------


def test_an_oversized_untruncated_draw_computes_every_row(monkeypatch):
    monkeypatch.setattr(data, "_untruncated_bound", lambda config: 10)
    x, y = xy(18)
    model = private(
        batch_size=18, steps=1, accountant="rdp", microbatch_size=16, l2_clip_norm=0.5,
        seed=1, lr=1.0, **DEBUG,
    )  # fmt: skip
    model.build((None, 5))
    before = [np.array(v.value) for v in model.trainable_variables]
    expected = naive_clipped_mean(model, x, y, 0.5)  # q = 1: all 18 rows, bound 10
    model.fit(x, y, verbose=0)
    for b, v, e in zip(before, model.trainable_variables, expected):
        np.testing.assert_allclose(np.array(v.value) - b, e, rtol=1e-4, atol=1e-6)


# 16.8 ------------------------------------------------------------------------------


def test_processes_that_disagree_are_refused_before_any_noise(monkeypatch):
    from jax.experimental import multihost_utils

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    process0 = {}
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda a: process0.get("a", a))
    draw = lambda: (np.arange(6.0), np.arange(6))  # noqa: E731
    distribute.check_processes_agree(100, draw)  # agrees with itself
    process0["a"] = np.asarray([99, 0, 0], np.uint32)
    with pytest.raises(ValueError, match="dataset size"):
        distribute.check_processes_agree(100, draw)
    mine = np.asarray([100, 0, 0], np.uint32)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda a: mine)
    with pytest.raises(ValueError, match="first sampled batch"):
        distribute.check_processes_agree(100, draw)


# 16.9 ------------------------------------------------------------------------------


class DropsRepeats:
    """A source whose ``__getitems__`` returns each distinct key once."""

    def __init__(self, n):
        self.x, self.y = xy(n)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __getitems__(self, keys):
        return [self[i] for i in dict.fromkeys(keys)]


def test_a_source_that_returns_too_few_rows_is_refused():
    model = private(batch_size=4, epochs=1, target_epsilon=8.0)
    with pytest.raises(ValueError, match="one item per index"):
        model.fit(DropsRepeats(40), verbose=0)


def test_delta_at_or_above_one_over_n_is_refused_everywhere():
    x, y = xy(40)
    model = private(batch_size=4, epochs=1, target_epsilon=8.0)
    with pytest.raises(ValueError, match="PrivacyBudget"):
        model.fit(x, y, verbose=0, callbacks=[keras_dp.callbacks.PrivacyBudget(delta=0.05)])
    assert model.dp_steps == 0
    model.fit(x, y, verbose=0)
    with pytest.raises(ValueError, match="1/dataset_size"):
        model.privacy_spent(delta=1 / 40)
    assert model.privacy_spent(delta=1e-3).epsilon > 0
