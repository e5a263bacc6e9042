"""Makes sure Keras runs on JAX before anything else of keras_dp is imported."""

import os
import sys


def require_jax_backend() -> None:
    """Selects JAX when Keras is not imported yet; raises if another backend is active."""
    if "keras" not in sys.modules:
        os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    backend = keras.backend.backend()
    if backend != "jax":
        raise ImportError(
            f"keras_dp needs Keras' JAX backend, but Keras is running on {backend!r}. "
            "Set the environment variable KERAS_BACKEND=jax before Python imports keras "
            "(e.g. `KERAS_BACKEND=jax python train.py`, or os.environ['KERAS_BACKEND'] = "
            "'jax' at the top of the notebook)."
        )
