"""DPConfig's validation: every field checked, each error naming the field and the fix.

Run by ``DPConfig.__post_init__`` (and by ``calibrate`` for a user-given σ), so a plan
that cannot be analysed is refused when it is made, before any data is read or any
noise is spent.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

from keras_dp import accounting

# C's range: the step clips and adds σ·C·N(0, 1) in float32 (σ up to 1e6), so σ·C stays
# finite and C above float32's smallest normal number.
L2_CLIP_NORM_RANGE = (1e-30, 1e30)


def bad(field: str, value: Any, fix: str) -> ValueError:
    """The error for ``DPConfig.<field>=value``, ending with what to pass instead."""
    return ValueError(f"DPConfig.{field}={value!r} is invalid: {fix}")


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_choices(config) -> None:
    """The named choices (clipping, sampling, accountant, noise, bands) and the
    combinations that are analysed."""
    if config.clipping not in ("auto", "ghost", "per_example"):
        raise bad(
            "clipping",
            config.clipping,
            "pass 'auto' (default), 'ghost' or 'per_example'.",
        )
    if (
        config.clipping == "ghost"
        and config.privacy_unit == "user"
        and config.user_sampling == "uls"
    ):
        raise bad(
            "clipping",
            config.clipping,
            "user-level 'uls' clips a block of examples as one unit, which ghost "
            "norms do not cover; pass clipping='auto' or 'per_example'.",
        )
    if config.sampling not in accounting.SAMPLINGS:
        raise bad("sampling", config.sampling, "pass 'poisson' (default) or 'fixed'.")
    if config.accountant not in accounting.ACCOUNTANTS:
        raise bad("accountant", config.accountant, "pass 'pld' (default) or 'rdp'.")
    if config.noise not in accounting.NOISES:
        raise bad("noise", config.noise, "pass 'independent' (DP-SGD, default) or 'bandmf'.")
    if not is_int(config.bands) or config.bands < 1:
        raise bad("bands", config.bands, "pass a positive integer number of bands (1: DP-SGD).")
    if config.bands > 1 and config.noise != "bandmf":
        raise bad("bands", config.bands, "bands apply to correlated noise; pass noise='bandmf'.")
    if config.noise == "bandmf" and config.sampling != "poisson":
        raise bad(
            "sampling",
            config.sampling,
            "noise='bandmf' is analysed for cyclic Poisson sampling only (Amplified "
            "BandMF); pass sampling='poisson'.",
        )
    if config.noise == "bandmf" and config.clip_quantile is not None:
        raise bad(
            "clip_quantile",
            config.clip_quantile,
            "adaptive clipping's count noise is not analysed together with correlated "
            "noise; pass clip_quantile=None with noise='bandmf'.",
        )
    check_unit(config)
    if config.sampling == "fixed" and config.accountant != "rdp":
        raise bad(
            "accountant",
            config.accountant,
            "sampling='fixed' (subsets without replacement) can only be accounted "
            "with accountant='rdp'; pass accountant='rdp', or sampling='poisson'.",
        )


def check_unit(config) -> None:
    """The privacy unit and, at user level, the bound k and what it is analysed with."""
    if config.privacy_unit not in ("example", "user"):
        raise bad("privacy_unit", config.privacy_unit, "pass 'example' (default) or 'user'.")
    if config.user_sampling not in ("uls", "els"):
        raise bad(
            "user_sampling",
            config.user_sampling,
            "pass 'uls' (sample users, default) or 'els' (sample examples).",
        )
    k = config.examples_per_user
    if config.privacy_unit == "example":
        if k is not None:
            raise bad(
                "examples_per_user",
                k,
                "it bounds a user's examples; pass privacy_unit='user' (and "
                "fit(..., user_ids=...)), or examples_per_user=None.",
            )
        return
    if not is_int(k) or k < 1:
        raise bad(
            "examples_per_user",
            k,
            "user-level DP needs the bound k on each user's examples: pass a positive "
            "integer such as 8.",
        )
    if config.sampling != "poisson":
        raise bad("sampling", config.sampling, "user-level DP is analysed here for 'poisson' only.")
    if config.noise != "independent":
        raise bad(
            "noise",
            config.noise,
            "correlated noise is not analysed at user level here; pass "
            "noise='independent' with privacy_unit='user'.",
        )
    if config.user_sampling == "els":
        if config.accountant != "pld":
            raise bad(
                "accountant",
                config.accountant,
                "user_sampling='els' is accounted with a mixture of Gaussians, "
                "which only the PLD accountant computes; pass accountant='pld'.",
            )
        if config.clip_quantile is not None:
            raise bad(
                "clip_quantile",
                config.clip_quantile,
                "adaptive clipping's count is per example, and a user may have k of "
                "them in one update under 'els'; pass clip_quantile=None, or "
                "user_sampling='uls' (one count per user).",
            )


def check_numbers(config) -> None:
    """Every number: ε, C, B, the length of training, N, δ and the adaptive
    clipping's parameters."""
    eps = config.target_epsilon
    if not is_real(eps) or math.isnan(eps) or eps <= 0:
        raise bad(
            "target_epsilon",
            eps,
            "pass a positive number such as 3.0 (math.inf only for a non-private "
            "debug run with noise_multiplier=0).",
        )
    if (
        config.noise_multiplier is None
        and math.isfinite(eps)
        and eps > accounting.MAX_TARGET_EPSILON
    ):
        raise bad(
            "target_epsilon",
            eps,
            f"above {accounting.MAX_TARGET_EPSILON:g} ε bounds nothing meaningful (e^ε "
            "exceeds any odds), and no σ is calibrated for it. Pass target_epsilon <= "
            f"{accounting.MAX_TARGET_EPSILON:g}, or for a non-private run "
            "target_epsilon=math.inf with noise_multiplier=0.",
        )
    clip = config.l2_clip_norm
    if not is_real(clip) or not math.isfinite(clip) or clip <= 0:
        raise bad("l2_clip_norm", clip, "pass a positive finite number such as 1.0.")
    if not L2_CLIP_NORM_RANGE[0] <= clip <= L2_CLIP_NORM_RANGE[1]:
        raise bad(
            "l2_clip_norm",
            clip,
            f"pass a number in [{L2_CLIP_NORM_RANGE[0]:g}, {L2_CLIP_NORM_RANGE[1]:g}] such "
            "as 1.0: the step clips and adds the noise σ·C in float32, where a larger C "
            "overflows (NaN weights) and a smaller one rounds to 0 (nothing trains).",
        )
    if not is_int(config.batch_size) or config.batch_size < 1:
        raise bad("batch_size", config.batch_size, "pass a positive integer such as 256.")
    if config.epochs is not None and (
        not is_real(config.epochs) or not math.isfinite(config.epochs) or config.epochs <= 0
    ):
        raise bad("epochs", config.epochs, "pass a positive number of passes, or steps=.")
    if config.steps is not None and (not is_int(config.steps) or config.steps < 1):
        raise bad("steps", config.steps, "pass a positive integer number of updates.")
    if config.epochs is None and config.steps is None:
        raise ValueError(
            "DPConfig needs the length of training to account for it: pass epochs= "
            "(passes over the data) or steps= (optimizer updates)."
        )
    n = config.dataset_size
    if n is not None:
        if not is_int(n) or n < 1:
            raise bad("dataset_size", n, "pass the number of training examples (> 0).")
        if config.batch_size > n:
            raise bad(
                "batch_size",
                config.batch_size,
                f"it exceeds dataset_size={n}; pass batch_size <= {n}.",
            )
        if config.bands * config.batch_size > n:
            raise bad(
                "bands",
                config.bands,
                f"each of the b groups of about N/b examples must hold the expected "
                f"batch of {config.batch_size}; pass bands <= {n // config.batch_size} "
                "(dataset_size // batch_size) or a smaller batch_size.",
            )
    delta = config.target_delta
    if delta is not None:
        if not is_real(delta) or math.isnan(delta) or not 0 < delta < 1:
            raise bad("target_delta", delta, "pass a number in (0, 1), e.g. 1e-5, or None.")
        if delta < accounting.MIN_TARGET_DELTA:
            raise bad(
                "target_delta",
                delta,
                f"a δ below {accounting.MIN_TARGET_DELTA:g} guards against nothing more and "
                "underflows the accounting; pass e.g. 1e-5, or None.",
            )
        if n is not None and delta >= 1 / n:
            raise bad(
                "target_delta",
                delta,
                f"δ must be below 1/dataset_size = {1 / n:.3g} (a larger δ allows "
                f"releasing whole examples); pass target_delta <= {0.1 / n:.2g} or None.",
            )
    if config.microbatch_size is not None and (
        not is_int(config.microbatch_size) or config.microbatch_size < 1
    ):
        raise bad("microbatch_size", config.microbatch_size, "pass a positive integer or None.")
    quantile = config.clip_quantile
    if quantile is not None and (not is_real(quantile) or not 0 < quantile < 1):
        raise bad("clip_quantile", quantile, "pass a quantile in (0, 1) such as 0.5, or None.")
    rate = config.clip_learning_rate
    if not is_real(rate) or not math.isfinite(rate) or rate <= 0:
        raise bad("clip_learning_rate", rate, "pass a positive step such as 0.2.")
    count_noise = config.clip_count_noise
    if count_noise is not None and (
        not is_real(count_noise) or not math.isfinite(count_noise) or count_noise <= 0
    ):
        raise bad("clip_count_noise", count_noise, "pass a positive std, or None (B/20).")
    if config.seed is not None and (not is_int(config.seed) or config.seed < 0):
        raise bad("seed", config.seed, "pass a non-negative integer, or None for a secure seed.")


