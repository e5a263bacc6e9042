"""DP step time / plain Keras step time on the same model, in one run.

    python benchmarks/step_time.py [--models mlp gemma-lora gemma-full] [--repeats 3]

The model definitions used by the full suite (benchmarks/run.py). This older script
times batch end to batch end, which makes Keras wait for every step.

Alternates plain and DP fits (plain, DP, plain, DP, ...), excludes the first
(compiling) epoch and each epoch's first step, and reports the median step time
(batch end to batch end) of each and their ratio.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keras-hub imports TensorFlow

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_dp  # noqa: E402
from keras_dp import offline  # noqa: E402


class _StepTimer(keras.callbacks.Callback):
    """Times between consecutive batch ends within an epoch: data fetch + step.

    The first interval of each epoch (and the whole compiling first epoch) is left
    out, so per-epoch set-up (keras-hub's tf.data pipeline, validation, ε
    reporting) is counted for neither side. The batch hook makes Keras wait for
    each step, for plain and DP alike.
    """

    def __init__(self):
        super().__init__()
        self.intervals = []

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._last = epoch, None

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self._epoch > 0 and self._last is not None:
            self.intervals.append(now - self._last)
        self._last = now


def mlp(features: int = 64, outputs: int = 10):
    """The suite's MLP, features-256-256-outputs (64-256-256-10: digits)."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(outputs),
        ]
    )


def gemma(lora: bool):
    """The issue's reference model: Gemma3, 4 layers, hidden 256 (random weights)."""
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = offline.gemma3_backbone(
        vocabulary_size=1024, num_layers=4, hidden_dim=256, sequence_length=128
    )
    lm = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    if lora:
        backbone.enable_lora(4)
    return lm


def digits_data():
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype("float32"), y


def token_data(n=160, length=128):
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(1, 1024, (n, length)).astype("int32"),
        "padding_mask": np.ones((n, length), bool),
    }
    return x, rng.integers(1, 1024, (n, length)).astype("int32")


def functional(task):
    """The same layers as a plain functional ``keras.Model``.

    keras-hub's ``Task.fit`` sends arrays through tf.data (or grain), whose per-epoch
    start-up is noisy and which a GPU image may lack; as a plain model every side
    (plain, keras_dp, jax-privacy) runs Keras' own ``fit`` on the same arrays.
    """
    return keras.Model(task.inputs, task.outputs)


MODELS = {  # name: (model_fn, data_fn, batch, epochs)
    "mlp": (mlp, digits_data, 64, 6),
    "gemma-lora": (lambda: functional(gemma(True)), token_data, 16, 5),
    "gemma-full": (lambda: functional(gemma(False)), token_data, 16, 5),
}
# The keras-hub task itself (with its default per-token accuracy), for the memory section.
TASKS = {"mlp": mlp, "gemma-lora": lambda: gemma(True), "gemma-full": lambda: gemma(False)}


def per_step(dp: bool, name: str, x, y) -> float:
    model_fn, _, batch, epochs = MODELS[name]
    model = model_fn()
    if dp:
        config = keras_dp.DPConfig(target_epsilon=8.0, batch_size=batch, epochs=epochs, seed=0)
        model = keras_dp.make_private(model, config)
    model.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    timer = _StepTimer()
    kwargs = {} if dp else {"batch_size": batch, "epochs": epochs}
    model.fit(x, y, verbose=0, callbacks=[timer], **kwargs)
    return statistics.median(timer.intervals)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, CPU")
    for name in args.models:
        x, y = MODELS[name][1]()
        plain, dp = [], []
        for _ in range(args.repeats):  # alternated: plain, DP, plain, DP, ...
            plain.append(per_step(False, name, x, y))
            dp.append(per_step(True, name, x, y))
        p, d = statistics.median(plain), statistics.median(dp)
        print(
            f"{name}, batch {MODELS[name][2]}: plain {p * 1e3:.2f} ms/step, "
            f"DP {d * 1e3:.2f} ms/step, DP/plain = {d / p:.2f}x "
            f"(runs: {', '.join(f'{b / a:.2f}' for a, b in zip(plain, dp))})",
            flush=True,
        )


if __name__ == "__main__":
    main()
