"""σ calibrated to a target ε: the search over dp_accounting's ε (:mod:`keras_dp.accounting`).

dp_accounting computes every ε; this module finds the smallest noise multiplier whose
ε reaches the target, remembers it per plan for the rest of the process, and checks a
user-given σ against the target.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable

import dp_accounting

from keras_dp import accounting, validation
from keras_dp.accounting import (  # names only: every ε is asked through the module
    NOISE_MULTIPLIER_RANGE,
    NeighboringRelation,
    UnreachableEpsilon,
    UnresolvedDelta,
    _quiet_absl,
    _untruncated,
)

# σ calibrated in this process, by plan (``DPConfig._plan_key``: every field that the
# plan's dp_accounting event reads). The search is deterministic, so a plan made again
# (a new model, a notebook cell run twice) gets the same σ without searching again.
_CALIBRATED: dict[Hashable, float] = {}
_CALIBRATED_MAX = 256

# The fine root aims this fraction below the target ε. Its grid is the proxy's; the
# final check's is the exact event's, which can stop one halving coarser and land an
# ε a few 1e-4 above the fine root's. That check then fails and σ is raised by 0.1%,
# at the cost of a whole epsilon() again (a 55k-step plan: 8 of its 24 s). Over 30
# random plans (session 49), two were raised before; with the margin none was, σ moved
# by -0.09% to +0.05%, and the searches took 37.4 s instead of 44.5 s.
_FINE_MARGIN = 5e-4


def remembered(key: Hashable) -> float | None:
    """σ already calibrated in this process for the plan ``key``, or None."""
    return _CALIBRATED.get(key)


def remembered_noise_multiplier(
    key: Hashable, make_event: Callable[[float], dp_accounting.DpEvent], *args
) -> float:
    """:func:`calibrate_noise_multiplier` (``make_event, *args``), searched once per
    ``key`` in this process (up to 256 plans)."""
    sigma = _CALIBRATED.get(key)
    if sigma is None:
        sigma = calibrate_noise_multiplier(make_event, *args)
        if len(_CALIBRATED) < _CALIBRATED_MAX:
            _CALIBRATED[key] = sigma
    return sigma


def check_user_noise(config) -> None:
    """A user-given σ must keep the whole plan within ``target_epsilon``; the error
    names the σ that would, and the most steps this σ allows.

    ε falls as σ grows (more noise is a post-processing of less). So a σ below half
    the σ the plan needs is refused from ε at that half, which costs what the search's
    own evaluations cost: the PLD of a tiny σ itself is never built (σ = 1e-3 took
    minutes, 1e-5 asked for 37 GiB, 1e-300 overflowed). RDP's fast bound tells which
    case a σ is in; a σ near or above the plan's needs is accounted as it is.
    """
    target, sigma = config.target_epsilon, config.noise_multiplier
    bound = accounting.rdp_estimate(config.dp_event(), config.delta, config.neighboring_relation)
    # RDP near the target: σ's own ε is cheap, and the σ needed only names the fix.
    needed = None if bound <= 2 * target else _needed_noise(config)
    if needed is not None and sigma < needed / 2:
        half = config._replace(noise_multiplier=needed / 2)
        spent = half.epsilon()
        if spent > target:
            one = " (even one step spends more)" if half.epsilon(1) > target else ""
            raise validation.bad(
                "noise_multiplier",
                sigma,
                f"this plan needs noise_multiplier >= {at_least(needed)} for target_epsilon="
                f"{target} (δ={config.delta:.3g}); at {needed / 2:.4g} it already spends "
                f"ε={spent:.4g}, and less noise spends more. Pass noise_multiplier >= "
                f"{at_least(needed)}, or None to calibrate it{one}, or raise target_epsilon.",
            )
        # not seen: the search's σ is within ~0.1% of the least; σ's own ε decides
    spent = config.epsilon()
    if spent > target:
        _refuse_user_noise(config, spent, needed if needed is not None else _needed_noise(config))


def at_least(sigma: float, digits: int = 4) -> str:
    """``sigma`` to ``digits`` significant digits, rounded up: the σ an error suggests
    then fits the target, as the calibrated σ does (rounded to nearest, 1.14604 would
    read 1.146, which spends more than the target)."""
    if not (math.isfinite(sigma) and sigma > 0):
        return f"{sigma:.{digits}g}"
    scale = 10.0 ** (math.floor(math.log10(sigma)) - digits + 1)
    return f"{math.ceil(sigma / scale) * scale:.{digits}g}"


def _needed_noise(config) -> float:
    """The σ calibrated for ``config``'s plan (the smallest that fits its target)."""
    return config._replace(noise_multiplier=None).calibrate().noise_multiplier