NON_PRIVATE = (
    "DPConfig(noise_multiplier=0, target_epsilon=inf): this run is NOT differentially "
    "private (clipping only, no noise)."
)


def check_length(config) -> None:
    """A plan the PLD accountant can compose: at most ``MAX_PLD_STEPS`` rounds, checked
    as soon as ``steps`` is known (given, or derived once N is); a non-private plan is
    not accounted. A round is an update, or b updates under BandMF."""
    steps, most = config.steps, accounting.MAX_PLD_STEPS
    if steps is None or config.accountant != "pld" or math.isinf(config.target_epsilon):
        return
    rounds = -(-steps // config.bands) if config.correlated else steps
    if rounds <= most:
        return
    field, value = ("epochs", config.epochs) if config.epochs is not None else ("steps", steps)
    count = f"{steps:,}" if steps < 10**15 else f"about 10^{len(str(steps)) - 1}"
    raise bad(
        field,
        value,
        f"the plan has {count} updates, and the PLD accountant composes each one: "
        f"beyond {most:,} that takes minutes, or never ends. Plan fewer updates (fewer "
        "epochs or a larger batch_size); for example-level DP-SGD, accountant='rdp' "
        "accounts long plans at once (a looser bound).",
    )


def check_noise(config) -> None:
    """σ: none only with an explicit non-private plan (ε = ∞), which warns."""
    sigma = config.noise_multiplier
    if sigma is not None and (not is_real(sigma) or not math.isfinite(sigma) or sigma < 0):
        raise bad("noise_multiplier", sigma, "pass a positive number, or None to calibrate it.")
    if sigma is not None and sigma > accounting.NOISE_MULTIPLIER_RANGE[1]:
        raise bad(
            "noise_multiplier",
            sigma,
            f"no plan needs more noise than σ={accounting.NOISE_MULTIPLIER_RANGE[1]:g} "
            "(the calibration searches below it, and the accountant cannot compute far "
            "above it); pass a smaller σ, or None to calibrate it for target_epsilon.",
        )
    if math.isinf(config.target_epsilon):
        if sigma is None:
            raise bad(
                "target_epsilon",
                config.target_epsilon,
                "an infinite budget would calibrate to no noise; for a non-private "
                "debug run pass noise_multiplier=0 explicitly, else a finite ε.",
            )
        if sigma == 0:
            warnings.warn(NON_PRIVATE, stacklevel=5)  # at the line that made the DPConfig
    elif sigma == 0:
        raise bad(
            "noise_multiplier",
            sigma,
            "no noise gives no privacy; pass None to calibrate σ for target_epsilon, "
            "or target_epsilon=math.inf for an explicit non-private debug run.",
        )


def planned_steps(config) -> int:
    """The updates ``epochs`` plans over ``dataset_size`` at ``batch_size``:
    ``round(epochs·N/B)``, at least one, and equal to ``steps`` if the user gave both.
    (``config._derived_steps`` is the value derived before, which is not the user's.)"""
    planned = round(config.epochs * config.dataset_size / config.batch_size)
    if planned < 1:
        raise bad(
            "epochs",
            config.epochs,
            f"it plans 0 updates over dataset_size={config.dataset_size} at "
            f"batch_size={config.batch_size}; raise epochs or lower batch_size.",
        )
    user_steps = config.steps is not None and config.steps != config._derived_steps
    if user_steps and config.steps != planned:
        raise bad(
            "steps",
            config.steps,
            f"epochs={config.epochs} over dataset_size={config.dataset_size} at "
            f"batch_size={config.batch_size} plans {planned} updates; give only "
            "one of epochs and steps (or make them agree).",
        )
    return planned


# Names other DP libraries use for DPConfig's fields (TF Privacy, Opacus, jax-privacy).
OTHER_NAMES = {
    "l2_norm_clip": "l2_clip_norm",
    "max_grad_norm": "l2_clip_norm",
    "clipping_norm": "l2_clip_norm",
    "clip_norm": "l2_clip_norm",
    "delta": "target_delta",
    "epsilon": "target_epsilon",
    "target_eps": "target_epsilon",
    "num_microbatches": "microbatch_size",
    "sample_rate": "batch_size (expected examples per update; q = batch_size / dataset_size)",
    "num_epochs": "epochs",
    "train_steps": "steps",
    "num_examples": "dataset_size",
}


def check_field_names(kwargs: dict, known: set) -> None:
    """Refuses a field DPConfig does not have, naming ours where another library's
    name was used (``max_grad_norm`` → ``l2_clip_norm``)."""
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        hints = [
            f"{k!r} (did you mean {OTHER_NAMES[k]}?)" if k in OTHER_NAMES else repr(k)
            for k in unknown
        ]
        public = sorted(k for k in known if not k.startswith("_"))
        raise TypeError(
            f"DPConfig got unknown field(s) {', '.join(hints)}. Its fields are: "
            f"{', '.join(public)}."
        )
