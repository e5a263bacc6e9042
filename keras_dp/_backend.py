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


def import_quietly(name: str):
    """``importlib.import_module(name)`` with the process's stderr silenced meanwhile.

    For keras-hub, which imports TensorFlow: TensorFlow writes start-up lines (oneDNN,
    CUDA drivers, absl) straight to file descriptor 2, past ``TF_CPP_MIN_LOG_LEVEL``.
    An import error is still raised (and shown) once stderr is back.
    """
    import importlib

    if name in sys.modules:
        return sys.modules[name]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr (some notebook kernels): nothing to silence
        return importlib.import_module(name)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        return importlib.import_module(name)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def on_cpu() -> bool:
    """Whether JAX's default backend is a CPU. keras_dp shapes some programs for it
    (chunk sizes, the convolutions' layout, the noise stored once, which clipping
    ``"auto"`` picks) and others for accelerators. The values are the same either way
    (``tests/test_reference_step.py`` builds both on a CPU through this one question)."""
    import jax

    return jax.default_backend() == "cpu"


# XLA's CPU compiler asks LLVM for 256-bit vectors by default, also on CPUs with 512-bit
# ones (AVX-512). keras_dp's own compiled step asks for 512: on an AVX-512 Xeon its
# noise draw's Threefry hash (32-bit integers, one per parameter) ran about 40% faster,
# the whole draw 13-15%, and a step through fit up to 10% faster where the noise is a
# large part of it (benchmarks/vector_width.py; docs/fast-clipping-measurements.md).
# A CPU without 512-bit vectors has none to use (not measured here). Only keras_dp's
# step takes it: the user's other programs (plain Keras steps, evaluate, predict) keep
# XLA's defaults.
CPU_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}


def compiler_options() -> dict | None:
    """XLA options for keras_dp's compiled train step: :data:`CPU_COMPILER_OPTIONS` on
    a CPU, None (XLA's defaults) elsewhere. The noise is the same bit for bit (tested);
    sums may round differently in their last bits, as any change of vectorisation
    may make them."""
    return dict(CPU_COMPILER_OPTIONS) if on_cpu() else None
