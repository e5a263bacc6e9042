"""ε and calibration checked against dp_accounting called directly."""

import dataclasses
import itertools
import logging
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from keras_dp import DPConfig, accounting, calibration

logging.getLogger("absl").setLevel(logging.ERROR)

PLANS = [
    dict(dataset_size=15_000, batch_size=1024, epochs=3, target_epsilon=4.0),
    dict(dataset_size=60_000, batch_size=256, epochs=60, target_epsilon=4.0),
    dict(dataset_size=1_000, batch_size=16, epochs=3, target_epsilon=3.0),
    dict(dataset_size=1_797, batch_size=64, epochs=20, target_epsilon=8.0),
]


def direct_pld(event, delta):
    return pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(delta)


def direct_rdp(event, delta, relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE):
    return rdp.RdpAccountant(neighboring_relation=relation).compose(event).get_epsilon(delta)


@pytest.mark.parametrize("plan", PLANS[:3])
@pytest.mark.parametrize("sigma", [0.7, 1.3])
def test_pld_epsilon_matches_dp_accounting_within_half_percent(plan, sigma):
    config = DPConfig(**plan, noise_multiplier=sigma)
    n, steps, delta = config.dataset_size, config.steps, config.delta
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.TruncatedSubsampledGaussianDpEvent(
            n, config.batch_size / n, config.max_batch_size, sigma
        ),
        steps,
    )
    reference = direct_pld(event, delta)
    ours = config.epsilon()
    assert abs(ours - reference) <= 0.005 * reference
    # Half the steps spend less.
    assert config.epsilon(steps // 2) < ours


@pytest.mark.parametrize("plan", PLANS)
def test_rdp_poisson_epsilon_equals_dp_accounting(plan):
    config = DPConfig(**plan, accountant="rdp", noise_multiplier=1.1)
    q = config.batch_size / config.dataset_size
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.1)), config.steps
    )
    assert config.epsilon() == pytest.approx(direct_rdp(event, config.delta), rel=1e-9)
    assert config.max_batch_size is None  # RDP assumes no truncation


def test_fixed_sampling_accounts_replace_one_with_sensitivity_two():
    config = DPConfig(
        dataset_size=5_000,
        batch_size=250,
        steps=100,
        target_epsilon=8.0,
        sampling="fixed",
        accountant="rdp",
        noise_multiplier=2.0,
    )
    relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(
            5_000,
            250,
            dp_accounting.GaussianDpEvent(1.0),  # σ/2: replace-one moves the sum by 2C
        ),
        100,
    )
    assert config.neighboring_relation == relation
    assert config.epsilon() == pytest.approx(direct_rdp(event, config.delta, relation), rel=1e-9)


def test_fixed_full_batch_equals_closed_form_gaussian_with_sensitivity_two():
    # q = 1: every step sees every example, no amplification. One replaced example
    # moves the clipped sum by 2C, so RDP(α) = α (2C)² / (2 σ² C²) = 2α/σ² per step.
    sigma, steps, delta = 10.0, 4, 1e-6
    config = DPConfig(
        dataset_size=100,
        batch_size=100,
        steps=steps,
        target_epsilon=100.0,
        target_delta=delta,
        sampling="fixed",
        accountant="rdp",
        noise_multiplier=sigma,
    )
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))
    # Standard RDP -> (ε, δ) conversion, minimised over orders (an upper bound on ours).
    closed = min(
        steps * 2 * a / sigma**2 + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        for a in orders
    )
    assert config.epsilon() == pytest.approx(closed, rel=0.02)
    # The same σ with sensitivity 1 would claim far less: the factor 2 matters.
    assert (
        config.epsilon() > 1.8 * dataclasses.replace(config, noise_multiplier=2 * sigma).epsilon()
    )


