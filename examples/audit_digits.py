"""The audit beside the accountant: empirical ε lower bounds on scikit-learn's digits.

Trains the digits MLP with 200 random-label canaries (half included by a seeded
coin) three ways: without DP, with DP at ε = 1, and with a deliberately broken DP
step (noise switched off while ε = 1 is still reported). Prints the accounted ε
next to the measured lower bounds and saves the attack's ROC/score plots.

    python examples/audit_digits.py [--out docs/audit_digits.png]
"""

import argparse
import logging
import os
import warnings

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keras-hub imports TensorFlow

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_dp  # noqa: E402
from keras_dp import DPConfig, audit  # noqa: E402

EPSILON = 1.0


def build() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(256, activation="tanh"), keras.layers.Dense(10)]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="audit_digits.png")
    parser.add_argument("--canaries", type=int, default=200)
    args = parser.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    x, y = load_digits(return_X_y=True)
    data = (x[:1000] / 16.0).astype("float32"), y[:1000]
    config = DPConfig(target_epsilon=EPSILON, batch_size=64, epochs=80)
    reports = {
        "non-private": audit.run(build, data, config, args.canaries, private=False),
        f"DP, ε={EPSILON:g}": audit.run(build, data, config, args.canaries),
    }
    privatize = keras_dp.noise.privatize  # the bug: noise off, ε still reported
    keras_dp.noise.privatize = lambda g, key, sigma, c, b: privatize(g, key, 0.0, c, b)
    try:
        reports["broken DP (no noise)"] = audit.run(build, data, config, args.canaries)
    finally:
        keras_dp.noise.privatize = privatize

    print(f"{'run':<22} {'accounted ε':>11} {'lower bound':>11} {'AUROC':>6}  verdict")
    for name, r in reports.items():
        verdict = "consistent" if r.consistent else "BUG: lower bound > accounted ε"
        print(
            f"{name:<22} {r.accounted_epsilon:>11.3g} {r.epsilon_lower_bound:>11.3g} "
            f"{r.auroc:>6.3f}  {verdict}"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(4 * len(reports), 3.6))
    for ax, (name, r) in zip(axes, reports.items()):
        fpr, tpr = audit.roc_curve(r.in_scores, r.out_scores)
        ax.plot(fpr, tpr, label=f"attack (AUROC {r.auroc:.2f})")
        ax.plot([0, 1], [0, 1], "k:", label="chance")
        if np.isfinite(r.accounted_epsilon):
            grid = np.linspace(0, 1, 101)
            limit = audit.dp_roc_limit(grid, r.accounted_epsilon, r.delta)
            ax.plot(grid, limit, "r--", label=f"limit at accounted ε={r.accounted_epsilon:.2g}")
        ax.set(
            title=f"{name}\nlower bound ε ≥ {r.epsilon_lower_bound:.2f} (95%)",
            xlabel="false-positive rate",
            ylabel="true-positive rate",
        )
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
