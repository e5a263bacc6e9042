"""Privacy–utility on a real dataset that works offline: scikit-learn's digits.

Trains the same small MLP non-privately and with DP-SGD at ε ∈ {1, 3, 8}
(δ = 1e-5, Poisson sampling, PLD accounting), prints a table of test accuracy and
saves a privacy–utility plot.

    python examples/digits_dp.py [--out digits_privacy_utility.png] [--seeds 1]

Hyperparameters (batch 128, 40 epochs, Adam 1e-2, C = 1) were picked once by hand
on this split; that choice is not covered by the ε (see the privacy statement).
"""

import argparse
import os
import statistics

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keras-hub imports TensorFlow

import keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_dp  # noqa: E402

BATCH, EPOCHS, LR, CLIP = 128, 40, 1e-2, 1.0
EPSILONS = (1.0, 3.0, 8.0)


def model_fn(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="tanh"),
            keras.layers.Dense(10),
        ]
    )


def train(epsilon: float | None, data, seed: int) -> float:
    """Test accuracy of one run; ``epsilon=None`` trains without DP."""
    x_train, x_test, y_train, y_test = data
    model = model_fn(seed)
    if epsilon is not None:
        config = keras_dp.DPConfig(
            target_epsilon=epsilon,
            target_delta=1e-5,
            batch_size=BATCH,
            epochs=EPOCHS,
            l2_clip_norm=CLIP,
        )
        model = keras_dp.make_private(model, config)
    model.compile(
        optimizer=keras.optimizers.Adam(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    kwargs = {} if epsilon is not None else {"batch_size": BATCH, "epochs": EPOCHS}
    model.fit(x_train, y_train, verbose=0, **kwargs)
    return float(model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="digits_privacy_utility.png")
    parser.add_argument("--seeds", type=int, default=1, help="runs per setting (median)")
    args = parser.parse_args()

    x, y = load_digits(return_X_y=True)
    data = train_test_split(
        (x / 16.0).astype("float32"), y, test_size=0.2, random_state=0, stratify=y
    )
    results = {}
    for epsilon in (None, *EPSILONS):
        runs = [train(epsilon, data, seed) for seed in range(args.seeds)]
        results[epsilon] = statistics.median(runs)

    print(
        f"digits: {len(data[0])} train / {len(data[1])} test, MLP 64-128-10, "
        f"batch {BATCH}, {EPOCHS} epochs, δ = 1e-5"
    )
    print("| ε | test accuracy |\n|---|---|")
    for epsilon, acc in results.items():
        print(f"| {'∞ (non-private)' if epsilon is None else f'{epsilon:g}'} | {acc:.3f} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(EPSILONS, [results[e] for e in EPSILONS], "o-", label="DP-SGD (keras_dp)")
    ax.axhline(results[None], color="gray", linestyle="--", label="non-private")
    ax.set(
        xscale="log", xlabel="ε (δ = 1e-5)", ylabel="test accuracy", title="digits: privacy–utility"
    )
    ax.set_xticks(EPSILONS, [f"{e:g}" for e in EPSILONS])
    ax.minorticks_off()
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
