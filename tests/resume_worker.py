"""A DP fit with BackupAndRestore that can kill its own process mid-epoch.

Usage: python resume_worker.py BACKUP_DIR OUT.npz [KILL_AT_UPDATE]
With KILL_AT_UPDATE the process sends itself SIGKILL before that update; run again
without it to resume from the backup. OUT.npz gets the weights, the ledger, ε and
the sampler's step numbers drawn by this process.
"""

import os
import signal
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_dp  # noqa: E402

CONFIG = dict(target_epsilon=4.0, batch_size=4, epochs=3, seed=3)


def config() -> dict:
    """CONFIG, with correlated noise when KERAS_DP_TEST_BANDS is set (> 1)."""
    bands = int(os.environ.get("KERAS_DP_TEST_BANDS", "1"))
    return {**CONFIG, "noise": "bandmf", "bands": bands} if bands > 1 else dict(CONFIG)


class KillAt(keras.callbacks.Callback):
    def __init__(self, update):
        super().__init__()
        self.update = update

    def on_train_batch_begin(self, batch, logs=None):
        if self.model.dp_steps == self.update:
            os.kill(os.getpid(), signal.SIGKILL)


def train(backup_dir, kill_at=None):
    """Returns (model, sampler steps drawn)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dropout(0.2)(keras.layers.Dense(8, "tanh")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    model = keras_dp.make_private(model, keras_dp.DPConfig(**config()))
    model.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)).astype("float32"), np.arange(40) % 3
    drawn = []
    draw = keras_dp.data.draw_indices
    keras_dp.data.draw_indices = lambda c, s, step, *a: drawn.append(step) or draw(c, s, step, *a)
    callbacks = [keras.callbacks.BackupAndRestore(backup_dir)]
    if kill_at is not None:
        callbacks.append(KillAt(kill_at))
    try:
        model.fit(x, y, epochs=CONFIG["epochs"], verbose=0, callbacks=callbacks)
    finally:
        keras_dp.data.draw_indices = draw
    return model, drawn


if __name__ == "__main__":
    kill = int(sys.argv[3]) if len(sys.argv) > 3 else None
    model, drawn = train(sys.argv[1], kill)
    arrays = {f"arr_{i}": np.asarray(v.value) for i, v in enumerate(model.weights)}
    np.savez(
        sys.argv[2],
        steps=model.dp_steps,
        epsilon=model.privacy_spent().epsilon,
        drawn=np.asarray(drawn),
        **arrays,
    )
