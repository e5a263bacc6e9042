"""Privacy accounting: the ε of a plan's dp_accounting events.

Only dp_accounting does the mathematics. This module asks it for the ε of the event
that describes the training (built in :mod:`keras_dp.events`, whose names are also
here: ``accounting.poisson_event``) and picks a PLD discretization fine enough to be
accurate. :mod:`keras_dp.calibration` searches σ for a target ε with it
(``accounting.calibrate_noise_multiplier`` is that module's).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator

import dp_accounting
from dp_accounting import pld, rdp

from keras_dp.events import (  # noqa: F401 (the events are part of this module's API)
    _untruncated,
    bandmf_event,
    els_event,
    fixed_batch_event,
    neighboring_relation,
    plan_event,
    poisson_event,
    truncated_batch_size,
)

NeighboringRelation = dp_accounting.NeighboringRelation

ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("poisson", "fixed")
NOISES = ("independent", "bandmf")

# PLD discretization: start coarse and halve until two successive values agree to
# within ``_PLD_REL_TOL``. The error of the PLD estimate shrinks about 4x per halving,
# so the finer value is then within ~_PLD_REL_TOL/3 of the converged one. Never go
# finer than dp_accounting's default (1e-4): that is the reference we promise to
# stay within 0.5% of.
_PLD_START = 4e-3
# ... or a thousandth of the ε expected (from RDP, an upper bound), when that is coarser:
# the error that matters is relative, and an absolute 4e-3 makes the PLD of a
# low-noise (large ε) mechanism huge (ε = 1000: 17 s; ε = 1e6: out of memory).
_PLD_START_RELATIVE = 1e-3
# ... and at most a hundredth of it: from a grid as coarse as ε itself, two successive
# halvings can agree to 0.5% while both are ~0.8% above the converged value (found by a
# randomised run: ε = 0.004 from 4e-3 stopped at 2e-3, 0.72% above dp_accounting's 1e-4).
_PLD_START_MAX_FRACTION = 1e-2
_PLD_COARSEST = 1.0  # dp_accounting computes expm1(discretization)
# Targets above this are refused: no meaningful guarantee, and the accountants' grids
# (PLD) or orders (RDP) are not built for them. A non-private run says so explicitly:
# target_epsilon=math.inf with noise_multiplier=0.
MAX_TARGET_EPSILON = 1000.0
# A δ below this guards against nothing more (it is far below 1/N for any dataset), and
# the Poisson truncation's tail bound (1% of δ per step) underflows with it: at δ = 5e-324
# dp_accounting raised "Sampling probability is not in (0,1]".
MIN_TARGET_DELTA = 1e-100
# The PLD accountant composes every update (by repeated squaring of a distribution
# whose support grows with the composition): 10⁶ updates take 15–40 s on 2 CPU cores,
# 10⁷ minutes, 10³⁰⁰ forever. Longer plans are refused (RDP's bound stays instant).
MAX_PLD_STEPS = 10**6
# Where σ is searched, and where a user's σ must lie: above 10⁶ no plan needs more noise,
# and far above it σ² overflows dp_accounting's float arithmetic (σ = 1e300: an
# OverflowError) and σ·C the step's float32.
NOISE_MULTIPLIER_RANGE = (1e-4, 1e6)
_PLD_FINEST = 1e-4
_PLD_REL_TOL = 0.005


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silences dp_accounting's harmless RDP convergence warnings."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _accountant(
    accountant: str, relation: NeighboringRelation, discretization: float
) -> dp_accounting.PrivacyAccountant:
    if accountant == "pld":
        return pld.PLDAccountant(relation, value_discretization_interval=discretization)
    if accountant == "rdp":
        return rdp.RdpAccountant(neighboring_relation=relation)
    raise ValueError(f"accountant={accountant!r} is unknown; pass 'pld' or 'rdp'.")


def _epsilon_at(
    event: dp_accounting.DpEvent,
    delta: float,
    accountant: str,
    relation: NeighboringRelation,
    discretization: float = _PLD_FINEST,
) -> float:
    """ε of ``event`` at ``delta``, by ``accountant`` (PLD at ``discretization``),
    kept (:func:`_kept_epsilon`). RDP reads no discretization: its ε is kept once
    per event, whatever discretization the caller passed."""
    if accountant != "pld":
        discretization = _PLD_FINEST
    return _kept_epsilon(event, delta, accountant, relation, discretization)


# Events are frozen and hashable and ε is deterministic: a σ search evaluates the same
# (event, discretization) more than once (its bracket's ends, its root, the grid's check).
@functools.lru_cache(maxsize=4096)
def _kept_epsilon(
    event: dp_accounting.DpEvent,
    delta: float,
    accountant: str,
    relation: NeighboringRelation,
    discretization: float,
) -> float:
    with _quiet_absl():
        if isinstance(event, dp_accounting.SelfComposedDpEvent) and event.count >= 1:
            # One step, kept, composed count times as the accountant composes it.
            if accountant == "pld":
                step = _step_pld(event.event, relation, discretization)
                if step is not None:
                    composed = pld.privacy_loss_distribution.identity(
                        value_discretization_interval=discretization
                    ).compose(step.self_compose(event.count))
                    return float(composed.get_epsilon_for_delta(delta))
            elif accountant == "rdp" and (eps := _composed_rdp(event, delta, relation)) is not None:
                return eps
        acc = _accountant(accountant, relation, discretization)
        return float(acc.compose(event).get_epsilon(delta))


# One step of a plan, kept so that ε after each of its epochs (``PrivacyBudget``:
# 0.1-0.4 s each when built again) composes it; None for any other event (the
# accountant then composes it). The values are dp_accounting's own, bit for bit (tested).


@functools.lru_cache(maxsize=8)  # a plan's halvings need 2-3; a PLD at 1e-4 is a few MB
def _step_pld(step: dp_accounting.DpEvent, relation: NeighboringRelation, discretization: float):
    """The PLD that ``PLDAccountant`` builds for ``step`` (and then self-composes)."""
    build = pld.privacy_loss_distribution
    if isinstance(step, dp_accounting.TruncatedSubsampledGaussianDpEvent):
        sizes = (step.sampling_probability, step.truncated_batch_size, step.dataset_size)
        if min(sizes) <= 0 or step.noise_multiplier <= 0:
            return None  # the accountant's own special cases
        return build.from_truncated_subsampled_gaussian_mechanism(
            dataset_size=step.dataset_size,
            sampling_probability=step.sampling_probability,
            truncated_batch_size=step.truncated_batch_size,
            noise_multiplier=step.noise_multiplier,
            value_discretization_interval=discretization,
            neighboring_relation=relation,
        )
    if isinstance(step, dp_accounting.PoissonSampledDpEvent) and isinstance(
        step.event, dp_accounting.GaussianDpEvent
    ):
        if step.sampling_probability <= 0 or step.event.noise_multiplier <= 0:
            return None
        return build.from_gaussian_mechanism(
            standard_deviation=step.event.noise_multiplier,
            value_discretization_interval=discretization,
            sampling_prob=step.sampling_probability,
            neighboring_relation=relation,
        )
    mixture = dp_accounting.dp_event.MixtureOfGaussiansDpEvent  # ELS's step
    if isinstance(step, mixture) and relation == NeighboringRelation.ADD_OR_REMOVE_ONE:
        if step.standard_deviation <= 0 or not any(step.sensitivities):
            return None
        return build.from_mixture_gaussian_mechanism(
            standard_deviation=step.standard_deviation,
            sensitivities=step.sensitivities,
            sampling_probs=step.sampling_probs,
            value_discretization_interval=discretization,
        )
    return None


@functools.lru_cache(maxsize=64)
def _step_rdp(step: dp_accounting.DpEvent, relation: NeighboringRelation, orders=None):
    """(orders, the RDP of ``step`` at each) that ``RdpAccountant`` adds ``count`` times
    (at its default orders, or ``orders``)."""
    if not isinstance(step, (dp_accounting.PoissonSampledDpEvent, dp_accounting.GaussianDpEvent)):
        return None
    if orders is None:
        acc = _accountant("rdp", relation, _PLD_FINEST)
    else:
        acc = rdp.RdpAccountant(list(orders), relation)
    acc.compose(step)  # its state is then zeros + the step's RDP at each order
    orders, per_step = getattr(acc, "_orders", None), getattr(acc, "_rdp", None)
    return None if orders is None or per_step is None else (tuple(orders), per_step)


def _composed_rdp(event, delta: float, relation: NeighboringRelation, orders=None):
    """ε of a step composed ``count`` times from its kept RDP (:func:`_step_rdp`), as
    ``RdpAccountant`` composes it; None for any other event."""
    if not isinstance(event, dp_accounting.SelfComposedDpEvent) or event.count < 1:
        return None
    step = _step_rdp(event.event, relation, orders)
    if step is None:
        return None
    orders, per_step = step
    compute = rdp.rdp_privacy_accountant.compute_epsilon
    return float(compute(orders, event.count * per_step, delta)[0])


def pld_start(epsilon_guess: float) -> float:
    """The PLD discretization to start from for an ε of about ``epsilon_guess``: at
    most ``_PLD_START_MAX_FRACTION`` of it, so that a small ε is not refined from a
    grid as coarse as itself."""
    if not math.isfinite(epsilon_guess):
        return _PLD_START
    start = max(_PLD_START, _PLD_START_RELATIVE * epsilon_guess)
    start = min(start, _PLD_START_MAX_FRACTION * epsilon_guess)
    # On the grid _PLD_START·2^k (rounded down: finer), so that the halvings of plans
    # whose guesses differ (one plan after each epoch) meet on the same discretizations
    # and reuse one step's PLD (:func:`_step_pld`).
    if start > 0:
        start = _PLD_START * 2.0 ** math.floor(math.log2(start / _PLD_START))
    return min(_PLD_COARSEST, max(_PLD_FINEST, start))


# The RDP orders of :func:`rdp_estimate`: whole ones, which dp_accounting computes in
# closed form. Its default grid's fractional orders (1.1-10.9) took 80% of an estimate's
# time (the README MLP's plan: 130-150 ms against 28 ms), for a bound a few per cent
# tighter (ε 9.29 against 10.04 there) that only sizes a grid.
_ESTIMATE_ORDERS = (*range(2, 64), 128, 256, 512, 1024)


def rdp_estimate(
    event: dp_accounting.DpEvent, delta: float, relation: NeighboringRelation
) -> float:
    """A fast upper bound on ε (RDP of the untruncated twin, at whole orders
    :data:`_ESTIMATE_ORDERS`): sizes the PLD grid."""
    try:
        return _estimate(_untruncated(event), delta, relation)
    except Exception:  # an event RDP does not support: no estimate
        return math.inf


@functools.lru_cache(maxsize=256)
def _estimate(event: dp_accounting.DpEvent, delta: float, relation: NeighboringRelation):
    with _quiet_absl():
        eps = _composed_rdp(event, delta, relation, _ESTIMATE_ORDERS)
        if eps is None:
            acc = rdp.RdpAccountant(list(_ESTIMATE_ORDERS), relation)
            eps = float(acc.compose(event).get_epsilon(delta))
        return eps


def pld_discretization(
    event: dp_accounting.DpEvent, delta: float, relation: NeighboringRelation
) -> tuple[float, float]:
    """The coarsest PLD discretization whose ε is stable to 0.5%, and that ε."""
    d = pld_start(rdp_estimate(event, delta, relation))
    eps = _epsilon_at(event, delta, "pld", relation, d)
    while d > _PLD_FINEST and math.isfinite(eps):
        finer = max(d / 2, _PLD_FINEST)
        eps_finer = _epsilon_at(event, delta, "pld", relation, finer)
        if eps - eps_finer <= _PLD_REL_TOL * eps_finer:
            return finer, eps_finer
        d, eps = finer, eps_finer
    return d, eps


@functools.lru_cache(maxsize=1024)  # events are frozen and hashable; ε is deterministic
def epsilon(
    event: dp_accounting.DpEvent,
    delta: float,
    accountant: str = "pld",
    relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE,
) -> float:
    """ε of ``event`` at ``delta`` (an upper bound; math.inf when there is no noise).

    With "pld" the discretization is refined until halving it changes ε by under
    0.5%, so the value is within 0.5% of dp_accounting's 1e-4 discretization.
    """
    if accountant == "pld":
        return pld_discretization(event, delta, relation)[1]
    return _epsilon_at(event, delta, accountant, relation)


class UnreachableEpsilon(ValueError):
    """No noise multiplier in (1e-4, 1e6) gives the target ε for the plan."""


class UnresolvedDelta(ValueError):
    """dp_accounting's PLD does not resolve the plan's δ (its σ is far above RDP's)."""


def __getattr__(name: str):
    """The σ search's public names, also here (it is :mod:`keras_dp.calibration`)."""
    if name in ("calibrate_noise_multiplier", "most_steps_within"):
        from keras_dp import calibration

        return getattr(calibration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