@pytest.mark.parametrize("plan", PLANS)
def test_truncation_size_rule(plan):
    config = DPConfig(**plan, noise_multiplier=1.0)
    n, q, steps, delta = (
        config.dataset_size,
        config.sampling_probability,
        config.steps,
        config.delta,
    )
    b_max = config.max_batch_size
    # Union bound over the run: P(any step draws > B_max) <= 1% of δ, and B_max is smallest.
    assert steps * stats.binom.sf(b_max, n, q) <= 0.01 * delta
    assert steps * stats.binom.sf(b_max - 1, n, q) > 0.01 * delta
    assert b_max < 4 * config.batch_size
    # Truncation is then almost free: ε within 0.1% of untruncated Poisson.
    untruncated = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.0)), steps
    )
    assert config.epsilon() <= 1.001 * accounting.epsilon(untruncated, delta)


@pytest.mark.parametrize(
    "plan",
    PLANS
    + [
        dict(dataset_size=15_000, batch_size=1024, epochs=3, target_epsilon=4.0, accountant="rdp"),
        dict(
            dataset_size=15_000,
            batch_size=512,
            epochs=2,
            target_epsilon=2.0,
            accountant="rdp",
            sampling="fixed",
        ),
    ],
)
def test_calibration_is_tight(plan):
    config = DPConfig(**plan).calibrate()
    sigma = config.noise_multiplier
    assert config.epsilon() <= config.target_epsilon
    looser = dataclasses.replace(config, noise_multiplier=0.99 * sigma)
    assert looser.epsilon() > config.target_epsilon


def test_planned_steps_are_optimizer_updates():
    config = DPConfig(dataset_size=14_732, batch_size=1024, epochs=3, target_epsilon=4.0)
    assert config.steps == 43  # round(3 * 14732 / 1024), not thousands
    calibrated = config.calibrate()
    assert calibrated.steps == 43
    assert calibrated.dp_event().count == 43


def test_explicit_sigma_that_overspends_is_refused_with_the_fix():
    config = DPConfig(
        dataset_size=10_000, batch_size=100, epochs=5, target_epsilon=1.0, noise_multiplier=0.6
    )
    with pytest.raises(ValueError, match=r"noise_multiplier=0.6.*noise_multiplier >= (\S+),") as e:
        config.calibrate()
    fit = float(str(e.value).split("noise_multiplier >= ")[1].split(",")[0])
    assert dataclasses.replace(config, noise_multiplier=fit).epsilon() <= 1.0
    # Here even one step spends ε = 1.6 > 1: the message says so instead of "steps=0".
    assert "even one step" in str(e.value) and config.epsilon(1) > 1.0
    fewer = dataclasses.replace(config, target_epsilon=2.0)
    with pytest.raises(ValueError, match="at most steps=") as e:
        fewer.calibrate()
    steps_ok = int(str(e.value).split("at most steps=")[1].split(" ")[0])
    assert fewer.epsilon(steps_ok) <= 2.0 < fewer.epsilon(steps_ok + 1)


def test_explicit_sigma_that_fits_is_kept():
    config = DPConfig(
        dataset_size=10_000, batch_size=100, epochs=5, target_epsilon=8.0, noise_multiplier=1.5
    )
    assert config.calibrate().noise_multiplier == 1.5


def test_epsilon_at_zero_steps_is_zero_and_grows():
    config = DPConfig(
        dataset_size=10_000, batch_size=100, epochs=2, target_epsilon=3.0, noise_multiplier=1.0
    )
    values = [config.epsilon(s) for s in (0, 10, 100, 200)]
    assert values[0] == 0.0
    assert values == sorted(values)
    # A larger δ gives a smaller ε.
    assert config.epsilon(delta=1e-6) < config.epsilon(delta=1e-8)


@given(
    st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=60),
    st.floats(0, 60, allow_nan=False),
)
def test_most_steps_within_is_the_last_step_under_the_limit(increments, limit):
    """The binary search behind PrivacyBudget's stop against a scan of every n, on
    non-decreasing ε curves (flat stretches included)."""
    curve = [0.0, *itertools.accumulate(increments)]
    steps = len(curve) - 1
    want = max(n for n in range(steps + 1) if curve[n] <= limit)
    assert calibration.most_steps_within(curve.__getitem__, steps, limit) == want


