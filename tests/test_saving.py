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


class Unregistered(keras.Model):  # a user's model class Keras has not been told about
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x)


def test_an_unregistered_model_class_is_named_on_load_and_loads_from_custom_objects(tmp_path):
    model = trained(Unregistered())
    path = tmp_path / "m.keras"
    model.save(path)
    with pytest.raises(TypeError, match=r"Unregistered of this DP model.*custom_objects"):
        keras.models.load_model(path)
    loaded = keras.models.load_model(path, custom_objects={"Unregistered": Unregistered})
    assert isinstance(loaded, Unregistered) and isinstance(loaded, keras_dp.DPModel)
    assert loaded.dp_steps == 10 and loaded.privacy_spent() == model.privacy_spent()
    x, _ = data()
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("copy_", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy_keep_weights_plan_and_ledger(copy_):
    import copy
    import pickle

    model = trained(functional())  # its class was made by make_private
    copied = pickle.loads(pickle.dumps(model)) if copy_ == "pickle" else copy.deepcopy(model)
    x, y = data()
    assert type(copied) is type(model) and copied is not model
    np.testing.assert_array_equal(copied.predict(x, verbose=0), model.predict(x, verbose=0))
    assert copied.dp_steps == 10 and copied.privacy_spent() == model.privacy_spent()
    assert copied._dp_seed is None  # the secret seed never travels
    copied.fit(x, y, verbose=0)
    assert copied.dp_steps == 20 and model.dp_steps == 10


def test_legacy_h5_save_is_refused_before_writing(tmp_path):
    model = trained(functional())
    with pytest.raises(ValueError, match=r"saved as a \.keras file.*'\.keras'"):
        model.save(tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


def test_clone_model_gives_a_model_without_the_plan():
    """What the README says of ``keras.models.clone_model`` (Keras' own behaviour)."""
    sequential = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    for model in (functional(), sequential):
        plan = DPConfig(target_epsilon=4.0, batch_size=4, epochs=2)
        clone = keras.models.clone_model(keras_dp.make_private(model, plan))
        clone.compile(optimizer="adam", loss=LOSS)
        if isinstance(model, keras.Sequential):
            assert not isinstance(clone, keras_dp.DPModel)  # a plain keras.Sequential
        else:
            assert isinstance(clone, keras_dp.DPModel) and clone.dp_config is None
            with pytest.raises(ValueError, match="no DP plan.*set_dp_config"):
                clone.fit(*data(), verbose=0)
        keras_dp.make_private(clone, plan)
        clone.compile(optimizer="adam", loss=LOSS)
        clone.fit(*data(), epochs=1, verbose=0)
        assert clone.dp_steps == 10 and clone.privacy_spent().epsilon > 0


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


RESUME = dict(target_epsilon=4.0, batch_size=4, epochs=2, seed=3)


def private_functional(**overrides):
    model = keras_dp.make_private(functional(), DPConfig(**{**RESUME, **overrides}))
    model.compile(optimizer="adam", loss=LOSS)
    return model


def weights(model):
    return [np.array(v.value) for v in model.weights]


class Interrupt(keras.callbacks.Callback):
    """Raises in the middle of epoch ``epoch`` (an exception mid-epoch)."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at, self.epoch = (epoch, batch), None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("interrupted")


def test_backup_and_restore_after_an_exception_resumes_and_counts_the_lost_updates(
    tmp_path, monkeypatch
):
    x, y = data()
    drawn = []  # the sampler's step numbers, in the order drawn
    draw = keras_dp.data.draw_indices
    monkeypatch.setattr(
        keras_dp.data,
        "draw_indices",
        lambda c, s, step, *a: drawn.append(step) or draw(c, s, step, *a),
    )
    straight = private_functional()
    straight.fit(x, y, verbose=0)
    assert drawn == list(range(20))

    drawn.clear()
    model = private_functional()
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(x, y, epochs=2, verbose=0, callbacks=[backup, Interrupt(1, 4)])
    # 10 in epoch 0 (backed up), 4 in the lost part of epoch 1, and the 5th, counted as it
    # was about to be dispatched when the exception came (the safe side).
    assert model.dp_steps == 15
    model.fit(x, y, epochs=2, verbose=0, callbacks=[backup])
    # The backup rolled the weights back to update 10 and the sampler went on from there.
    # In the same process the 5 lost updates stay accounted (the weights before the
    # rollback could have been looked at), so 5 more fill the plan: ε is the plan's.
    assert drawn == list(range(14)) + list(range(10, 15))
    assert model.dp_steps == 20 and model._dp_ledger.steps == 15
    assert model.privacy_spent().epsilon == straight.privacy_spent().epsilon


def test_weights_only_checkpoints_carry_the_ledger_and_its_plan(tmp_path):
    x, y = data()
    first = private_functional()
    first.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "epoch1.weights.h5")
    first.save_weights(path)  # what ModelCheckpoint(save_weights_only=True) writes
    predictions = first.predict(x, verbose=0)

    resumed = private_functional()
    resumed.load_weights(path)
    assert resumed.dp_steps == 10
    resumed.fit(x, y, epochs=2, initial_epoch=1, verbose=0)
    assert resumed.dp_steps == 20
    assert resumed.privacy_spent().epsilon == DPConfig(**RESUME).calibrate(40).epsilon(20)
    # Adam's state came back too (the optimizer is built before loading): the resumed
    # run is the uninterrupted one.
    first.fit(x, y, epochs=2, initial_epoch=1, verbose=0)
    for a, b in zip(weights(resumed), weights(first)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    # The same weights under another plan are refused before any update.
    other = private_functional(l2_clip_norm=0.5)
    other.load_weights(path)
    before = weights(other)
    with pytest.raises(ValueError, match="another plan"):
        other.fit(x, y, epochs=2, initial_epoch=1, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, weights(other)))

    # A plain model loads a DP checkpoint's weights (the ledger entry is ignored).
    plain = functional()
    plain.load_weights(path)
    np.testing.assert_array_equal(plain.predict(x, verbose=0), predictions)


def test_a_checkpoint_without_a_ledger_cannot_resume_behind_its_epoch(tmp_path):
    x, y = data()
    plain = functional()
    plain.compile(optimizer="adam", loss=LOSS)
    plain.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "plain.weights.h5")
    plain.save_weights(path)  # no ledger: e.g. written before make_private
    model = private_functional()
    model.load_weights(path)
    with pytest.raises(ValueError, match="under-reported"):
        model.fit(x, y, epochs=2, initial_epoch=1, verbose=0)
    assert model.dp_steps == 0


def test_resuming_from_a_keras_file_ends_at_the_uninterrupted_epsilon(tmp_path):
    x, y = data()
    first = private_functional()
    first.fit(x, y, epochs=1, verbose=0)
    first.save(tmp_path / "m.keras")
    resumed = keras.models.load_model(tmp_path / "m.keras")
    resumed.fit(x, y, epochs=2, initial_epoch=1, verbose=0)
    assert resumed.dp_steps == 20
    assert resumed.privacy_spent().epsilon == DPConfig(**RESUME).calibrate(40).epsilon(20)


@pytest.mark.parametrize("bands", [1, 2], ids=["dp-sgd", "bandmf"])
def test_a_killed_process_resumes_from_its_backup_exactly(tmp_path, monkeypatch, bands):
    """SIGKILL mid-epoch, then a new process with BackupAndRestore: the uninterrupted run.

    With BandMF the noise history and the partition travel in the backup: the resumed
    process continues the same correlated noise and the same groups."""
    from . import resume_worker

    monkeypatch.setenv("KERAS_DP_TEST_BANDS", str(bands))
    worker, backup = resume_worker.__file__, str(tmp_path / "backup")
    out = str(tmp_path / "resumed.npz")
    killed = subprocess.run(
        [sys.executable, worker, backup, out, "14"], capture_output=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr[-2000:]  # killed mid-epoch 1 (updates 10-19)
    resumed = subprocess.run(
        [sys.executable, worker, backup, out], capture_output=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = np.load(out)

    straight, drawn = resume_worker.train(str(tmp_path / "straight"))
    assert drawn == list(range(30))
    # The new process resumed at update 10 (the end of the backed-up epoch 0) and drew
    # the updates after it, not the first ones again.
    assert list(result["drawn"]) == list(range(10, 30))
    assert int(result["steps"]) == straight.dp_steps == 30
    assert float(result["epsilon"]) == straight.privacy_spent().epsilon
    for i, variable in enumerate(straight.weights):
        np.testing.assert_allclose(result[f"arr_{i}"], np.asarray(variable.value), atol=1e-6)
