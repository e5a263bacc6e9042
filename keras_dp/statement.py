"""A human-readable statement of what a DP training run guarantees."""

from __future__ import annotations

import importlib.metadata
from typing import Any

from keras_dp import bandmf
from keras_dp.config import DPConfig

_NOT_COVERED = (
    "Not covered: data used outside this training run (pre-training data, a tokenizer or "
    "vocabulary fitted on the private data, preprocessing statistics), the choice of "
    "hyperparameters made by looking at the private data, other releases from the same "
    "data, and side channels such as timing. The training loss and metrics, "
    "clipped_fraction and nonfinite_examples are computed on private rows without "
    "noise: anything that acts on them "
    "(EarlyStopping, ReduceLROnPlateau or ModelCheckpoint monitoring 'loss', printing "
    "them) is outside the guarantee; monitor held-out data instead. The guarantee "
    "assumes the sampler and the noise run as stated, that the seed stays secret, and "
    "{unit}. Updates computed in an earlier process and thrown away by a crash recovery "
    "are assumed never released."
)
_UNIT_ASSUMED = {
    "example": "that each person contributes one example (a person with several examples "
    "is protected as that many units, not as a whole: privacy_unit='user' protects a "
    "person)",
    "user": "that the user_ids given to fit name the people: all of a person's examples "
    "carry one id (a person filed under two ids is two units, each protected alone)",
}

_PUBLIC_SEED = (
    "NOT PRIVATE: this run used a fixed, known seed (DPConfig.seed). Anyone who knows it "
    "can regenerate the noise and remove it from the weights, so the figures below hold "
    "only for someone who does not know the seed. A fixed seed is for tests; train with "
    "seed=None for a secret one."
)