@given(
    st.lists(
        st.one_of(st.floats(0, 10), st.sampled_from([0.0, 1e-300, 1e300])),
        min_size=1,
        max_size=300,
    ),
    st.floats(0, 300, allow_nan=False),
    st.booleans(),
)
def test_secants_find_what_halvings_find(increments, limit, unbounded):
    """The secants only choose where the search asks: on non-decreasing curves with
    flat stretches, jumps, zeros and ∞ the answer is the scan's, no count is asked
    twice, and the queries stay within the secants' tries plus the halvings'."""
    curve = [0.0, *itertools.accumulate(increments)]
    if unbounded:
        curve[-1] = math.inf
    steps = len(curve) - 1
    want = max(n for n in range(steps + 1) if curve[n] <= limit)
    asked = []

    def eps(n):
        asked.append(n)
        return curve[n]

    assert calibration.most_steps_within(eps, steps, limit) == want
    assert len(asked) == len(set(asked))
    assert len(asked) <= 2 + calibration._SECANT_TRIES + math.ceil(math.log2(steps + 1))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(2, 10**6), st.floats(0.3, 1.0), st.floats(0.01, 0.99), st.floats(0.1, 10))
def test_secants_ask_few_times_where_epsilon_grows_as_a_power(steps, power, fraction, scale):
    """ε = scale·n^power (composition: about √n over many updates, n over few): the
    secants in log-log land on the last count within ``fraction`` of ε(steps) in a
    few queries, where halvings need log2(steps)."""
    asked = []

    def eps(n):
        asked.append(n)
        return scale * n**power

    limit = fraction * eps(steps)
    asked.clear()
    n = calibration.most_steps_within(eps, steps, limit)
    queries = list(asked)
    assert eps(n) <= limit and (n == steps or eps(n + 1) > limit)
    assert len(queries) <= 5, queries


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.floats(-1.0, 1.0),
    st.floats(1.5, 4.0),
    st.floats(-0.3, 0.3),
    st.floats(0.01, 1.0),
    st.floats(0.01, 1.0),
)
def test_log_root_narrows_a_bracket_of_the_crossing_in_few_steps(root, k, bend, below, above):
    """The σ search's coarse pass on curves where ε falls as a power of σ, bent in
    log-log (ε = exp(−k·(x − x*) + bend·(x² − x*²)) at x = log σ, decreasing there),
    from brackets 2% to 7× wide: it keeps a bracket (ε(lo) > 1 >= ε(hi)) that holds
    the crossing x*, narrows it to 1%, and needs few evaluations."""
    asked = []

    def eps_of(sigma):
        asked.append(sigma)
        x = math.log(sigma)
        return math.exp(-k * (x - root) + bend * (x * x - root * root))

    lo, hi = math.exp(root - below), math.exp(root + above)
    new_lo, new_hi = calibration.log_root(eps_of, 1.0, lo, hi, rel_tol=0.01)
    assert len(asked) <= 2 + 6  # the bracket's ends, then its steps (halvings: up to 8)
    assert lo <= new_lo < new_hi <= hi and new_hi <= 1.01 * new_lo
    assert eps_of(new_lo) > 1.0 >= eps_of(new_hi)
    assert math.log(new_lo) <= root <= math.log(new_hi) + 1e-12


def test_log_root_halves_where_epsilon_is_not_finite():
    """ε = ∞ below a σ (no noise resolves δ there): the search still narrows."""

    def eps_of(sigma):
        return math.inf if sigma < 0.3 else 2.0 / sigma

    lo, hi = calibration.log_root(eps_of, 4.0, 0.1, 1.0, rel_tol=0.001)
    assert lo < 0.5 <= hi <= 1.001 * lo


