"""DPConfig: what the user promises, validated before any noise is spent."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any

import dp_accounting

from keras_dp import accounting, calibration, validation


def default_delta(dataset_size: int) -> float:
    """The δ used when ``target_delta`` is None: ``min(1e-5, 0.1 / dataset_size)``.

    Always strictly below 1/dataset_size (at most a tenth of it).
    """
    return min(1e-5, 0.1 / dataset_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPConfig:
    """A differentially private training plan.

    The guarantee: the whole training run (all ``steps`` optimizer updates) is
    (ε, δ)-DP at the example level, with ε ≤ ``target_epsilon`` at
    ``delta``. With "poisson" sampling neighbouring datasets differ by adding or
    removing one example; with "fixed" sampling by replacing one example. Each
    example's gradient is clipped to L2 norm ``l2_clip_norm`` (C), the clipped
    gradients are summed, N(0, (σ·C)²) noise is added to the sum, and the result is
    divided by the *expected* batch size.

    Attributes:
      target_epsilon: The ε the whole run may spend (> 0). At most 1000 when σ is
        to be calibrated (``accounting.MAX_TARGET_EPSILON``). ``math.inf`` only
        together with ``noise_multiplier=0``: an explicit non-private debug run.
      target_delta: The δ of the guarantee. None: ``default_delta(dataset_size)``,
        ``min(1e-5, 0.1/N)``, strictly below 1/N. Must be < 1/dataset_size.
      l2_clip_norm: C, the L2 norm each example's whole gradient is clipped to.
      batch_size: The *expected* number of examples per optimizer update (B). With
        Poisson sampling the actual count varies around it.
      epochs: Planned passes over the data; an epoch is N/B expected steps, and the
        plan is ``round(epochs * N / B)`` updates in total (a fractional N/B is
        not rounded per epoch: fit spreads the remainder so that the total is
        exact). Give ``epochs`` or ``steps``; both only if they agree.
      steps: Planned optimizer updates in total. Filled in from ``epochs`` once
        ``dataset_size`` is known.
      dataset_size: N, the number of examples (privacy units). None until
        ``calibrate`` or ``fit`` learns it from the data.
      sampling: "poisson" (default: each example joins each step independently
        with probability q = B/N; the batch is truncated to ``max_batch_size``
        rows, one XLA shape) or "fixed" (a uniform subset of exactly B examples).
      accountant: "pld" (default; exact for truncated Poisson) or "rdp". "fixed"
        sampling is accounted with "rdp" only.
      noise_multiplier: σ, the noise standard deviation in units of C. None: filled
        in by ``calibrate``. 0 only with ``target_epsilon=math.inf``.
      microbatch_size: Examples per chunk inside one update (memory only: the
        update, and ε, do not depend on it), per device. None: chosen for the
        platform: B/4 on CPU (chunks of padding are skipped; with ghost norms, a
        model of ≤ 1 MFLOP an example runs the whole batch in one pass); on GPU/TPU the
        device's whole physical batch in one pass (with per-example clipping: if
        its per-example gradients fit in 1 GiB).
      seed: Seed of the sampler and the noise. None: drawn from a secure source
        when training starts. A fixed seed makes the noise known: for tests only
        (the run is then reported as not private).
      clip_quantile: None (default): C is fixed at ``l2_clip_norm``. A number γ in
        (0, 1): adaptive clipping (Andrew et al. 2021): ``l2_clip_norm`` is the
        initial C, and after each update C ← C·exp(−η(b̃ − γ)), where b̃ is the
        privatised fraction of the batch's examples whose gradient norm was at most
        C. The count is released with Gaussian noise ``clip_count_noise``, and the
        gradient gets noise ``gradient_noise_multiplier`` (more than σ), so that the
        two together are exactly one Gaussian mechanism of noise multiplier σ: the
        same ε as fixed clipping at σ.
      clip_learning_rate: η, the geometric step of adaptive clipping (0.2 in the
        paper).
      clip_count_noise: σ_b, the noise std of the unclipped count. None: B/20 (the
        paper's choice). Must exceed σ/2.
      noise: "independent" (default: DP-SGD, fresh noise every update) or "bandmf"
        (Amplified banded matrix factorization, Choquette-Choo et al. 2023: the
        noise of update t is (C⁻¹z)_t for a b-banded Toeplitz strategy C with unit
        column norm, so it is correlated over the last ``bands`` updates and much of
        it cancels in the weights). With "bandmf" the examples are split at random
        (each independently, uniformly) into ``bands`` groups once per run, and
        update t Poisson-samples group t mod b with probability b·B/N (expected batch
        still B); an example is thus in at most one update of every b, and the run
        is accounted as ceil(steps/b) Poisson-subsampled Gaussian rounds of noise σ
        at probability b·B/N, under add-or-remove-one. Poisson sampling only; not
        with adaptive clipping. Its draws are not truncated (B_max is exceeded with
        chance ≤ 1e-6·δ over the run, and then one larger step is compiled).
      privacy_unit: "example" (default: neighbouring datasets differ in one example) or
        "user" (they differ in one user's whole data: ``fit(..., user_ids=ids)``).
      user_sampling: With ``privacy_unit="user"``: "uls" (default; user-level
        sampling: each update Poisson-samples *users* with q = B/N, N the number of
        users and ``batch_size`` the expected number of users; each sampled user
        contributes up to ``examples_per_user`` of their examples, drawn at random at
        each update; the user's gradient is that of the *mean* loss over those
        examples, clipped as a whole to C; accounted exactly as example level, over
        users) or "els" (example-level sampling: before training each user keeps at
        most ``examples_per_user`` examples, chosen at random with the secret seed;
        examples are Poisson-sampled with q = B/N, N the kept examples, and clipped
        one by one; a user's contribution to one update is C times a
        Binomial(k, q) count, accounted with dp_accounting's
        ``MixtureOfGaussiansDpEvent`` (Chua et al. 2024); never truncated; PLD only).
      examples_per_user: k, the bound on each user's examples (per update for "uls",
        overall for "els"). Required with ``privacy_unit="user"``.
      bands: b, the number of bands of the "bandmf" strategy (1: exactly DP-SGD, the
        same sampler, events, ε and weights). Needs b·batch_size <= dataset_size.
        Costs (b − 1) float32 copies of the trainable variables as noise state.
      clipping: How each unit's gradient norm is found; the update, its sensitivity
        C and ε are the same whichever is used. "per_example": every per-example
        gradient is formed (``jax.vmap``), in chunks of ``microbatch_size``.
        "ghost": the kernels and biases of Dense, EinsumDense (LoRA included),
        Embedding (a tied ReversibleEmbedding's table through its lookup and its
        logits), Conv1D/2D/3D, DepthwiseConv1D/2D and SeparableConv1D/2D layers get
        their norms from each layer's input and output
        gradient, and their clipped sum from one contraction over the examples
        (Goodfellow 2015, Li et al. 2022): no per-example gradient of them is formed
        but where it is their norm's cheaper form (then it is kept for the sum);
        every other trainable variable (normalisation scales, a layer this cannot
        see into) gets per-example gradients in the same backward pass,
        and one log line names them. "auto" (default): "ghost" for the variables
        where its norm costs no more than their per-example gradient; "per_example"
        with user-level "uls" (a unit is a block of examples), and on a CPU where
        ghost norms cost more than the per-example gradients they replace (a CNN
        whose convolutions run over many positions,
        :func:`keras_dp.ghost_cost.ghost_pays`; a tied table).
    """

    target_epsilon: float
    l2_clip_norm: float = 1.0
    batch_size: int
    epochs: float | None = None
    steps: int | None = None
    target_delta: float | None = None
    dataset_size: int | None = None
    sampling: str = "poisson"
    accountant: str = "pld"
    noise_multiplier: float | None = None
    microbatch_size: int | None = None
    seed: int | None = None
    clip_quantile: float | None = None
    clip_learning_rate: float = 0.2
    clip_count_noise: float | None = None
    noise: str = "independent"
    bands: int = 1
    privacy_unit: str = "example"
    user_sampling: str = "uls"
    examples_per_user: int | None = None
    clipping: str = "auto"
    # Bookkeeping so that dataclasses.replace keeps working: the steps derived from
    # epochs, and the plan a noise multiplier was calibrated for.
    _derived_steps: int | None = dataclasses.field(default=None, repr=False, compare=False)
    _calibrated_for: tuple | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        validation.check_choices(self)
        validation.check_numbers(self)
        self._derive_steps()
        validation.check_length(self)
        validation.check_noise(self)
        self._forget_stale_calibration()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _derive_steps(self) -> None:
        if self.epochs is None or self.dataset_size is None:
            if self.steps is not None and self.steps == self._derived_steps:
                self._set("steps", None)  # derived from a dataset size no longer given
                self._set("_derived_steps", None)
            return
        planned = validation.planned_steps(self)
        self._set("steps", planned)
        self._set("_derived_steps", planned)

    def _plan_key(self) -> tuple:
        """Every field that the plan's dp_accounting event, and so σ, depends on."""
        return (
            self.target_epsilon,
            self.delta,
            self.batch_size,
            self.steps,
            self.dataset_size,
            self.sampling,
            self.accountant,
            self.noise,
            self.bands,
            self.privacy_unit,
            self.user_sampling,
            self.examples_per_user,
        )

    def _forget_stale_calibration(self) -> None:
        calibrated = self._calibrated_for
        if calibrated is None:
            return
        key, sigma = calibrated
        if self.noise_multiplier != sigma:
            self._set("_calibrated_for", None)  # the user set σ themselves
        elif key != self._plan_key():
            self._set("noise_multiplier", None)  # σ was for another plan: recalibrate
            self._set("_calibrated_for", None)

    # Derived quantities ---------------------------------------------------------

    @property
    def delta(self) -> float | None:
        """The δ of the guarantee (``target_delta`` or the default once N is known)."""
        if self.target_delta is not None:
            return self.target_delta
        return None if self.dataset_size is None else default_delta(self.dataset_size)

    @property
    def sampling_probability(self) -> float | None:
        """q = batch_size / dataset_size (None until dataset_size is known)."""
        return None if self.dataset_size is None else self.batch_size / self.dataset_size

    @property
    def user_block(self) -> int | None:
        """k when a row is one user's block of up to k examples (user-level "uls")."""
        if self.privacy_unit == "user" and self.user_sampling == "uls":
            return self.examples_per_user
        return None

    @property
    def ghost_clipping(self) -> bool:
        """True when norms may come from activations (``clipping`` "auto" or "ghost"
        with an example as the unit a row holds)."""
        return self.clipping != "per_example" and self.user_block is None

    @property
    def example_sampled_users(self) -> bool:
        """True for user-level DP with example-level sampling ("els")."""
        return self.privacy_unit == "user" and self.user_sampling == "els"

    @property
    def correlated(self) -> bool:
        """True for correlated noise (``noise="bandmf"`` with ``bands > 1``)."""
        return self.noise == "bandmf" and self.bands > 1

    @property
    def group_probability(self) -> float | None:
        """The probability b·B/N with which update t samples each example of its group."""
        return (
            None if self.dataset_size is None else self.bands * self.batch_size / self.dataset_size
        )

    @property
    def count_noise(self) -> float | None:
        """σ_b of adaptive clipping's count (None when C is fixed)."""
        if self.clip_quantile is None:
            return None
        return self.clip_count_noise if self.clip_count_noise is not None else self.batch_size / 20

    @property
    def gradient_noise_multiplier(self) -> float | None:
        """The noise multiplier on the clipped gradient sum: σ, or with adaptive
        clipping σ_Δ = (σ⁻² − (2σ_b)⁻²)^(-1/2), so that gradient and count together are
        one Gaussian mechanism of multiplier σ (Andrew et al. 2021, Theorem 1)."""
        sigma = self.noise_multiplier
        if sigma is None or self.clip_quantile is None or sigma == 0:
            return sigma
        share = sigma**-2 - (2 * self.count_noise) ** -2
        if share <= 0:
            raise validation.bad(
                "clip_count_noise",
                self.count_noise,
                f"adaptive clipping needs 2·clip_count_noise > σ = {sigma:.4g}; pass "
                f"clip_count_noise > {sigma / 2:.4g} (or a larger batch_size: the "
                "default is B/20).",
            )
        return share**-0.5

    @property
    def neighboring_relation(self) -> dp_accounting.NeighboringRelation:
        """ADD_OR_REMOVE_ONE for "poisson", REPLACE_ONE for "fixed"."""
        return accounting.neighboring_relation(self.sampling)

    @property
    def max_batch_size(self) -> int | None:
        """Most real examples in one update: the truncation size B_max.

        "poisson" + "pld": the truncated-Poisson B_max of
        :func:`keras_dp.accounting.truncated_batch_size`. "poisson" + "rdp": None
        (the RDP accountant assumes no truncation, so the sampler must not
        truncate). "fixed": ``batch_size``.
        """
        if self.sampling == "fixed":
            return self.batch_size
        if (
            self.correlated
            or self.accountant == "rdp"
            or self.dataset_size is None
            or self.steps is None
        ):
            return None
        return accounting.truncated_batch_size(
            self.dataset_size, self.sampling_probability, self.steps, self.delta
        )

    @property
    def is_calibrated(self) -> bool:
        """True when the dataset size and a noise multiplier for this plan are set."""
        return self.dataset_size is not None and self.noise_multiplier is not None

    # Accounting -----------------------------------------------------------------

    def _require(self, what: str) -> None:
        if self.dataset_size is None:
            raise ValueError(
                f"DPConfig.{what} needs dataset_size; pass dataset_size= or call "
                "config.calibrate(dataset_size=N) first."
            )
        if self.steps is None:
            raise ValueError(f"DPConfig.{what} needs steps= or epochs=.")

    def dp_event(self, steps: int | None = None) -> dp_accounting.DpEvent:
        """The dp_accounting event of ``steps`` updates (default: the whole plan)."""
        self._require("dp_event")
        if self.noise_multiplier is None:
            raise ValueError(
                "DPConfig.dp_event needs noise_multiplier; call config.calibrate() first."
            )
        steps = self.steps if steps is None else steps
        if not validation.is_int(steps) or steps < 0:
            raise ValueError(f"steps={steps!r} is invalid: pass a non-negative integer.")
        return accounting.plan_event(self, self.noise_multiplier, steps)

    def epsilon(self, steps: int | None = None, delta: float | None = None) -> float:
        """ε spent after ``steps`` updates (default: the plan) at ``delta``."""
        event = self.dp_event(steps)
        if event.count == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf  # no noise (an explicit non-private debug run)
        delta = self.delta if delta is None else delta
        return accounting.epsilon(event, delta, self.accountant, self.neighboring_relation)

    def calibrate(self, dataset_size: int | None = None) -> DPConfig:
        """A config with ``dataset_size`` and the noise multiplier filled in.

        Without a user-given ``noise_multiplier``, σ is the smallest (to ~0.1%) for
        which ``epsilon() <= target_epsilon``. A user-given σ is validated instead: a
        σ that overspends raises, naming the σ or the number of steps that would fit.
        """
        config = self
        if dataset_size is not None and dataset_size != self.dataset_size:
            if self.dataset_size is not None:
                raise validation.bad(
                    "dataset_size",
                    self.dataset_size,
                    f"the data has {dataset_size} examples; pass dataset_size="
                    f"{dataset_size} (or None) in the config.",
                )
            config = self._replace(dataset_size=dataset_size)
        config._require("calibrate")
        if config.noise_multiplier is not None:
            if config._calibrated_for is None:
                calibration.check_user_noise(config)
            return config
        key = config._plan_key()
        try:
            sigma = calibration.remembered_noise_multiplier(
                key,
                lambda s: accounting.plan_event(config, s, config.steps),
                config.target_epsilon,
                config.delta,
                config.accountant,
                config.neighboring_relation,
            )
        except accounting.UnreachableEpsilon as err:  # name the field
            raise validation.bad("target_epsilon", config.target_epsilon, str(err)) from err
        except accounting.UnresolvedDelta as err:
            raise validation.bad("target_delta", config.delta, str(err)) from err
        return config._replace(noise_multiplier=sigma, _calibrated_for=(key, sigma))

    def _replace(self, **changes) -> DPConfig:
        """``dataclasses.replace`` for keras_dp's own copies: validated again, but a
        non-private debug plan is not warned about again (the user's line was)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", re.escape(validation.NON_PRIVATE))
            return dataclasses.replace(self, **changes)

    def max_steps_within(self, epsilon: float, delta: float | None = None) -> int:
        """The most updates (up to the plan's) whose ε at ``delta`` is ≤ ``epsilon``."""
        return calibration.most_steps_within(lambda n: self.epsilon(n, delta), self.steps, epsilon)


_dataclass_init = DPConfig.__init__


def _init_with_hints(self, *args, **kwargs):
    validation.check_field_names(kwargs, {f.name for f in dataclasses.fields(DPConfig)})
    _dataclass_init(self, *args, **kwargs)


_init_with_hints.__doc__ = _dataclass_init.__doc__
_init_with_hints.__signature__ = __import__("inspect").signature(_dataclass_init)
DPConfig.__init__ = _init_with_hints
