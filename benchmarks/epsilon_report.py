"""What reporting ε after each epoch costs (not a test: run it and read the table).

    python benchmarks/epsilon_report.py [--repeats 3]

The plan: digits (N = 1,797), expected batch 64, 20 epochs, ε = 8 at the default δ,
truncated Poisson sampling, PLD (28 updates an epoch). Two measurements:

1. ε after each epoch, as ``PrivacyBudget`` asks for it (``config.epsilon(steps)``
   at 28, 56, ... 560 updates), with the plan's one-step PLD kept between the
   queries (keras_dp's ``accounting._step_pld``) against built again for each query
   (that memory emptied first: what each query cost before it was kept). Seconds per
   query, the median of the 20 epochs; the two ε sequences must be equal.
2. The whole ``fit`` (an MLP 64-128-10, the same plan) with and without the
   ``PrivacyBudget`` callback, alternated, after a compiling fit of each.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import argparse  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
from calibration import forget  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_dp  # noqa: E402
from keras_dp import accounting  # noqa: E402

logging.getLogger("absl").setLevel(logging.ERROR)

PLAN = dict(batch_size=64, epochs=20, target_epsilon=8.0, l2_clip_norm=1.0)


def forget_answers() -> None:
    """Empties the memories of finished answers (ε per event), not the kept step."""
    accounting.epsilon.cache_clear()
    accounting._kept_epsilon.cache_clear()
    accounting._estimate.cache_clear()


def query_times(config: keras_dp.DPConfig, per_epoch: int, keep_step: bool):
    """Seconds for ε after each epoch, and the ε values."""
    times, values = [], []
    accounting._step_pld.cache_clear()
    for epoch in range(1, config.epochs + 1):
        forget_answers()
        if not keep_step:
            accounting._step_pld.cache_clear()
        start = time.perf_counter()
        values.append(config.epsilon(epoch * per_epoch))
        times.append(time.perf_counter() - start)
    return times, values


def fit_seconds(x, y, with_callback: bool) -> float:
    """One fit's seconds, from a process's empty memories (σ is calibrated again)."""
    forget()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model = keras_dp.make_private(model, keras_dp.DPConfig(**PLAN))
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callbacks = [keras_dp.callbacks.PrivacyBudget()] if with_callback else []
    start = time.perf_counter()
    model.fit(x, y, verbose=0, callbacks=callbacks)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    config = keras_dp.DPConfig(**PLAN).calibrate(len(y))
    per_epoch = config.steps // config.epochs
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"plan: N={len(y)}, {config.steps} updates, σ={config.noise_multiplier:.4f}\n")

    kept, kept_eps = query_times(config, per_epoch, keep_step=True)
    rebuilt, rebuilt_eps = query_times(config, per_epoch, keep_step=False)
    if kept_eps != rebuilt_eps:
        raise AssertionError(f"ε differs: {kept_eps} against {rebuilt_eps}")
    print("| ε after each epoch | s per query (median of 20) | slowest | ε after 20 epochs |")
    print("|---|---|---|---|")
    for name, times in (("step PLD kept", kept), ("step PLD built again", rebuilt)):
        print(
            f"| {name} | {statistics.median(times):.3f} | {max(times):.3f} | {kept_eps[-1]:.4f} |"
        )

    fit_seconds(x, y, True), fit_seconds(x, y, False)  # compiling fits, left out
    with_cb, without = [], []
    for _ in range(args.repeats):
        with_cb.append(fit_seconds(x, y, True))
        without.append(fit_seconds(x, y, False))
    print("\n| 20-epoch fit | s (median) | runs |")
    print("|---|---|---|")
    for name, runs in (("with PrivacyBudget", with_cb), ("without", without)):
        listed = ", ".join(f"{s:.2f}" for s in runs)
        print(f"| {name} | {statistics.median(runs):.2f} | {listed} |")
    extra = (statistics.median(with_cb) - statistics.median(without)) / config.epochs
    print(f"\nPrivacyBudget's cost per epoch in fit: {extra:.3f} s")


if __name__ == "__main__":
    main()
