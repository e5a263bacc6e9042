"""The dp_accounting events that describe training exactly as keras_dp's samplers run it.

Formal guarantees:
  * "poisson" sampling: each step includes each example independently with
    probability q, and a draw larger than ``truncated_batch_size`` is cut down to a
    uniformly random subset of that size (PLD:
    ``TruncatedSubsampledGaussianDpEvent``; RDP: untruncated
    ``PoissonSampledDpEvent``, and the sampler then never truncates). Neighbouring
    datasets differ by adding or removing one example; the clipped sum has L2
    sensitivity C and the noise standard deviation is σ·C.
  * "bandmf" noise (cyclic Poisson sampling, correlated noise): see
    :func:`bandmf_event`.
  * "fixed" sampling: each step uses a uniformly random subset of exactly B examples
    (``SampledWithoutReplacementDpEvent``, RDP). Neighbouring datasets differ by
    replacing one example. Replacing one example moves the clipped sum by up to 2C,
    so the Gaussian event carries noise multiplier σ/2.
"""

from __future__ import annotations

import functools
import math

import dp_accounting
from scipy import stats

NeighboringRelation = dp_accounting.NeighboringRelation

# Truncation: the chance that any planned step draws more than B_max examples is at
# most this fraction of δ (a union bound over steps).
_TRUNCATION_FRACTION_OF_DELTA = 0.01


def neighboring_relation(sampling: str) -> NeighboringRelation:
    """The neighbouring relation under which ``sampling`` is accounted."""
    if sampling == "fixed":
        return NeighboringRelation.REPLACE_ONE
    return NeighboringRelation.ADD_OR_REMOVE_ONE


@functools.lru_cache(maxsize=256)
def truncated_batch_size(
    dataset_size: int, sampling_probability: float, steps: int, delta: float
) -> int:
    """The physical batch B_max that a truncated Poisson sampler pads to.

    The smallest B_max such that the chance that *any* of ``steps`` Poisson draws
    holds more than B_max examples is at most 1% of δ (union bound). It does not
    depend on σ, so calibration is not circular, and the truncation then changes ε
    by far less than the PLD discretization error. The accountant still accounts the
    truncation exactly.
    """
    per_step = _TRUNCATION_FRACTION_OF_DELTA * delta / max(steps, 1)
    tail = stats.binom(dataset_size, sampling_probability).sf  # tail(b) = P(draw > b)
    b_max = int(stats.binom.isf(per_step, dataset_size, sampling_probability))
    while b_max < dataset_size and tail(b_max) > per_step:
        b_max += 1
    while b_max > 1 and tail(b_max - 1) <= per_step:
        b_max -= 1
    return max(1, min(b_max, dataset_size))


def poisson_event(
    dataset_size: int,
    sampling_probability: float,
    noise_multiplier: float,
    steps: int,
    truncated_batch_size: int | None = None,
) -> dp_accounting.DpEvent:
    """``steps`` Gaussian steps on a Poisson sample (truncated when B_max is given).

    With q = 1 every example is in every step: ``steps`` Gaussian mechanisms of noise σ,
    which compose exactly into one of noise σ/√steps (their privacy curves are equal);
    the PLD of 10⁶ composed steps would otherwise take minutes and gigabytes.
    """
    if sampling_probability >= 1:
        single = dp_accounting.GaussianDpEvent(noise_multiplier / math.sqrt(max(steps, 1)))
        return dp_accounting.SelfComposedDpEvent(single, 1 if steps else 0)
    if truncated_batch_size is None:
        step = dp_accounting.PoissonSampledDpEvent(
            sampling_probability, dp_accounting.GaussianDpEvent(noise_multiplier)
        )
    else:
        step = dp_accounting.TruncatedSubsampledGaussianDpEvent(
            dataset_size=dataset_size,
            sampling_probability=sampling_probability,
            truncated_batch_size=truncated_batch_size,
            noise_multiplier=noise_multiplier,
        )
    return dp_accounting.SelfComposedDpEvent(step, steps)


def bandmf_event(
    group_probability: float, noise_multiplier: float, steps: int, bands: int
) -> dp_accounting.DpEvent:
    """``steps`` updates of Amplified BandMF (Choquette-Choo et al. 2023, Theorem 4).

    Examples are partitioned into ``bands`` groups at random; update t Poisson-samples
    group t mod b with ``group_probability``; the noise is C⁻¹z for a b-banded strategy
    C with column norms at most 1. An example's participations are then b apart, where
    the bands of its columns of C do not overlap, and the run is ceil(steps/b) rounds of
    the Poisson-subsampled Gaussian mechanism of multiplier σ (add-or-remove-one).
    jax-privacy's ``experimental.accounting.amplified_bandmf_event`` builds the same.
    """
    rounds = math.ceil(steps / bands)
    return poisson_event(0, group_probability, noise_multiplier, rounds)


def els_event(
    sampling_probability: float, noise_multiplier: float, steps: int, examples_per_user: int
) -> dp_accounting.DpEvent:
    """``steps`` updates of user-level DP-SGD with example-level sampling (Chua et al.
    2024, "Mind the Privacy Unit!"): each of a user's at most k examples joins an update
    independently with probability q and is clipped to C, so adding or removing the user
    moves the clipped sum by C·X with X ~ Binomial(k, q): a mixture of Gaussians of
    sensitivities 0..k with the binomial weights (PLD only). jax-privacy's
    ``DpsgdTrainingUserLevelAccountant`` composes the same event.
    """
    k = examples_per_user
    weights = [float(stats.binom.pmf(x, k, sampling_probability)) for x in range(k + 1)]
    mixture = dp_accounting.dp_event.MixtureOfGaussiansDpEvent
    step = mixture(noise_multiplier, tuple(range(k + 1)), tuple(weights))  # hashable
    return dp_accounting.SelfComposedDpEvent(step, steps)


def fixed_batch_event(
    dataset_size: int, batch_size: int, noise_multiplier: float, steps: int
) -> dp_accounting.DpEvent:
    """``steps`` Gaussian steps on uniform subsets of exactly ``batch_size``.

    Under replace-one the clipped sum's sensitivity is 2C, hence σ/2 in the event.
    """
    step = dp_accounting.SampledWithoutReplacementDpEvent(
        dataset_size, batch_size, dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    )
    return dp_accounting.SelfComposedDpEvent(step, steps)


def plan_event(plan, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    """The event of ``steps`` updates of ``plan`` (a calibrated-or-not
    :class:`keras_dp.DPConfig`) at noise multiplier σ: its sampler's event."""
    if plan.sampling == "fixed":
        return fixed_batch_event(plan.dataset_size, plan.batch_size, noise_multiplier, steps)
    if plan.correlated:
        return bandmf_event(plan.group_probability, noise_multiplier, steps, plan.bands)
    if plan.example_sampled_users:
        return els_event(plan.sampling_probability, noise_multiplier, steps, plan.examples_per_user)
    return poisson_event(
        plan.dataset_size, plan.sampling_probability, noise_multiplier, steps, plan.max_batch_size
    )


def _untruncated(event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
    """The untruncated Poisson twin of a truncated event (a cheap search proxy)."""
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        return dp_accounting.SelfComposedDpEvent(_untruncated(event.event), event.count)
    if isinstance(event, dp_accounting.TruncatedSubsampledGaussianDpEvent):
        return dp_accounting.PoissonSampledDpEvent(
            event.sampling_probability,
            dp_accounting.GaussianDpEvent(event.noise_multiplier),
        )
    return event
