"""The banded Toeplitz strategy of Amplified BandMF (correlated noise).

DP matrix factorization releases the gradient stream G through ``A(G + C⁻¹Z)``: the
noise of update t is ``w_t = (C⁻¹z)_t`` for i.i.d. Gaussian z. With a lower-triangular
Toeplitz C of b bands (coefficients ``c_0..c_{b-1}``), ``C w = z`` gives the stream
update ``w_t = (z_t − Σ_{j=1}^{b−1} c_j w_{t−j}) / c_0``, which needs the last b − 1
noise vectors (:func:`keras_dp.noise.privatize_correlated`). Coefficients of L2 norm 1
make every column of C of norm at most 1, the sensitivity the accounting assumes
(:func:`keras_dp.accounting.bandmf_event`).

The coefficients minimise the mean squared error of the prefix sums (the weights of
SGD) over the run's number of steps; jax-privacy's ``matrix_factorization.toeplitz``
does the optimisation (the ``bandmf`` extra: ``pip install "keras-dp[bandmf]"``).
"""

from __future__ import annotations

import functools
import logging

import numpy as np

logger = logging.getLogger(__name__)


def _toeplitz():
    try:
        from jax_privacy.matrix_factorization import toeplitz
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "DPConfig(noise='bandmf') optimises its strategy with jax-privacy's "
            'matrix_factorization; install it with: pip install "keras-dp[bandmf]"'
        ) from err
    return toeplitz


@functools.lru_cache(maxsize=32)
def strategy(steps: int, bands: int) -> np.ndarray:
    """The RMSE-optimal b-banded Toeplitz strategy for ``steps`` updates (float64,
    ``c_0 > 0``, L2 norm at most 1). ``bands == 1`` is ``[1.0]``: DP-SGD."""
    if bands == 1:
        return np.ones(1)
    bands = min(bands, steps)
    coefs = np.asarray(_toeplitz().optimize_banded_toeplitz(steps, bands), np.float64)
    if coefs[0] < 0:
        coefs = -coefs  # the same mechanism; a positive diagonal reads better
    coefs /= np.linalg.norm(coefs) * (1 + 1e-9)  # column norms <= 1, also after rounding
    logger.info("BandMF strategy for %d steps, %d bands: %s", steps, bands, coefs)
    return coefs


def noise_coefficients(coefs: np.ndarray, steps: int) -> np.ndarray:
    """The first ``steps`` Toeplitz coefficients of C⁻¹ (the noise ``w = C⁻¹z``)."""
    inverse = np.zeros(steps)
    for t in range(steps):
        past = sum(coefs[j] * inverse[t - j] for j in range(1, min(len(coefs), t + 1)))
        inverse[t] = ((1.0 if t == 0 else 0.0) - past) / coefs[0]
    return inverse


def prefix_rmse(coefs: np.ndarray, steps: int) -> float:
    """Root mean squared error of the noise on the prefix sums Σ_{s≤t} w_s (unit σ):
    the noise the weights of SGD carry (√((n + 1)/2) for DP-SGD)."""
    cumulative = np.cumsum(noise_coefficients(coefs, steps))
    return float(np.sqrt(np.mean(np.cumsum(cumulative**2))))


def check_strategy(coefs: np.ndarray, bands: int) -> None:
    """Refuses a strategy the accounting does not cover: more than ``bands`` bands, or a
    column norm above 1 (a model holding the noise state of another plan)."""
    coefs = np.asarray(coefs, np.float64)
    if len(coefs) > bands or np.linalg.norm(coefs) > 1 + 1e-6 or coefs[0] <= 0:
        raise ValueError(
            f"This model holds the noise state of a {len(coefs)}-band strategy (norm "
            f"{np.linalg.norm(coefs):.6g}), which a plan of bands={bands} does not account "
            "for. Train a new model for the new plan (or keep the plan the state was made "
            "for). Nothing was trained."
        )