def _refuse_user_noise(config, spent: float, needed: float) -> None:
    """Raises: σ (near the σ needed) spends ``spent`` > the target over the plan."""
    steps_ok = config.max_steps_within(config.target_epsilon)
    per_epoch = config.dataset_size / config.batch_size
    fewer = (
        f", or plan at most steps={steps_ok} (epochs={steps_ok / per_epoch:.3g})"
        if steps_ok
        else " (even one step spends more)"
    )
    raise validation.bad(
        "noise_multiplier",
        config.noise_multiplier,
        f"over {config.steps} steps it spends ε={spent:.4g} > target_epsilon="
        f"{config.target_epsilon} (δ={config.delta:.3g}). Pass noise_multiplier >= "
        f"{at_least(needed)}, or noise_multiplier=None to calibrate it{fewer}, or raise "
        "target_epsilon.",
    )


def calibrate_noise_multiplier(
    make_event: Callable[[float], dp_accounting.DpEvent],
    target_epsilon: float,
    delta: float,
    accountant: str = "pld",
    relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE,
) -> float:
    """The smallest σ (to ~0.1%) with ``epsilon(make_event(σ), delta) <= target``.

    Three passes, so that it is fast: a coarse root on the untruncated proxy event, at
    the PLD discretization the target suggests, narrowed to 1% by :func:`log_root`;
    then dp_accounting's ``calibrate_dp_mechanism`` finds the fine root, at a
    discretization chosen at that σ (:func:`keras_dp.accounting.pld_discretization`),
    in a bracket 5% wide, aiming 0.05% below the target (the final check's grid can be
    coarser: ``_FINE_MARGIN``); and a final check of the exact event with
    :func:`keras_dp.accounting.epsilon`, the same function that reports ε during
    training, raising σ by 0.1% steps until it fits. With RDP, :func:`log_root` alone
    narrows the bracket to 0.2%. Every ε is dp_accounting's.
    Raises :class:`UnreachableEpsilon` (a ValueError) when no σ in (1e-4, 1e6)
    reaches the target.
    """
    mc = dp_accounting.mechanism_calibration
    proxy = lambda s: _untruncated(make_event(s))  # noqa: E731

    def root(discretization, target, lo, hi, tol):
        with _quiet_absl():
            return mc.calibrate_dp_mechanism(
                lambda: _Remembered(accountant, relation, discretization),
                proxy,
                target,
                delta,
                bracket_interval=mc.ExplicitBracketInterval(lo, hi),
                tol=tol,
            )

    d0 = accounting.pld_start(target_epsilon)  # RDP reads none
    coarse = lambda s: accounting._epsilon_at(proxy(s), delta, accountant, relation, d0)  # noqa: E731
    lo, hi = _bracket(coarse, target_epsilon, start=_bracket_start(proxy))
    if accountant == "pld":
        lo, hi = log_root(coarse, target_epsilon, lo, hi, rel_tol=0.01)
        d, _ = accounting.pld_discretization(proxy(hi), delta, relation)
        fine = lambda s: accounting._epsilon_at(proxy(s), delta, "pld", relation, d)  # noqa: E731
        fine_target = target_epsilon * (1 - _FINE_MARGIN)
        lo, hi = _bracket(fine, fine_target, start=hi, factor=1.05, named=target_epsilon)
        sigma = root(d, fine_target, lo, hi, 2e-4 * hi)
    else:  # RDP's ε is the proxy's: its bracket's upper end fits
        sigma = log_root(coarse, target_epsilon, lo, hi, rel_tol=2e-3)[1]
    while accounting.epsilon(make_event(sigma), delta, accountant, relation) > target_epsilon:
        sigma *= 1.001
    if accountant == "pld":
        _check_pld_resolves(make_event(sigma), sigma, target_epsilon, delta, relation)
    return sigma


