"""DPConfig validation: each bad field names itself and the fix."""

import dataclasses
import math
import warnings

import pytest

from keras_dp import DPConfig, default_delta

BASE = dict(target_epsilon=3.0, batch_size=64, epochs=2, dataset_size=1_000)


@pytest.mark.parametrize(
    "change, field, fix",
    [
        (dict(target_epsilon=0.0), "target_epsilon", "positive"),
        (dict(target_epsilon=-1.0), "target_epsilon", "positive"),
        (dict(target_epsilon=math.nan), "target_epsilon", "positive"),
        (dict(target_epsilon="3"), "target_epsilon", "positive"),
        (dict(target_epsilon=True), "target_epsilon", "positive"),
        (dict(target_epsilon=math.inf), "target_epsilon", "noise_multiplier=0"),
        (dict(target_delta=0.0), "target_delta", r"\(0, 1\)"),
        (dict(target_delta=-1e-5), "target_delta", r"\(0, 1\)"),
        (dict(target_delta=math.nan), "target_delta", r"\(0, 1\)"),
        (dict(target_delta=1e-3), "target_delta", "below 1/dataset_size"),
        (dict(target_delta=2e-3), "target_delta", "target_delta <="),
        (dict(l2_clip_norm=0.0), "l2_clip_norm", "positive"),
        (dict(l2_clip_norm=-1.0), "l2_clip_norm", "positive"),
        (dict(l2_clip_norm=math.inf), "l2_clip_norm", "finite"),
        (dict(l2_clip_norm=math.nan), "l2_clip_norm", "finite"),
        (dict(batch_size=0), "batch_size", "positive integer"),
        (dict(batch_size=32.5), "batch_size", "positive integer"),
        (dict(batch_size=2_000), "batch_size", "exceeds dataset_size"),
        (dict(epochs=0), "epochs", "positive"),
        (dict(epochs=-2), "epochs", "positive"),
        (dict(epochs=math.inf), "epochs", "positive"),
        (dict(epochs=0.01), "epochs", "plans 0 updates"),
        (dict(steps=0, epochs=None), "steps", "positive integer"),
        (dict(steps=10.5, epochs=None), "steps", "positive integer"),
        (dict(steps=100), "steps", "plans 31 updates"),
        (dict(epochs=1e300), "epochs", "about 10\\^301 updates.*accountant='rdp'"),
        (dict(steps=1_000_001, epochs=None), "steps", "PLD accountant composes each"),
        (dict(dataset_size=0), "dataset_size", "number of training examples"),
        (dict(dataset_size=-5), "dataset_size", "number of training examples"),
        (dict(sampling="shuffle"), "sampling", "'poisson'"),
        (dict(accountant="moments"), "accountant", "'pld'"),
        (dict(sampling="fixed"), "accountant", "accountant='rdp'"),
        (dict(noise_multiplier=-1.0), "noise_multiplier", "positive"),
        (dict(noise_multiplier=math.nan), "noise_multiplier", "positive"),
        (dict(noise_multiplier=0.0), "noise_multiplier", "no noise gives no privacy"),
        (dict(microbatch_size=0), "microbatch_size", "positive integer"),
        (dict(seed=-1), "seed", "non-negative"),
        (dict(seed=1.5), "seed", "non-negative"),
    ],
)
def test_bad_field_is_named_with_its_fix(change, field, fix):
    with pytest.raises(ValueError, match=rf"DPConfig\.{field}=.*{fix}"):
        DPConfig(**{**BASE, **change})


def test_only_plans_that_pld_composes_too_often_are_refused():
    """Over 10⁶ PLD compositions: refused at once (epochs=1e300 had calibration run
    forever). RDP (instant at any length) and BandMF's rounds of b updates are not."""
    long = dict(BASE, epochs=None, steps=2_000_000)
    assert DPConfig(**long, accountant="rdp").calibrate().noise_multiplier > 0
    DPConfig(**{**long, "steps": 4_000_000}, noise="bandmf", bands=4)  # 10⁶ rounds
    with pytest.raises(ValueError, match="DPConfig.steps=4000004 .* PLD accountant"):
        DPConfig(**{**long, "steps": 4_000_004}, noise="bandmf", bands=4)
    unsized = {k: v for k, v in long.items() if k != "dataset_size"}
    with pytest.raises(ValueError, match="DPConfig.steps=2000000 .* PLD accountant"):
        DPConfig(**unsized)  # refused before N is known: the rounds do not depend on it


def test_epochs_or_steps_is_required():
    with pytest.raises(ValueError, match="epochs=.*steps="):
        DPConfig(target_epsilon=3.0, batch_size=64)


def test_epochs_and_steps_that_agree_are_accepted():
    assert DPConfig(**BASE, steps=31).steps == 31  # round(2 * 1000 / 64) = 31


