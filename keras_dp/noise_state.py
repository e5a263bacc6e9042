"""The secret state of correlated noise (BandMF), kept as non-trainable variables.

With ``DPConfig(noise="bandmf", bands=b > 1)`` the train step needs the strategy's b
coefficients and the last b − 1 noise vectors (float32, one stack per trainable
variable: (b − 1) × the trainable variables). They live in the model's non-trainable
variables, so the train step receives them as state and checkpoints carry them: a
resumed run is exactly the analysed mechanism. They are SECRET (with the ledger's
partition seed) until the plan completes, when :func:`erase` zeroes them.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_dp import _keras, bandmf


def make(model) -> None:
    """Creates the state once ``model`` is built and its plan is BandMF (b > 1)."""
    config = model.dp_config
    if config is None or not config.correlated or not model.built:
        return
    if getattr(model, "_dp_noise_history", None) is not None:
        return
    coefs = bandmf.strategy(config.steps, config.bands)
    history = [
        keras.Variable(
            keras.initializers.Zeros()((len(coefs) - 1, *v.shape), "float32"),
            trainable=False,
            name=f"dp_noise_history_{i}",
        )
        for i, v in enumerate(model.trainable_variables)
    ]
    strategy = keras.Variable(coefs.astype("float32"), trainable=False, name="dp_strategy")
    _keras.track_after_build(model, "_dp_noise_strategy", strategy)
    _keras.track_after_build(model, "_dp_noise_history", history)


def slots(model) -> tuple[int, list[int]] | None:
    """Where the strategy and the history sit among the non-trainable variables."""
    history = getattr(model, "_dp_noise_history", None)
    if history is None or not model.dp_config.correlated:
        return None
    slot = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
    return slot[id(model._dp_noise_strategy)], [slot[id(v)] for v in history]


def erase(model) -> None:
    """Zeroes the noise history and forgets the partition seed."""
    for variable in getattr(model, "_dp_noise_history", None) or []:
        variable.assign(np.zeros(variable.shape, "float32"))
    model._dp_ledger.partition_seed = None
