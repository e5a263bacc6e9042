"""The README's main job: DP training of a small Keras model on scikit-learn's digits.

Runs offline. Trains a small MLP with DP-SGD (Poisson sampling, PLD accounting) to a
target ε, printing loss, accuracy and ε per epoch, then the privacy statement.
(The Gemma LoRA default replaces this example in a later release.)

    python examples/quickstart.py [--epsilon 8]
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_dp  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ])
    # The two-line change: a DP plan, and make_private.
    config = keras_dp.DPConfig(
        target_epsilon=args.epsilon, batch_size=64, epochs=args.epochs, l2_clip_norm=1.0
    )
    model = keras_dp.make_private(model, config)
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        x_train, y_train, validation_data=(x_test, y_test), verbose=2,
        callbacks=[keras_dp.callbacks.PrivacyBudget()],
    )
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    spent = model.privacy_spent()
    print(f"\ntest loss {loss:.4f}, test accuracy {accuracy:.4f}")
    print(f"ε spent = {spent.epsilon:.3f} at δ = {spent.delta:.2g} after {spent.steps} updates")
    print(keras_dp.privacy_statement(model))
    assert np.isfinite(loss)


if __name__ == "__main__":
    main()
