"""Package-level behaviour: backend check, privacy statement."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

import keras_dp
from keras_dp import DPConfig


def _run(code, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300
    )


def test_import_with_another_backend_says_to_set_jax():
    result = _run("import keras; import keras_dp", KERAS_BACKEND="numpy")
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "KERAS_BACKEND=jax" in result.stderr
    assert "'numpy'" in result.stderr


def test_import_without_a_backend_selects_jax():
    result = _run("import keras_dp, keras; print(keras.backend.backend())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "jax"


def test_privacy_statement_names_everything_a_reader_needs():
    config = DPConfig(
        target_epsilon=3.0, batch_size=256, epochs=3, dataset_size=60_000, noise_multiplier=0.9
    )
    text = keras_dp.privacy_statement(config)
    assert "Poisson" in text and "add-or-remove-one" in text
    assert "σ = 0.9" in text
    assert f"q = {256 / 60_000:.6g}" in text
    assert f"truncated to at most {config.max_batch_size}" in text
    assert "703 of 703" in text  # round(3 * 60000 / 256)
    assert importlib.metadata.version("dp-accounting") in text
    assert "PLD" in text and "Not covered" in text
    assert f"ε = {config.epsilon():.4g} at δ = {config.delta:.3g}" in text
    assert f"ε = {config.epsilon(100):.4g}" in keras_dp.privacy_statement(config, steps=100)
    assert text.count("ε = ") == 3  # the target δ and two others


def test_privacy_statement_of_fixed_batches_names_replace_one_and_its_accountant():
    config = DPConfig(
        target_epsilon=3.0,
        batch_size=256,
        epochs=3,
        dataset_size=60_000,
        sampling="fixed",
        accountant="rdp",
    ).calibrate()
    text = keras_dp.privacy_statement(config)
    assert "exactly 256 of N = 60000 examples, without replacement" in text
    assert "replace-one example" in text and "sensitivity is 2C" in text
    assert "Poisson" not in text and "add-or-remove" not in text
    assert "RDP (SampledWithoutReplacementDpEvent)" in text
    assert f"ε = {config.epsilon():.4g} at δ = {config.delta:.3g}" in text


def test_privacy_statement_assumes_what_the_privacy_unit_protects():
    """The statement's assumption matches the unit: one example per person at example
    level; at user level, ids that name people (it once said "each privacy unit is one
    example" there too), and adaptive clipping counts unclipped users."""
    plan = dict(target_epsilon=3.0, batch_size=64, epochs=3, dataset_size=10_000)
    example = keras_dp.privacy_statement(DPConfig(**plan))
    assert "each person contributes one example" in example
    assert "privacy_unit='user' protects a person" in example
    user = dict(plan, privacy_unit="user", examples_per_user=4)
    for kw in ({}, {"user_sampling": "els"}, {"clip_quantile": 0.5}):
        text = keras_dp.privacy_statement(DPConfig(**user, **kw))
        assert "one example" not in text and "the user_ids given to fit name" in text, kw
    adaptive = keras_dp.privacy_statement(DPConfig(**user, clip_quantile=0.5))
    assert "count of unclipped users" in adaptive and "unclipped examples" not in adaptive
    assert "a random k of them to each update" in adaptive


def test_privacy_statement_rejects_other_objects():
    with pytest.raises(TypeError, match="DPConfig or a keras_dp model"):
        keras_dp.privacy_statement(object())


def test_library_never_prints_to_stdout(capfd):
    import ast
    import pathlib

    import keras
    import numpy as np

    import keras_dp

    for path in pathlib.Path(keras_dp.__file__).parent.glob("*.py"):
        calls = [
            node.func.id
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        ]
        assert "print" not in calls, f"{path.name} calls print(); use logging"
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    config = keras_dp.DPConfig(target_epsilon=2.0, batch_size=4, epochs=1, seed=0)
    model = keras_dp.make_private(model, config)
    model.compile(optimizer="sgd", loss="mse")
    capfd.readouterr()
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(20, 3)), rng.normal(size=(20, 2)), verbose=0)
    keras_dp.privacy_statement(model)
    assert capfd.readouterr().out == ""
