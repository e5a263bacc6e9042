"""Nothing lost: .keras round trips carry the plan and the ledger, never the noise key."""

import json
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

import keras_dp
from keras_dp import DPConfig

from .test_hub import tiny_gemma
from .test_training import LOSS


def data(n=40):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 5)).astype("float32"), np.arange(n) % 3


def functional():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(4, "tanh")(inputs)))


@keras.saving.register_keras_serializable(package="keras_dp_tests")
class Subclassed(keras_dp.DPModel, keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x)


def trained(model, epochs=1, **config):
    config = DPConfig(target_epsilon=4.0, batch_size=4, epochs=2, seed=3, **config)
    if isinstance(model, keras_dp.DPModel):
        model.set_dp_config(config)
    else:
        model = keras_dp.make_private(model, config)
    model.compile(optimizer="adam", loss=LOSS)
    model.fit(*data(), epochs=epochs, verbose=0)
    return model


@pytest.mark.parametrize("make", [functional, lambda: Subclassed()], ids=["functional", "mixin"])
def test_round_trip_keeps_weights_plan_and_ledger(make, tmp_path):
    model = trained(make())
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x, y = data()
    assert isinstance(loaded, keras_dp.DPModel) and type(loaded) is type(model)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert loaded.dp_steps == model.dp_steps == 10
    assert loaded.privacy_spent() == model.privacy_spent()
    assert loaded.dp_config.noise_multiplier == model.dp_config.noise_multiplier
    assert loaded.dp_config.seed is None  # the noise key is not stored
    # Continuing training continues the ledger and ends at the planned ε.
    loaded.fit(x, y, verbose=0)
    assert loaded.dp_steps == 20
    assert loaded.privacy_spent().epsilon == model.dp_config.epsilon(20)
    with pytest.raises(ValueError, match="budget of this plan is spent"):
        loaded.fit(x, y, verbose=0)


def test_saved_file_holds_no_seed(tmp_path):
    model = trained(functional())
    model.save(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as archive:
        config = json.loads(archive.read("config.json"))
    state = config["config"]["dp_state"]
    assert state["steps"] == 10 and state["config"]["seed"] is None
    assert config["registered_name"] == "keras_dp>PrivateModel"


def test_resuming_with_another_plan_is_refused(tmp_path):
    model = trained(functional())
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    same = DPConfig(target_epsilon=4.0, batch_size=4, epochs=2, seed=5)  # seed may differ
    loaded.set_dp_config(same)
    for change in [dict(l2_clip_norm=0.5), dict(batch_size=8), dict(target_epsilon=8.0)]:
        other = DPConfig(**{**dict(target_epsilon=4.0, batch_size=4, epochs=2), **change})
        with pytest.raises(ValueError, match="another plan"):
            loaded.set_dp_config(other)


def test_loads_in_a_fresh_process_after_import_keras_dp(tmp_path):
    model = trained(functional())
    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "pred.npy", model.predict(data()[0], verbose=0))
    script = f"""
import keras_dp, keras, numpy as np
m = keras.models.load_model({str(tmp_path / "m.keras")!r})
x = np.random.default_rng(0).normal(size=(40, 5)).astype("float32")
assert isinstance(m, keras_dp.DPModel), type(m)
np.testing.assert_array_equal(m.predict(x, verbose=0), np.load({str(tmp_path / "pred.npy")!r}))
print("STEPS", m.dp_steps, m.privacy_spent().epsilon)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"STEPS 10 {model.privacy_spent().epsilon}" in out.stdout


def test_keras_hub_lora_model_round_trips(tmp_path):
    lm = tiny_gemma()
    lm.backbone.enable_lora(rank=2)
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(1, 64, (16, 8)).astype("int32"),
        "padding_mask": np.ones((16, 8), bool),
    }
    y = rng.integers(1, 64, (16, 8)).astype("int32")
    lm = keras_dp.make_private(lm, DPConfig(target_epsilon=8.0, batch_size=4, epochs=1, seed=0))
    lm.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    lm.fit(x, y, verbose=0)
    lm.save(tmp_path / "lm.keras")
    loaded = keras.models.load_model(tmp_path / "lm.keras")
    assert isinstance(loaded, keras_dp.DPModel) and loaded.dp_steps == lm.dp_steps == 4
    np.testing.assert_allclose(loaded.predict(x, verbose=0), lm.predict(x, verbose=0), atol=1e-6)
    # The adapters alone, with the statement beside them; they load onto a fresh base.
    statement = keras_dp.save_lora_weights(lm, str(tmp_path / "a.lora.h5"))
    assert "4 of 4 planned" in open(statement).read()
    fresh = tiny_gemma()
    fresh.backbone.enable_lora(rank=2)
    fresh.backbone.load_lora_weights(str(tmp_path / "a.lora.h5"))
    np.testing.assert_allclose(fresh.predict(x, verbose=0), lm.predict(x, verbose=0), atol=1e-6)


def test_resuming_from_a_weights_only_checkpoint_is_refused(tmp_path):
    x, y = data()
    config = dict(target_epsilon=4.0, batch_size=4, epochs=2, seed=3)
    first = keras_dp.make_private(functional(), DPConfig(**config))
    first.compile(optimizer="adam", loss=LOSS)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)
    first.fit(x, y, epochs=1, verbose=0, callbacks=[backup])  # "killed" after epoch 1
    assert first.dp_steps == 10

    # A new process rebuilds the model: its ledger is empty, the backup's weights are not.
    again = keras_dp.make_private(functional(), DPConfig(**config))
    again.compile(optimizer="adam", loss=LOSS)
    with pytest.raises(ValueError, match="under-reported"):
        again.fit(x, y, verbose=0, callbacks=[backup])
    assert again.dp_steps == 0
    with pytest.raises(ValueError, match="under-reported"):
        again.fit(x, y, epochs=2, initial_epoch=1, verbose=0)

    # Resuming from a .keras file carries the ledger: same ε as an uninterrupted run.
    first.save(tmp_path / "m.keras")
    resumed = keras.models.load_model(tmp_path / "m.keras")
    resumed.fit(x, y, epochs=2, initial_epoch=1, verbose=0)
    assert resumed.dp_steps == 20
    assert resumed.privacy_spent().epsilon == DPConfig(**config).calibrate(40).epsilon(20)