def test_max_steps_within_stops_where_dp_accounting_passes_the_budget():
    config = DPConfig(
        dataset_size=2_000, batch_size=100, steps=60, target_epsilon=3.0, noise_multiplier=1.0
    )
    n = config.max_steps_within(1.5)
    assert 0 < n < 60
    assert config.epsilon(n) <= 1.5 < config.epsilon(n + 1)


def test_a_bracket_that_runs_out_of_noise_names_the_users_epsilon():
    """The fine stage aims 0.05% below the target: its error names the target asked."""
    aim = 3.0 * (1 - calibration._FINE_MARGIN)
    with pytest.raises(accounting.UnreachableEpsilon, match=r"gives ε=3\.0 for this plan"):
        calibration._bracket(lambda sigma: 10.0, aim, start=2.0, factor=1.05, named=3.0)
    with pytest.raises(accounting.UnreachableEpsilon, match=f"gives ε={aim} for"):
        calibration._bracket(lambda sigma: 10.0, aim, start=2.0, factor=1.05)


def test_max_steps_within_asks_few_pld_queries(monkeypatch):
    """On the README MLP's plan (168 updates) at half its ε: the plan's end, three
    secants and the bracket's close, where halvings asked nine; a scan's answer."""
    config = DPConfig(
        dataset_size=1797, batch_size=64, epochs=6, target_epsilon=8.0, noise_multiplier=0.6722
    )
    asked = []
    real = DPConfig.epsilon

    def spied(self, steps=None, delta=None):
        asked.append(steps)
        return real(self, steps, delta)

    monkeypatch.setattr(DPConfig, "epsilon", spied)
    n = config.max_steps_within(4.0)
    assert len(asked) <= 5, asked
    assert config.epsilon(n) <= 4.0 < config.epsilon(n + 1)


def test_a_sigma_search_asks_dp_accounting_once_per_event(monkeypatch):
    """Brent's method re-evaluates its bracket's ends and its root; each (event,
    discretization) must reach dp_accounting once (an ELS event costs ~1 s here):
    an accountant's composition (RDP) or a step's PLD built (PLD)."""

    monkeypatch.setattr(calibration, "_CALIBRATED", {})
    accounting._kept_epsilon.cache_clear()
    accounting.epsilon.cache_clear()
    asked = []
    real = accounting._accountant

    class Spy:
        def __init__(self, inner, discretization):
            self.inner, self.discretization = inner, discretization
            self.ledger = inner.ledger

        def compose(self, event, count=1):
            asked.append((event, count, self.discretization))
            self.inner.compose(event, count)
            return self

        def get_epsilon(self, delta):
            return self.inner.get_epsilon(delta)

    monkeypatch.setattr(accounting, "_accountant", lambda a, r, d: Spy(real(a, r, d), d))
    # A step's PLD is built by dp_accounting directly (then kept and self-composed).
    build = pld.privacy_loss_distribution
    for name in ("from_gaussian_mechanism", "from_truncated_subsampled_gaussian_mechanism"):
        made = getattr(build, name)

        def spied(*args, made=made, name=name, **kwargs):
            asked.append((name, args, tuple(sorted(kwargs.items()))))
            return made(*args, **kwargs)

        monkeypatch.setattr(build, name, spied)
    config = DPConfig(target_epsilon=4.0, batch_size=50, steps=40).calibrate(2_000)
    assert len(asked) >= 6 and len(asked) == len(set(asked))
    assert config.epsilon() <= 4.0


def test_an_rdp_search_composes_each_sigma_once(monkeypatch):
    """RDP reads no discretization: the search and the final check share one ε per σ
    (fixed batches: each a whole RDP composition, 0.2 s here)."""
    monkeypatch.setattr(calibration, "_CALIBRATED", {})
    accounting._kept_epsilon.cache_clear()
    accounting.epsilon.cache_clear()
    composed = []
    real = accounting._accountant

    def spied(accountant, relation, discretization):
        inner = real(accountant, relation, discretization)
        compose = inner.compose
        inner.compose = lambda event, count=1: (
            composed.append((event, count)) or compose(event, count)
        )
        return inner

    monkeypatch.setattr(accounting, "_accountant", spied)
    plan = dict(target_epsilon=4.0, batch_size=1024, epochs=3, accountant="rdp")
    config = DPConfig(**plan, sampling="fixed").calibrate(15_000)
    assert len(composed) >= 3 and len(composed) == len(set(composed))
    assert config.epsilon() <= 4.0


