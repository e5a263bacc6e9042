"""The first epoch with a ``PrivacyBudget`` callback, as the README's quickstart fits.

    python benchmarks/first_epoch_budget.py [--model mlp] [--repeats 8] [--stop-at EPSILON]
                                            [--all-orders]

With a ``PrivacyBudget``, ``fit`` computes ε after the first epoch, and the budget's
last update (a search over update counts where ``--stop-at`` is below the plan's
target ε), in σ's search thread, beside XLA's compile of the step
(``fitting._budgets_ahead``); the callback then finds them kept. In one process, fits
of a fresh model alternate (ABBA) between keras_dp as shipped, keras_dp with that
warm-up left out (each computed when the callback asks, as before), and plain Keras
without a budget. Each DP fit searches σ afresh, as a new user's first does.
With ``--all-orders`` a fourth kind, keras_dp with the RDP estimate that sizes σ's
PLD grid at all of dp_accounting's default orders (as before 2026-12-06: its
fractional orders are most of an estimate's time), instead of the shipped whole orders
(``accounting._ESTIMATE_ORDERS``). Printed: each kind's first epochs from the ``fit``
call (seconds), their medians and the ratios to plain Keras'. The first round is a
warm-up and is not counted. Not a test: nothing here asserts a time.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import clipping  # noqa: E402
import keras  # noqa: E402
from run import log  # noqa: E402

import keras_dp  # noqa: E402
from keras_dp import accounting, fitting  # noqa: E402
from keras_dp.events import _untruncated  # noqa: E402

KINDS = ("shipped", "when asked", "plain")


class FirstEpochEnd(keras.callbacks.Callback):
    """When the first epoch ended (after the callbacks before it in the list)."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.at = time.perf_counter()


def first_epoch(kind: str, name: str, x, y, stop_at: float | None = None) -> float:
    """Seconds from the ``fit`` call to the end of the first epoch."""
    _, _, batch, _ = clipping.MODELS[name]
    dp = kind != "plain"
    model = clipping.build("auto" if dp else "plain", name, len(y), clipping.SEED)
    clipping.forget_calibrations()
    shipped, estimate = fitting._budgets_ahead, accounting.rdp_estimate
    if kind == "when asked":
        fitting._budgets_ahead = lambda *args: None
    if kind == "all orders":
        accounting.rdp_estimate = all_orders_estimate
    end = FirstEpochEnd()
    callbacks = [keras_dp.callbacks.PrivacyBudget(stop_at_epsilon=stop_at), end] if dp else [end]
    kwargs = {"epochs": 1} if dp else {"batch_size": batch, "epochs": 1}
    try:
        start = time.perf_counter()
        model.fit(x, y, verbose=0, callbacks=callbacks, **kwargs)
    finally:
        fitting._budgets_ahead, accounting.rdp_estimate = shipped, estimate
    return end.at - start


def all_orders_estimate(event, delta, relation) -> float:
    """``accounting.rdp_estimate`` at dp_accounting's default RDP orders (before
    2026-12-06)."""
    try:
        return accounting._epsilon_at(_untruncated(event), delta, "rdp", relation)
    except Exception:
        return float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=["mlp", "tabular", "cnn", "text"])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--stop-at", type=float, default=None, help="the budget's ε")
    parser.add_argument("--all-orders", action="store_true", help="also the RDP estimate as before")
    args = parser.parse_args()
    kinds = (*KINDS, "all orders") if args.all_orders else KINDS
    _, data_fn, batch, _ = clipping.MODELS[args.model]
    x, y = data_fn()
    n = len(y) - len(y) % batch
    x, y = x[:n], y[:n]
    runs = {kind: [] for kind in kinds}
    for repeat in range(args.repeats + 1):
        for kind in kinds if repeat % 2 == 0 else kinds[::-1]:
            seconds = first_epoch(kind, args.model, x, y, args.stop_at)
            if repeat:  # the first round warms the process
                runs[kind].append(seconds)
    plain = statistics.median(runs["plain"])
    for kind, seconds in runs.items():
        median = statistics.median(seconds)
        log(
            f"{args.model} {kind}: median {median:.3f} s ({median / plain:.2f}x plain), "
            + " ".join(f"{s:.2f}" for s in seconds)
        )


if __name__ == "__main__":
    main()
