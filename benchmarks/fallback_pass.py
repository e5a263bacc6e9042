"""Per-example gradients of a layer without a ghost rule: one pass or chunks, on a CPU.

    python benchmarks/fallback_pass.py [--widths 128 256 512] [--repeats 2]

An MLP 64-w-w-10 (batch 64, random data) whose middle layer is a subclassed layer
with its own ``call`` (no ghost rule: its w×w kernel gets per-example gradients beside
the other layers' ghost norms). Its forward pass is under 1 MFLOP an example, so a CPU
step runs the whole physical batch (88 rows) in one pass unless those per-example
gradients exceed ``ghost_cost._ONE_PASS_FALLBACK_BYTES``. Fits alternated through
Keras' ``fit``: plain Keras, keras_dp's ``auto`` (the default), ``auto`` with
``microbatch_size=16`` (chunks of 16) and ``per_example``. A step's time is each
epoch's wall time over its updates, after the first epoch, the median over epochs and
repeats. Prints a Markdown table. Not a test: nothing here asserts a time.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from clipping import timed_fit  # noqa: E402

import keras_dp  # noqa: E402

BATCH, N, EPOCHS = 64, 2048, 4
KINDS = {  # name: (clipping, microbatch_size)
    "plain": (None, None),
    "auto": ("auto", None),
    "auto, chunks of 16": ("auto", 16),
    "per_example": ("per_example", None),
}
logging.getLogger("keras_dp").setLevel(logging.ERROR)


class OwnDense(keras.layers.Layer):
    """A dense layer with its own ``call``: no ghost rule."""

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, shape):
        self.kernel = self.add_weight((shape[-1], self.units))
        self.bias = self.add_weight((self.units,), initializer="zeros")

    def call(self, x):
        return keras.ops.relu(keras.ops.matmul(x, self.kernel) + self.bias)


def mlp(width: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(width, activation="relu"),
            OwnDense(width),
            keras.layers.Dense(10),
        ]
    )


def one_fit(kind: str, width: int, x, y) -> list:
    clipping, microbatch = KINDS[kind]
    model = mlp(width)
    if clipping is not None:
        config = keras_dp.DPConfig(
            target_epsilon=8.0,
            target_delta=1e-5,
            batch_size=BATCH,
            epochs=EPOCHS,
            clipping=clipping,
            microbatch_size=microbatch,
            seed=1,
        )
        model = keras_dp.make_private(model, config)
    model.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return timed_fit(model, x, y, BATCH, EPOCHS).per_step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", nargs="*", type=int, default=[128, 256, 512])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, {jax.default_backend()}; "
        f"jax {jax.__version__}, keras {keras.__version__}\n"
    )
    print(f"| w (per-example MB at 88 rows) | {' | '.join(KINDS)} ms | auto / plain |")
    print("|---|" + "---|" * (len(KINDS) + 1))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 64)).astype("float32")
    y = rng.integers(0, 10, N)
    for width in args.widths:
        times = {kind: [] for kind in KINDS}
        for _ in range(args.repeats):
            for kind in KINDS:
                times[kind] += one_fit(kind, width, x, y)
        ms = {kind: 1e3 * statistics.median(t) for kind, t in times.items()}
        megabytes = 4 * 88 * (width * width + width) / 1e6
        cells = " | ".join(f"{ms[kind]:.2f}" for kind in KINDS)
        print(f"| {width} ({megabytes:.1f}) | {cells} | {ms['auto'] / ms['plain']:.2f}× |")


if __name__ == "__main__":
    main()
