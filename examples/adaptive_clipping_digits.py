"""Adaptive clipping against a sweep of fixed clip norms, on scikit-learn's digits.

The same MLP and plan as ``digits_dp.py`` (batch 128, 40 epochs, Adam 1e-2, δ = 1e-5)
at one ε: DP-SGD with fixed C ∈ {0.1, 0.3, 1, 3}, and with adaptive clipping
(``DPConfig(clip_quantile=γ)`` for γ ∈ {0.5, 0.2}, C₀ = 1, η = 0.2, σ_b = B/20), which
spends the same ε.
Prints the median test accuracy over seeds and the final adaptive C.

    python examples/adaptive_clipping_digits.py [--epsilon 3] [--seeds 3] [--quantiles 0.5 0.2]

Choosing the best fixed C by looking at test accuracy is itself not covered by ε;
adaptive clipping needs no such choice.
"""

import argparse
import os
import statistics

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_dp  # noqa: E402

BATCH, EPOCHS, LR = 128, 40, 1e-2
FIXED = (0.1, 0.3, 1.0, 3.0)


def train(
    data, epsilon: float, seed: int, clip: float, quantile: float | None
) -> tuple[float, float]:
    """(test accuracy, final C) of one run."""
    x_train, x_test, y_train, y_test = data
    keras.utils.set_random_seed(seed)  # initial weights only; the DP seed stays secret
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(128, activation="tanh"), keras.layers.Dense(10)]
    )
    config = keras_dp.DPConfig(
        target_epsilon=epsilon,
        target_delta=1e-5,
        batch_size=BATCH,
        epochs=EPOCHS,
        l2_clip_norm=clip,
        clip_quantile=quantile,
    )
    model = keras_dp.make_private(model, config)
    model.compile(
        optimizer=keras.optimizers.Adam(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, verbose=0)
    accuracy = model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]
    final = float(model._dp_clip_norm.value) if quantile is not None else clip
    return float(accuracy), final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quantiles", type=float, nargs="+", default=[0.5, 0.2])
    parser.add_argument("--fixed", type=float, nargs="*", default=list(FIXED))
    args = parser.parse_args()
    x, y = load_digits(return_X_y=True)
    data = train_test_split(
        (x / 16.0).astype("float32"), y, test_size=0.2, random_state=0, stratify=y
    )
    print(f"digits, ε = {args.epsilon:g} (δ = 1e-5), median of {args.seeds} seeds")
    print("| clipping | test accuracy | runs | final C |\n|---|---|---|---|")
    settings = [(f"fixed C = {c:g}", c, None) for c in args.fixed] + [
        (f"adaptive (quantile {q:g}, C₀ = 1)", 1.0, q) for q in args.quantiles
    ]
    for name, clip, quantile in settings:
        runs = [train(data, args.epsilon, s, clip, quantile) for s in range(args.seeds)]
        accuracies = [a for a, _ in runs]
        finals = ", ".join(f"{c:.3g}" for _, c in runs)
        print(
            f"| {name} | {statistics.median(accuracies):.3f} | "
            f"{', '.join(f'{a:.3f}' for a in accuracies)} | {finals} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
