"""Makes sure Keras runs on JAX before anything else of keras_dp is imported."""

import functools
import os
import re
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
# large part of it (benchmarks/compiler_options.py; docs/fast-clipping-measurements.md).
# A CPU without 512-bit vectors has none to use (not measured here). Only keras_dp's
# step takes these options: the user's other programs (plain Keras steps, evaluate,
# predict) keep XLA's defaults.
CPU_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}

# jaxlib 0.10's XLA sends a CPU program's matrix products and its reductions to YNNPACK.
# keras_dp's step keeps YNNPACK for the reductions only; its products run in XLA's own
# (Eigen) kernels. On a 2-core Xeon the MLP's DP step through fit took 1.22 against
# 1.36 ms (six alternated fits each), five other models' 0.91-1.00x their time
# (benchmarks/compiler_options.py). jaxlib 0.8.0 has no such option (an unknown option
# fails the compile), and 0.8.3-0.9 were not measured: they keep XLA's default.
LIBRARY_FUSIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
LIBRARY_FUSIONS_SINCE = (0, 10)


def cpu_compiler_options(jaxlib_version: tuple[int, ...]) -> dict:
    """The options keras_dp's train step is compiled with on a CPU, for this jaxlib."""
    options = dict(CPU_COMPILER_OPTIONS)
    if tuple(jaxlib_version[:2]) >= LIBRARY_FUSIONS_SINCE:
        options.update(LIBRARY_FUSIONS)
    return options


@functools.cache
def jaxlib_version() -> tuple[int, ...]:
    """The installed jaxlib's version as integers (``(0, 10, 2)``)."""
    from jaxlib import version

    return tuple(int(part) for part in re.findall(r"\d+", version.__version__)[:3])


def compiler_options() -> dict | None:
    """XLA options for keras_dp's compiled train step: :func:`cpu_compiler_options` on
    a CPU, None (XLA's defaults) elsewhere. The noise is the same bit for bit (tested);
    sums may round differently in their last bits, as any change of vectorisation or
    of the kernel that computes a product may make them."""
    return cpu_compiler_options(jaxlib_version()) if on_cpu() else None
