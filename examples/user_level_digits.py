"""User-level DP on digits split into users: user sampling (ULS) against example sampling (ELS).

scikit-learn's digits are dealt to 400 users with skewed contribution counts (a
Zipf-like law: a few users own dozens of examples, most own one to three). Both methods
protect a whole user at the same user-level ε and run the same compute: the same
number of updates and the same expected number of examples per update (ULS samples
``--users`` users per update, each contributing up to k examples; ELS samples that many
examples in expectation from each user's k kept examples). For each method and ε, the
contribution bound k is chosen by a small sweep on a validation split (seed 0), then
each is trained with several seeds and scored on the test split.

    python examples/user_level_digits.py [--epsilons 1 3 8] [--seeds 3] [--ks 1 2 4 8 16]
        [--steps 600] [--users 32] [--out benchmarks/results/user_level_digits]
"""

import argparse
import logging
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _report  # noqa: E402  (examples/_report.py)
import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_dp  # noqa: E402

USERS, LR = 400, 1e-2


def split():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0)
    rng = np.random.default_rng(0)
    weights = 1 / np.arange(1, USERS + 1) ** 1.1
    ids = rng.choice(USERS, size=len(y_train), p=weights / weights.sum())
    val_users = rng.random(USERS) < 0.2  # validation: whole users held out
    val = val_users[ids]
    fit = (x_train[~val], y_train[~val], ids[~val])
    return (x_train, y_train, ids, x_test, y_test), (*fit, x_train[val], y_train[val])


def train(data, epsilon, method, k, seed, steps, users) -> float:
    """Accuracy on the evaluation split of one user-level run."""
    x, y, ids, x_eval, y_eval = data
    counts = np.bincount(np.unique(ids, return_inverse=True)[1])
    per_user = float(np.mean(np.minimum(counts, k)))  # examples a sampled user brings
    batch = users if method == "uls" else max(1, round(users * per_user))
    keras.utils.set_random_seed(seed)  # initial weights only; the DP seed stays secret
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(64, activation="tanh"), keras.layers.Dense(10)]
    )
    config = keras_dp.DPConfig(
        target_epsilon=epsilon,
        target_delta=1e-5,
        batch_size=batch,
        steps=steps,
        l2_clip_norm=1.0,
        privacy_unit="user",
        user_sampling=method,
        examples_per_user=k,
    )
    model = keras_dp.make_private(model, config)
    model.compile(
        optimizer=keras.optimizers.Adam(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x, y, user_ids=ids, verbose=0)
    return float(model.evaluate(x_eval, y_eval, verbose=0, return_dict=True)["accuracy"])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--users", type=int, default=32, help="ULS users per update")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    test_data, val_data = split()
    counts = np.bincount(test_data[2], minlength=USERS)
    for k in args.ks:
        kept = int(np.minimum(counts, k).sum())
        print(f"k={k}: a user contributes at most {k}; ELS keeps {kept} examples")
    print(
        f"digits: {len(test_data[1])} training examples of {np.count_nonzero(counts)} users "
        f"(median {int(np.median(counts[counts > 0]))}, max {counts.max()} examples each); "
        f"{args.steps} updates"
    )
    rows = []
    for epsilon in args.epsilons:
        start = time.time()
        row = {"epsilon": epsilon, "steps": args.steps}
        for method in ("uls", "els"):
            sweep = {
                k: train(val_data, epsilon, method, k, 0, args.steps, args.users) for k in args.ks
            }
            best = max(sweep, key=sweep.get)
            scores = [
                train(test_data, epsilon, method, best, s, args.steps, args.users)
                for s in range(args.seeds)
            ]
            row[method] = {"k": best, "sweep": sweep, "accuracy": scores}
        row["seconds"] = round(time.time() - start, 1)
        rows.append(row)
        print(
            f"ε={epsilon:g}: ULS (k={row['uls']['k']}) "
            f"{statistics.median(row['uls']['accuracy']):.3f} · ELS (k={row['els']['k']}) "
            f"{statistics.median(row['els']['accuracy']):.3f} (median of {args.seeds})",
            flush=True,
        )
    if args.out:
        write(rows, args)
    return rows


def write(rows: list[dict], args) -> None:
    lines = [
        f"| {r['epsilon']:g} | {r['steps']} | {r['uls']['k']} | "
        f"{_report.spread(r['uls']['accuracy'])} | {r['els']['k']} | "
        f"{_report.spread(r['els']['accuracy'])} |"
        for r in rows
    ]
    header = "| user-level ε | updates | ULS: k | ULS test acc. | ELS: k | ELS test acc. |"
    _report.save(args.out, rows, header, lines)
    labels = (("uls", "ULS (sample users)"), ("els", "ELS (sample examples)"))
    series = {label: [r[m]["accuracy"] for r in rows] for m, label in labels}
    title = f"digits in {USERS} skewed users, {rows[0]['steps']} updates"
    _report.plot(
        args.out, [r["epsilon"] for r in rows], series, "test accuracy (median, min–max)", title
    )


if __name__ == "__main__":
    logging.getLogger("keras_dp.model").setLevel(logging.ERROR)  # ELS drops: printed above
    main()