def log_root(
    eps_of: Callable[[float], float], target: float, lo: float, hi: float, rel_tol: float
) -> tuple[float, float]:
    """``(lo, hi)`` narrowed to ``hi <= lo·(1 + rel_tol)``, keeping ``eps_of(lo) >
    target >= eps_of(hi)`` (a decreasing ``eps_of``, as ε is in σ).

    Regula falsi on (log σ, log ε), where a Gaussian plan's ε falls about as a power
    of σ, so that each step lands near the crossing (the MLP's plan: 1% in 3 steps,
    where Brent's method on σ and ε took 5 to 0.2%); with the Illinois rule (an end
    kept twice has its value halved), so that both ends move. A value that is not
    finite and positive halves the bracket instead.
    """
    a, b = math.log(lo), math.log(hi)
    fa, fb = (_log_gap(eps_of, s, target) for s in (lo, hi))
    kept = 0  # +1: hi was moved last; -1: lo was
    while b - a > math.log1p(rel_tol):
        x = 0.5 * (a + b)
        if math.isfinite(fa) and math.isfinite(fb) and fa > fb:
            x = min(max(b - fb * (b - a) / (fb - fa), a + 1e-3 * (b - a)), b - 1e-3 * (b - a))
        fx = _log_gap(eps_of, math.exp(x), target)
        if fx > 0:
            a, fa = x, fx
            fb = fb / 2 if kept == -1 else fb
            kept = -1
        else:
            b, fb = x, fx
            fa = fa / 2 if kept == 1 else fa
            kept = 1
    return math.exp(a), math.exp(b)


def _log_gap(eps_of: Callable[[float], float], sigma: float, target: float) -> float:
    """log ε(σ) − log target (±inf where ε is not finite and positive)."""
    eps = eps_of(sigma)
    if eps <= 0:
        return -math.inf
    return math.log(eps / target) if math.isfinite(eps) else math.inf


def _check_pld_resolves(event, sigma: float, target: float, delta: float, relation) -> None:
    """PLD's σ against RDP's bound at it (computed already, by :func:`epsilon`).

    RDP's ε is the looser bound, so where it is below the target at PLD's σ, the PLD is
    not resolving δ: dp_accounting truncates each step's tails at mass e⁻⁵⁰, which a δ
    near 1e-14 starts to feel. At δ = 1e-15 its ε is ∞ until σ is enormous (a plan
    that RDP certifies at σ = 1.3 calibrated to σ = 18,659): refused, naming
    ``accountant="rdp"``. Between half the target and the target it only warns.
    """
    bound = accounting.rdp_estimate(event, delta, relation)
    if bound >= target:
        return
    advice = (
        f"dp_accounting's PLD does not resolve δ={delta:.3g} for this plan: it needs σ="
        f"{sigma:.4g}, at which RDP already certifies ε={bound:.3g} < target {target:g}."
        " Pass accountant='rdp' (less noise for the same target), or a larger target_delta."
    )
    if bound < target / 2:
        raise UnresolvedDelta(advice)
    logging.getLogger(__name__).warning(advice)


def most_steps_within(epsilon_after: Callable[[int], float], steps: int, limit: float) -> int:
    """The most updates n ≤ ``steps`` with ``epsilon_after(n) <= limit`` (ε grows
    with n): a search that keeps ``epsilon_after(lo) <= limit < epsilon_after(hi)``.

    The first :data:`_SECANT_TRIES` queries go where the line through the last two
    counts asked, in log n and log ε, reaches ``limit`` (through the only one at
    first, with slope 1/2: over many updates ε grows about as √n), inside the
    bracket; then halvings. A guess only chooses where to ask: the answer is the
    halvings'. On 35 plans and limits, 2-7 queries where halvings asked 8-13; the
    README MLP's plan (168 updates) at half its ε: 5 against 9, 0.56 s against 1.1.
    """
    lo, hi = 0, steps
    value = epsilon_after(hi)
    if value <= limit:
        return hi
    asked = [(hi, value)]
    while hi - lo > 1:  # invariant: epsilon_after(lo) <= limit < epsilon_after(hi)
        mid = (lo + hi) // 2
        if len(asked) <= _SECANT_TRIES:
            mid = _secant(asked, limit, lo, hi, mid)
        value = epsilon_after(mid)
        asked.append((mid, value))
        lo, hi = (mid, hi) if value <= limit else (lo, mid)
    return lo