def test_the_fine_root_leaves_the_final_check_no_raise(monkeypatch):
    """A 21k-step plan whose exact event's grid stops coarser than its proxy's fine
    grid: aimed at the target itself, the fine root's σ overspent there by ~3e-4 and
    was raised by 0.1% (a second whole epsilon()). Aimed 0.05% below it, σ passes the
    final check at once and is still the smallest to 0.1%."""
    monkeypatch.setattr(calibration, "_CALIBRATED", {})
    for cached in (accounting._kept_epsilon, accounting.epsilon):
        cached.cache_clear()
    checked = []
    real = accounting.epsilon

    def spied(event, *args):
        checked.append(event)
        return real(event, *args)

    monkeypatch.setattr(accounting, "epsilon", spied)
    plan = DPConfig(target_epsilon=4.2, target_delta=0.5 / 67_918, batch_size=16, epochs=5)
    config = plan.calibrate(67_918)
    assert len(checked) == 1  # the exact event at the found σ, checked once
    assert config.epsilon() <= 4.2
    smaller = config._replace(noise_multiplier=config.noise_multiplier / 1.001)
    assert real(smaller.dp_event(), smaller.delta) > 4.2


@pytest.mark.parametrize("kind", ["truncated", "poisson", "poisson-rdp", "fixed-rdp", "els"])
@settings(max_examples=3, deadline=None, derandomize=True)
@given(
    sigma=st.floats(0.5, 4.0),
    q=st.floats(0.001, 0.5),
    counts=st.lists(st.integers(1, 400), min_size=2, max_size=3),
    discretization=st.sampled_from([1e-3, 4e-3, 1.6e-2]),
)
def test_a_kept_step_composes_to_dp_accountings_own_epsilon(kind, sigma, q, counts, discretization):
    """ε after t steps from one step's kept PLD (or RDP) composed t times is what
    dp_accounting's accountant gives for the composed event, bit for bit, for each t in
    turn (the second reuses the first's step)."""
    n = 1000
    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    gaussian = dp_accounting.GaussianDpEvent(sigma)
    step = {
        "truncated": dp_accounting.TruncatedSubsampledGaussianDpEvent(
            n, q, max(1, round(2 * q * n) + 5), sigma
        ),
        "poisson": dp_accounting.PoissonSampledDpEvent(q, gaussian),
        "poisson-rdp": dp_accounting.PoissonSampledDpEvent(q, gaussian),
        "fixed-rdp": dp_accounting.SampledWithoutReplacementDpEvent(
            n, max(1, round(q * n)), gaussian
        ),
        "els": accounting.els_event(q, sigma, 1, 3).event,
    }[kind]
    name = "rdp" if kind.endswith("rdp") else "pld"
    if kind == "els":  # a mixture's PLD takes seconds at fine grids: two counts, coarser
        counts, discretization = counts[:2], max(discretization, 4e-3)
    if kind == "fixed-rdp":
        relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    accounting._kept_epsilon.cache_clear()
    accounting._step_pld.cache_clear()
    accounting._step_rdp.cache_clear()
    for count in counts:
        event = dp_accounting.SelfComposedDpEvent(step, count)
        direct = (
            pld.PLDAccountant(relation, value_discretization_interval=discretization)
            if name == "pld"
            else rdp.RdpAccountant(neighboring_relation=relation)
        )
        expected = direct.compose(event).get_epsilon(1e-6)
        assert accounting._epsilon_at(event, 1e-6, name, relation, discretization) == expected