def privacy_statement(config_or_model: Any, steps: int | None = None) -> str:
    """Describes the guarantee of ``steps`` updates of a plan, in plain words.

    Args:
      config_or_model: A :class:`DPConfig` with ``dataset_size`` known (calibrated
        or with an explicit noise multiplier), or a trained DP model (anything with
        a ``dp_config`` attribute and a ``privacy_spent()`` method).
      steps: Updates to describe. Default: the steps a model has taken, or the
        config's whole plan.

    Returns:
      A multi-line string: sampler, neighbouring relation, σ, q, steps,
      accountant and dp_accounting version, ε at the target δ, at δ/10 and at
      10·δ (δ/100 when 10·δ is not below 1/N), and what the guarantee does not cover.

    Example:

    >>> config = DPConfig(target_epsilon=3.0, batch_size=256, epochs=3,
    ...                   dataset_size=60_000, noise_multiplier=1.0)
    >>> print(privacy_statement(config).splitlines()[0])
    Differential privacy statement (keras_dp, example-level DP-SGD)
    """
    public_seed, lineage = False, None
    if isinstance(config_or_model, DPConfig):
        config = config_or_model
        public_seed = config.seed is not None
    else:
        config = getattr(config_or_model, "dp_config", None)
        if not isinstance(config, DPConfig):
            raise TypeError(
                "privacy_statement needs a DPConfig or a keras_dp model; got "
                f"{type(config_or_model).__name__}."
            )
        spent = config_or_model.privacy_spent()
        public_seed = not spent.private
        if steps is None:
            steps = spent.steps
            ledger = getattr(config_or_model, "_dp_ledger", None)
            lineage = None if ledger is None else ledger.steps
    if not config.is_calibrated:
        config = config.calibrate()
    steps = config.steps if steps is None else steps
    n, delta = config.dataset_size, config.delta
    if config.correlated:
        sampler = (
            f"Cyclic Poisson sampling: the examples were split once, each independently and "
            f"uniformly at random (secret seed), into b = {config.bands} groups; update t "
            f"includes each example of group t mod b independently with probability "
            f"{config.group_probability:.6g} (expected batch {config.batch_size} of N = {n}), "
            "never truncated. An example is in at most one update of every b."
        )
        relation = (
            "add-or-remove-one example (N is treated as public: q and δ's default are "
            "computed from it)"
        )
    elif config.sampling == "poisson":
        b_max = config.max_batch_size
        sampler = (
            f"Poisson sampling: each example joins each update independently with "
            f"probability q = {config.sampling_probability:.6g} (expected batch "
            f"{config.batch_size} of N = {n})"
            + (
                f", truncated to at most {b_max} examples."
                if b_max is not None
                else ", never truncated."
            )
        )
        relation = (
            "add-or-remove-one example (N is treated as public: q, the truncation size "
            "and δ's default are computed from it)"
        )
    else:
        sampler = (
            f"Fixed-size sampling: each update uses a uniformly random subset of exactly "
            f"{config.batch_size} of N = {n} examples, without replacement."
        )
        relation = "replace-one example (N is public; the clipped sum's sensitivity is 2C)"
    if config.privacy_unit == "user":
        sampler, relation, mechanism_unit = _user_level(config)
    deltas = [delta, delta / 10, delta * 10 if delta * 10 < 1 / n else delta / 100]
    eps_lines = [f"  ε = {config.epsilon(steps, d):.4g} at δ = {d:.3g}" for d in deltas]
    version = importlib.metadata.version("dp-accounting")
    mechanism = (
        f"Mechanism: each example's gradient clipped to L2 norm C = {config.l2_clip_norm:g}; "
        f"Gaussian noise σ·C with noise multiplier σ = {config.noise_multiplier:.6g} added "
        "to the clipped sum; divided by the expected batch size."
    )
    if config.clip_quantile is not None:
        mechanism = (
            f"Mechanism: adaptive clipping (Andrew et al. 2021): each example's gradient "
            f"clipped to L2 norm C_t (C_0 = {config.l2_clip_norm:g}, following quantile "
            f"{config.clip_quantile:g} of the norms); Gaussian noise with multiplier "
            f"{config.gradient_noise_multiplier:.6g} on the clipped sum and std "
            f"{config.count_noise:.4g} on the centred count of unclipped examples, together "
            f"one Gaussian mechanism of multiplier σ = {config.noise_multiplier:.6g}; divided "
            "by the expected batch size."
        )
    if config.correlated:
        coefs = bandmf.strategy(config.steps, config.bands)
        mechanism = (
            f"Mechanism: Amplified BandMF (correlated noise; Choquette-Choo et al. 2023): each "
            f"example's gradient clipped to L2 norm C = {config.l2_clip_norm:g}; the noise "
            f"of update t is σ·C·(C⁻¹z)_t for a {config.bands}-banded Toeplitz strategy "
            f"C (RMSE-optimal for {config.steps} steps, unit column norm; coefficients "
            f"{', '.join(f'{c:.4g}' for c in coefs[:4])}{', …' if len(coefs) > 4 else ''}), "
            f"z ~ N(0, I), σ = {config.noise_multiplier:.6g}; divided by the expected batch "
            f"size. Accounted as ceil(steps/b) rounds of the Poisson-subsampled Gaussian at "
            f"probability {config.group_probability:.6g}. The partition and the last b − 1 "
            "noise vectors are secret state saved with checkpoints until the plan is "
            "complete (or model.erase_dp_secrets()): such a checkpoint is as sensitive as "
            "the data."
        )
    if config.privacy_unit == "user":
        mechanism = mechanism.replace("each example's gradient", mechanism_unit, 1)
        if config.user_block:  # adaptive clipping counts the units whose norm was under C_t
            mechanism = mechanism.replace("unclipped examples", "unclipped users")
    accounted = f"Updates accounted: {steps} of {config.steps} planned."
    if lineage is not None and lineage < steps:
        accounted += (
            f" The weights took {lineage}; the other {steps - lineage} were computed after "
            "them in this process and are counted, since weights chosen after seeing later "
            "updates (a best checkpoint, a rollback) depend on them."
        )
    lines = [
        *([_PUBLIC_SEED] if public_seed else []),
        f"Differential privacy statement (keras_dp, {config.privacy_unit}-level "
        + ("BandMF)" if config.correlated else "DP-SGD)"),
        f"Sampler: {sampler}",
        f"Neighbouring relation: {relation}.",
        mechanism,
        accounted,
        f"Accountant: dp_accounting {version}, {config.accountant.upper()} "
        f"({type(config.dp_event(steps).event).__name__}).",
        *eps_lines,
        f"Target: ε ≤ {config.target_epsilon:g} at δ = {delta:.3g} for the whole plan.",
        _NOT_COVERED.format(unit=_UNIT_ASSUMED[config.privacy_unit]),
    ]
    return "\n".join(lines)


def _user_level(config: DPConfig) -> tuple[str, str, str]:
    """(sampler, relation, what is clipped) of a user-level plan."""
    k, n, q = config.examples_per_user, config.dataset_size, config.sampling_probability
    relation = (
        f"add-or-remove-one user with all their examples (privacy unit: user; each user "
        f"contributes at most k = {k} examples"
        + (
            " per update; a user with more brings a random k of them to each update"
            if config.user_block
            else " overall; users with more examples were subsampled to k"
        )
        + f"; N = {n} is treated as public)"
    )
    if config.user_block:
        b_max = config.max_batch_size
        sampler = (
            f"User-level Poisson sampling: each user joins each update independently with "
            f"probability q = {q:.6g} (expected {config.batch_size} users of N = {n})"
            + (f", truncated to at most {b_max} users" if b_max is not None else "")
            + f"; a sampled user contributes up to {k} of their examples, drawn at random "
            "at each update."
        )
        unit = (
            "each sampled user's gradient (of the mean loss over their examples in the "
            "update), as a whole,"
        )
        return sampler, relation, unit
    sampler = (
        f"Example-level sampling of user-bounded data: before training each user kept at "
        f"most {k} examples, chosen at random (secret seed); each kept example joins each "
        f"update independently with probability q = {q:.6g} (expected batch "
        f"{config.batch_size} of N = {n} kept examples), never truncated. A user's "
        f"contribution to one update is C·Binomial({k}, q), accounted as a mixture of "
        "Gaussians (Chua et al. 2024)."
    )
    return sampler, relation, "each example's gradient"