_SECANT_TRIES = 6


def _secant(asked: list, limit: float, lo: int, hi: int, mid: int) -> int:
    """Where the line through the last two ``(log n, log ε)`` of ``asked`` reaches
    ``limit`` (slope 1/2 through the only one), rounded down into ``[lo + 1, hi − 1]``;
    ``mid`` where a logarithm is undefined or the slope not a positive number."""
    n1, e1 = asked[-1]
    if not (limit > 0 and 0 < e1 < math.inf):
        return mid
    slope = 0.5
    if len(asked) > 1:
        n0, e0 = asked[-2]
        if 0 < e0 < math.inf and e0 != e1:
            slope = (math.log(e1) - math.log(e0)) / (math.log(n1) - math.log(n0))
    if not 0 < slope < math.inf:
        return mid
    at = math.log(n1) + (math.log(limit) - math.log(e1)) / slope
    if at >= math.log(hi):
        return hi - 1
    return min(max(int(math.exp(at)), lo + 1), hi - 1)


def _bracket_start(make_event: Callable[[float], dp_accounting.DpEvent]) -> float:
    """Where the σ search starts: σ = 1, or, for a plan that is one Gaussian mechanism
    of noise σ·s (q = 1: ``steps`` updates compose into one of noise σ/√steps), the σ
    at which that Gaussian's noise is 1. The search then never builds the PLD of a
    near-noiseless Gaussian (at σ = 1 over 10⁵ steps: millions of points a try, and two
    minutes to calibrate)."""
    event = make_event(1.0)
    if isinstance(event, dp_accounting.SelfComposedDpEvent) and event.count == 1:
        event = event.event
    if isinstance(event, dp_accounting.GaussianDpEvent) and event.noise_multiplier > 0:
        return 1.0 / event.noise_multiplier
    return 1.0


def _bracket(
    eps_of: Callable[[float], float],
    target: float,
    start: float = 1.0,
    factor: float = 2.0,
    named: float | None = None,
) -> tuple[float, float]:
    """σ_lo < σ_hi with eps_of(σ_lo) > target >= eps_of(σ_hi), stepping by ``factor``;
    an error names ``named`` (the user's ε, where ``target`` is the fine root's aim).

    The step squares after each miss (1.05, 1.1, 1.2, 1.5, 2.2, ...), so a start that is
    far off costs a few evaluations, not dozens (10⁶-step plans: the coarse σ can be
    several times the fine one).
    """
    sigma = start
    too_little_noise = eps_of(sigma) > target
    low, high = NOISE_MULTIPLIER_RANGE
    while True:
        nxt = sigma * factor if too_little_noise else sigma / factor
        factor = factor * factor
        if not low < nxt < high:
            raise UnreachableEpsilon(
                f"No noise multiplier in ({low:g}, {high:g}) gives ε="
                f"{target if named is None else named} for this plan "
                "with this accountant (RDP cannot certify an ε below about log(1/δ)/255, "
                "whatever the noise). Raise target_epsilon, or use sampling='poisson' with "
                "accountant='pld'."
            )
        if (eps_of(nxt) > target) != too_little_noise:
            return (sigma, nxt) if too_little_noise else (nxt, sigma)
        sigma = nxt


class _Remembered:
    """The accountant that ``calibrate_dp_mechanism`` composes each candidate σ into:
    dp_accounting's ``accountant`` at ``discretization``, through :func:`_epsilon_at`'s
    memory (Brent's method re-evaluates its bracket's ends, which the bracket search
    has just evaluated, and its root)."""

    ledger = dp_accounting.NoOpDpEvent()

    def __init__(self, accountant: str, relation: NeighboringRelation, discretization: float):
        self._args = (accountant, relation, discretization)
        self._event = None

    def compose(self, event: dp_accounting.DpEvent, count: int = 1) -> _Remembered:
        self._event = event if count == 1 else dp_accounting.SelfComposedDpEvent(event, count)
        return self

    def get_epsilon(self, delta: float) -> float:
        accountant, relation, discretization = self._args
        return accounting._epsilon_at(self._event, delta, accountant, relation, discretization)