@pytest.mark.parametrize("guess", [0.0, 1e-3, 0.05, 0.3, 1.0, 3.9, 5.9, 40.0, 700.0, math.inf])
def test_the_pld_grid_starts_on_one_ladder_no_coarser_than_its_rule(guess):
    """Plans whose ε guesses differ (one plan after each epoch) start their halvings on
    the same grids (4e-3·2^k, within [1e-4, 1]); a guess of 0 starts at the finest."""
    start = accounting.pld_start(guess)
    rule = min(max(4e-3, 1e-3 * guess), 1e-2 * guess) if math.isfinite(guess) else 4e-3
    assert 1e-4 <= start <= min(1.0, max(1e-4, rule))
    if 1e-4 < start < 1.0:
        assert math.log2(start / 4e-3) == round(math.log2(start / 4e-3))


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    sigma=st.floats(0.5, 8.0),
    q=st.floats(1e-3, 0.2),
    steps=st.integers(1, 3_000),
    delta=st.sampled_from([1e-5, 1e-8]),
)
def test_the_grids_estimate_is_rdp_at_whole_orders_above_the_pld(sigma, q, steps, delta):
    """The estimate that sizes the PLD grid is dp_accounting's RDP bound at whole orders
    only (closed forms: its default fractional orders took 80% of an estimate's
    time), so an upper bound on ε: above RDP's own and the PLD's."""
    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    event = dp_accounting.SelfComposedDpEvent(step, steps)
    assert all(float(a) == int(a) for a in accounting._ESTIMATE_ORDERS)
    whole = rdp.RdpAccountant(orders=list(accounting._ESTIMATE_ORDERS))
    expected = whole.compose(event).get_epsilon(delta)
    estimate = accounting.rdp_estimate(event, delta, relation)
    assert estimate == pytest.approx(expected, rel=1e-12)
    assert estimate >= direct_rdp(event, delta) * (1 - 1e-12)
    pld_epsilon = accounting.epsilon(event, delta)
    assert estimate >= pld_epsilon / (1 + accounting._PLD_REL_TOL)


def test_a_delta_the_pld_does_not_resolve_is_refused_naming_rdp():
    """At δ = 1e-15 dp_accounting's PLD gives ε = ∞ for this plan until σ is enormous
    (it calibrated σ = 18,659, where RDP certifies the target at σ = 1.31): refused,
    naming target_delta and accountant='rdp', whose σ then fits the target."""
    fields = dict(target_epsilon=2.0, batch_size=64, dataset_size=10_000, epochs=1.0)
    with pytest.raises(ValueError, match=r"target_delta=1e-15 .*accountant='rdp'"):
        DPConfig(target_delta=1e-15, **fields).calibrate()
    with pytest.raises(ValueError, match=r"target_delta=1e-15 .*accountant='rdp'"):
        DPConfig(target_delta=1e-15, noise_multiplier=1.5, **fields).calibrate()
    rdp = DPConfig(target_delta=1e-15, accountant="rdp", **fields).calibrate()
    assert rdp.noise_multiplier < 1.5 and rdp.epsilon() <= 2.0


def test_a_pld_looser_than_rdp_warns(caplog):
    """At δ = 3e-15 the PLD's σ is one at which RDP's bound is below the target: the
    σ is valid (ε ≤ target) but more than RDP needs, which the log says."""
    fields = dict(target_epsilon=2.0, batch_size=64, dataset_size=10_000, epochs=1.0)
    with caplog.at_level(logging.WARNING, logger="keras_dp.calibration"):
        config = DPConfig(target_delta=3e-15, **fields).calibrate()
    assert config.epsilon() <= 2.0
    bound = accounting.rdp_estimate(config.dp_event(), config.delta, config.neighboring_relation)
    assert bound < 2.0
    assert any("accountant='rdp'" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="keras_dp.calibration"):
        DPConfig(target_delta=1e-10, **fields).calibrate()
    assert not caplog.records  # a δ the PLD resolves: RDP's bound is above the target
