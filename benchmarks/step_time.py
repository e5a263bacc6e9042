"""DP step time / plain Keras step time on the same small model, in one run.

    python benchmarks/step_time.py

Alternates plain and DP fits (plain, DP, plain, DP, ...), excludes the first
(compiling) epoch, and reports the median per-step time of each and their ratio.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_dp  # noqa: E402


class _StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epoch_times, self.steps = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        # Only the training steps: validation and ε reporting happen after this callback.
        self.epoch_times.append(time.perf_counter() - self._start)
        self.steps.append(self._steps)


def model_fn():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(10),
    ])


def per_step(dp: bool, x, y, batch: int, epochs: int) -> float:
    model = model_fn()
    if dp:
        config = keras_dp.DPConfig(target_epsilon=8.0, batch_size=batch, epochs=epochs, seed=0)
        model = keras_dp.make_private(model, config)
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    timer = _StepTimer()
    kwargs = {} if dp else {"batch_size": batch, "epochs": epochs}
    model.fit(x, y, verbose=0, callbacks=[timer], **kwargs)
    times = [t / s for t, s in zip(timer.epoch_times[1:], timer.steps[1:])]
    return statistics.median(times)


def main(repeats: int = 3, batch: int = 64, epochs: int = 6) -> None:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    plain, dp = [], []
    for _ in range(repeats):
        plain.append(per_step(False, x, y, batch, epochs))
        dp.append(per_step(True, x, y, batch, epochs))
    p, d = statistics.median(plain), statistics.median(dp)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, CPU")
    print(f"MLP 64-256-256-10 on digits, batch {batch}: plain {p * 1e3:.2f} ms/step, "
          f"DP {d * 1e3:.2f} ms/step, DP/plain = {d / p:.2f}x")


if __name__ == "__main__":
    main()
