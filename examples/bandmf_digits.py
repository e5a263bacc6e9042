"""DP-SGD against correlated noise (Amplified BandMF) on scikit-learn's digits.

The same MLP, data, batch, number of updates and optimizer for both; only
``DPConfig(noise="bandmf", bands=b)`` changes. For each ε, b is chosen by a small
sweep on a validation split (held out of the training data; choosing it on private
data is outside ε, as any hyperparameter search is), then DP-SGD and the chosen BandMF
are trained with several seeds and scored on the test split.

    python examples/bandmf_digits.py [--epsilons 1 3 8] [--seeds 3] [--bands 2 4 8 16]
        [--epochs 20] [--batch 32] [--out benchmarks/results/bandmf_digits]

Also prints, for the chosen b, the noise the weights carry (σ × the RMSE of the noise
on the prefix sums, which SGD's weights accumulate) relative to DP-SGD's at the same ε:
the quantity BandMF's strategy minimises. Writes a markdown table (and a plot when
matplotlib is installed) next to ``--out``.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _report  # noqa: E402  (examples/_report.py)
import keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_dp  # noqa: E402
from keras_dp import bandmf  # noqa: E402

LR, MOMENTUM, CLIP = 0.5, 0.0, 1.0


def split():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0)
    x_fit, x_val, y_fit, y_val = train_test_split(x_train, y_train, test_size=0.2, random_state=1)
    return (x_train, y_train, x_test, y_test), (x_fit, y_fit, x_val, y_val)


def train(data, epsilon: float, bands: int, seed: int, epochs: float, batch: int) -> float:
    """Accuracy on the evaluation split of one run (bands=1: DP-SGD)."""
    x_train, y_train, x_eval, y_eval = data
    keras.utils.set_random_seed(seed)  # initial weights only; the DP seed stays secret
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(64, activation="tanh"), keras.layers.Dense(10)]
    )
    config = keras_dp.DPConfig(
        target_epsilon=epsilon,
        target_delta=1e-5,
        batch_size=batch,
        epochs=epochs,
        l2_clip_norm=CLIP,
        noise="bandmf" if bands > 1 else "independent",
        bands=bands,
    )
    model = keras_dp.make_private(model, config)
    model.compile(
        optimizer=keras.optimizers.SGD(LR, momentum=MOMENTUM),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, verbose=0)
    return float(model.evaluate(x_eval, y_eval, verbose=0, return_dict=True)["accuracy"])


def weight_noise(epsilon: float, bands: int, n: int, epochs: float, batch: int) -> float:
    """σ × the RMSE of the noise on the prefix sums (what SGD's weights carry), in C/B."""
    config = keras_dp.DPConfig(
        target_epsilon=epsilon,
        target_delta=1e-5,
        batch_size=batch,
        epochs=epochs,
        dataset_size=n,
        noise="bandmf",
        bands=bands,
    ).calibrate()
    coefs = bandmf.strategy(config.steps, bands)
    return config.noise_multiplier * bandmf.prefix_rmse(coefs, config.steps)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--bands", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--epochs", type=float, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    test_data, val_data = split()
    steps = round(args.epochs * len(test_data[0]) / args.batch)
    print(f"digits: {len(test_data[0])} training examples, batch {args.batch}, {steps} updates")
    rows = []
    for epsilon in args.epsilons:
        start = time.time()
        sweep = {b: train(val_data, epsilon, b, 0, args.epochs, args.batch) for b in args.bands}
        best = max(sweep, key=sweep.get)
        sgd = [train(test_data, epsilon, 1, s, args.epochs, args.batch) for s in range(args.seeds)]
        mf = [
            train(test_data, epsilon, best, s, args.epochs, args.batch) for s in range(args.seeds)
        ]
        n = len(test_data[0])
        ratio = weight_noise(epsilon, best, n, args.epochs, args.batch) / weight_noise(
            epsilon, 1, n, args.epochs, args.batch
        )
        row = {
            "epsilon": epsilon,
            "weight_noise_ratio": ratio,
            "steps": steps,
            "bands": best,
            "sweep": sweep,
            "dpsgd": sgd,
            "bandmf": mf,
            "seconds": round(time.time() - start, 1),
        }
        rows.append(row)
        print(
            f"ε={epsilon:g}: DP-SGD {statistics.median(sgd):.3f} · BandMF (b={best}) "
            f"{statistics.median(mf):.3f} (median of {args.seeds}); noise on the weights "
            f"{ratio:.2f}× DP-SGD's; validation sweep "
            + ", ".join(f"b={b}: {a:.3f}" for b, a in sweep.items())
        )
    if args.out:
        write(rows, args)
    return rows


def write(rows: list[dict], args) -> None:
    lines = [
        f"| {r['epsilon']:g} | {r['steps']} | {r['bands']} | {r['weight_noise_ratio']:.2f} | "
        f"{_report.spread(r['dpsgd'])} | {_report.spread(r['bandmf'])} |"
        for r in rows
    ]
    header = (
        "| ε | updates | bands (validation sweep) | noise on the weights, BandMF / DP-SGD "
        "| DP-SGD test acc. | BandMF test acc. |"
    )
    _report.save(args.out, rows, header, lines)
    series = {
        label: [r[key] for r in rows]
        for key, label in (("dpsgd", "DP-SGD"), ("bandmf", "BandMF (best b)"))
    }
    title = f"digits, {rows[0]['steps']} updates"
    _report.plot(
        args.out, [r["epsilon"] for r in rows], series, "test accuracy (median, min–max)", title
    )


if __name__ == "__main__":
    main()