def test_non_private_debug_run_needs_explicit_zero_noise_and_warns():
    with pytest.warns(UserWarning, match="NOT differentially private") as record:
        config = DPConfig(**{**BASE, "target_epsilon": math.inf}, noise_multiplier=0.0)
    assert record[0].filename == __file__  # the warning points at the user's line
    assert config.calibrate().noise_multiplier == 0.0
    assert config.epsilon() == math.inf


def test_a_debug_plan_warns_once_not_again_at_keras_dp_own_copies():
    with pytest.warns(UserWarning, match="NOT differentially private"):
        config = DPConfig(target_epsilon=math.inf, noise_multiplier=0.0, batch_size=64, epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fit's copy with the data's size: no second warning
        sized = config.calibrate(dataset_size=1_000)
    assert (sized.dataset_size, sized.noise_multiplier, sized.steps) == (1_000, 0.0, 31)
    # A plan made again by hand is the user's line again: it warns.
    with pytest.warns(UserWarning, match="NOT differentially private") as record:
        dataclasses.replace(sized, seed=3)
    assert len(record) == 1


def test_default_delta_is_strictly_below_one_over_n():
    for n in (10, 1_000, 60_000, 10**7):
        assert default_delta(n) < 1 / n
    assert DPConfig(**BASE).delta == default_delta(1_000)
    assert DPConfig(target_epsilon=3.0, batch_size=64, epochs=2).delta is None


def test_steps_follow_dataset_size_and_replace():
    config = DPConfig(target_epsilon=3.0, batch_size=100, epochs=3)
    assert config.steps is None and config.sampling_probability is None
    sized = dataclasses.replace(config, dataset_size=1_000)
    assert sized.steps == 30 and sized.sampling_probability == 0.1
    assert dataclasses.replace(sized, epochs=5).steps == 50
    assert dataclasses.replace(sized, dataset_size=2_000).steps == 60
    with pytest.raises(ValueError, match="DPConfig.steps=45"):
        dataclasses.replace(sized, steps=45)  # disagrees with epochs=3


def test_replace_on_calibrated_config_keeps_working():
    calibrated = DPConfig(target_epsilon=3.0, batch_size=100, epochs=3).calibrate(1_000)
    assert calibrated.is_calibrated
    same = dataclasses.replace(calibrated, l2_clip_norm=0.5)  # does not change ε
    assert same.noise_multiplier == calibrated.noise_multiplier
    longer = dataclasses.replace(calibrated, epochs=6)  # σ was for 30 steps, not 60
    assert longer.noise_multiplier is None and longer.steps == 60
    recalibrated = longer.calibrate()
    assert recalibrated.noise_multiplier > calibrated.noise_multiplier
    assert recalibrated.epsilon() <= 3.0


def test_a_plan_made_again_reuses_its_sigma_and_any_other_plan_searches(monkeypatch):
    from keras_dp import calibration

    monkeypatch.setattr(calibration, "_CALIBRATED", {})  # this test's plans only
    plan = dict(target_epsilon=2.5, batch_size=50, epochs=2)
    first = DPConfig(**plan).calibrate(900)
    assert first.epsilon() <= 2.5
    searches = []

    def counted(*args, **kwargs):  # a distinct σ per search, without searching
        searches.append(1)
        return 1.0 + len(searches)

    monkeypatch.setattr(calibration, "calibrate_noise_multiplier", counted)
    # Fields that do not change the plan's event: no search, the same σ.
    again = DPConfig(**plan, l2_clip_norm=0.3, microbatch_size=7, seed=1).calibrate(900)
    assert searches == [] and again.noise_multiplier == first.noise_multiplier
    changes = [
        dict(target_epsilon=2.4),
        dict(batch_size=51),
        dict(epochs=3),
        dict(target_delta=1e-6),
        dict(accountant="rdp"),
        dict(sampling="fixed", accountant="rdp"),
        dict(noise="bandmf", bands=2),
        dict(privacy_unit="user", examples_per_user=2),
        dict(privacy_unit="user", examples_per_user=3),
        dict(privacy_unit="user", examples_per_user=2, user_sampling="els"),
    ]
    for count, change in enumerate(changes, start=1):
        other = DPConfig(**{**plan, **change}).calibrate(900)
        assert len(searches) == count and other.noise_multiplier == 1.0 + count, change
    for count, change in enumerate(changes, start=1):  # each kept under its own plan
        assert DPConfig(**{**plan, **change}).calibrate(900).noise_multiplier == 1.0 + count
    assert len(searches) == len(changes)
    DPConfig(**plan).calibrate(901)  # another dataset size
    assert len(searches) == len(changes) + 1


def test_calibrate_refuses_a_conflicting_dataset_size():
    with pytest.raises(ValueError, match="DPConfig.dataset_size=1000.*2000 examples"):
        DPConfig(**BASE).calibrate(dataset_size=2_000)


def test_accounting_needs_dataset_size():
    config = DPConfig(target_epsilon=3.0, batch_size=64, epochs=2, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="needs dataset_size"):
        config.epsilon()
    with pytest.raises(ValueError, match="needs dataset_size"):
        config.calibrate()


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DPConfig(**BASE).batch_size = 10
