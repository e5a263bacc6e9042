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


def track_after_build(layer, name: str, value) -> None:
    """``setattr(layer, name, value)`` with Keras' tracking, also once ``layer`` is built.

    Keras locks a built layer's state (``Layer._tracker``, a private attribute; tested
    with keras 3.15); adding DP state (epoch counters, the adaptive clip norm) to a
    model that ``make_private`` received built needs the lock lifted for the one
    assignment, as Keras' own ``_untrack_variable`` does.
    """
    tracker = getattr(layer, "_tracker", None)
    locked = tracker is not None and tracker.locked
    if locked:
        tracker.unlock()
    try:
        setattr(layer, name, value)
    finally:
        if locked:
            tracker.lock()
