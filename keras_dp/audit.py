"""Empirical privacy audit: a lower bound on ε measured beside the accounted ε.

The accountant's ε is an upper bound that holds only if the code does what the
accountant assumes. An audit tests the code: it inserts canaries into the
training data (each included or held out by a seeded fair coin), trains, scores
every canary with a loss-based membership score, and turns how well the scores
separate included from held-out canaries into an ε lower bound at a stated
confidence. If the lower bound exceeds the accounted ε, the implementation is
broken (or the confidence level failed, which happens with probability at most
1 - confidence).

The bounds come from jax-privacy's ``auditing.CanaryScoreAuditor`` (install
``keras-dp[audit]``): the one-run method of Steinke, Nasr & Jagielski (2023),
and the classic membership-inference bound from TPR/FPR with Clopper–Pearson
intervals. keras_dp supplies the canary pipeline around Keras ``fit``.

A lower bound from one training run with few canaries is loose: a DP run at ε
will usually audit far below ε. Its use is to catch gross errors (missing noise,
a wrong σ, sampling that is not what is accounted), not to certify ε.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import keras
import numpy as np

from keras_dp.config import DPConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """What an audit measured.

    Attributes:
      accounted_epsilon: The ε the accountant reports for the run (``inf`` when
        the run was not private).
      delta: The δ of both the accounted ε and the lower bounds.
      epsilon_one_run: The one-run lower bound (Steinke et al. 2023).
      epsilon_clopper_pearson: The membership-inference lower bound from the best
        TPR/FPR threshold, with Clopper–Pearson intervals (Bonferroni over
        thresholds).
      confidence: Both lower bounds hold together with at least this probability
        (each is computed at (1 - confidence) / 2, a Bonferroni correction), so
        ``epsilon_lower_bound`` does too.
      auroc: Area under the attack's ROC curve (0.5: no better than chance).
      tpr_at_fpr: The attack's true-positive rate at a few false-positive rates.
      in_scores: Membership scores of the included canaries (higher: more "in").
      out_scores: Membership scores of the held-out canaries.
    """

    accounted_epsilon: float
    delta: float
    epsilon_one_run: float
    epsilon_clopper_pearson: float
    confidence: float
    auroc: float
    tpr_at_fpr: dict
    in_scores: np.ndarray = dataclasses.field(repr=False)
    out_scores: np.ndarray = dataclasses.field(repr=False)

    @property
    def epsilon_lower_bound(self) -> float:
        """The larger of the two lower bounds."""
        return max(self.epsilon_one_run, self.epsilon_clopper_pearson)

    @property
    def consistent(self) -> bool:
        """False when the measured lower bound exceeds the accounted ε: a bug."""
        return self.epsilon_lower_bound <= self.accounted_epsilon

    def summary(self) -> str:
        return (
            f"accounted ε = {self.accounted_epsilon:.3g} (δ = {self.delta:.2g}); empirical "
            f"lower bound at {self.confidence:.0%} confidence: one-run "
            f"{self.epsilon_one_run:.3g}, membership inference "
            f"{self.epsilon_clopper_pearson:.3g}; attack AUROC {self.auroc:.3f}"
            + ("" if self.consistent else "  ← EXCEEDS the accounted ε")
        )

    def plot(self, path: str | None = None, title: str | None = None):
        """The attack's ROC curve and score histograms; saved to ``path`` if given."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fpr, tpr = roc_curve(self.in_scores, self.out_scores)
        fig, (roc, hist) = plt.subplots(1, 2, figsize=(9, 3.6))
        roc.loglog(np.maximum(fpr, 1e-3), np.maximum(tpr, 1e-3), label="attack")
        roc.loglog([1e-3, 1], [1e-3, 1], "k:", label="chance")
        if np.isfinite(self.accounted_epsilon):
            grid = np.logspace(-3, 0, 50)  # the best (ε, δ)-DP tradeoff: TPR ≤ e^ε FPR + δ
            bound = np.minimum(1, np.exp(self.accounted_epsilon) * grid + self.delta)
            roc.loglog(
                grid, bound, "r--", label=f"limit at accounted ε={self.accounted_epsilon:.2g}"
            )
        roc.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC")
        roc.legend(fontsize=8)
        bins = np.histogram_bin_edges(np.concatenate([self.in_scores, self.out_scores]), 30)
        hist.hist(self.in_scores, bins, alpha=0.6, label="included canaries")
        hist.hist(self.out_scores, bins, alpha=0.6, label="held-out canaries")
        hist.set(xlabel="membership score (−loss)", title="scores")
        hist.legend(fontsize=8)
        fig.suptitle(title or self.summary(), fontsize=9)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return fig


def roc_curve(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of the rule "in if score ≥ t", over every threshold t."""
    thresholds = np.unique(np.concatenate([in_scores, out_scores]))[::-1]
    tpr = np.array([np.mean(in_scores >= t) for t in thresholds])
    fpr = np.array([np.mean(out_scores >= t) for t in thresholds])
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def dp_roc_limit(fpr: np.ndarray, epsilon: float, delta: float) -> np.ndarray:
    """The highest TPR any membership test can reach at ``fpr`` against an (ε, δ)-DP run:
    TPR ≤ e^ε·FPR + δ and 1 − FPR ≤ e^ε·(1 − TPR) + δ."""
    fpr = np.asarray(fpr, np.float64)
    limit = np.minimum(np.exp(epsilon) * fpr + delta, 1 - np.exp(-epsilon) * (1 - fpr - delta))
    return np.clip(limit, 0, 1)


def random_label_canaries(
    x: np.ndarray, num_classes: int, num_canaries: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-distribution canaries: Gaussian inputs with the data's per-feature mean
    and spread, each with a uniformly random label."""
    rng = np.random.default_rng([seed, 0xCA7])
    x = np.asarray(x, np.float32)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    inputs = (mean + std * rng.normal(size=(num_canaries, *x.shape[1:]))).astype(np.float32)
    return inputs, rng.integers(0, num_classes, num_canaries)


def loss_scores(model: keras.Model, x, y, batch_size: int = 256) -> np.ndarray:
    """Membership score of each example: minus its loss under ``model``'s compiled loss."""
    loss = model.loss
    loss_fn = keras.losses.get(loss) if isinstance(loss, str) else loss
    if isinstance(loss_fn, keras.losses.Loss):
        loss_fn = loss_fn.call  # per-example values, no reduction
    predictions = model.predict(x, batch_size=batch_size, verbose=0)
    per_example = np.asarray(loss_fn(np.asarray(y), predictions))
    return -per_example.reshape(len(per_example), -1).mean(axis=1)


def run(
    build_model: Callable[[], keras.Model],
    data: tuple,
    config: DPConfig | None,
    num_canaries: int = 200,
    canaries: tuple | None = None,
    confidence: float = 0.95,
    private: bool = True,
    seed: int = 0,
    score_fn: Callable = loss_scores,
    user_ids=None,
    canary_examples: int = 1,
    **fit_kwargs,
) -> AuditReport:
    """Trains once with canaries and measures an ε lower bound beside the accounted ε.

    Args:
      build_model: Returns a new *compiled* Keras model (loss and optimizer set).
      data: ``(x, y)`` training arrays.
      config: The DP plan; its ``dataset_size`` must be None (the training set
        grows by the included canaries). With ``private=False`` only its
        ``batch_size`` and ``epochs`` are used, for a plain Keras fit.
      num_canaries: Canaries made when ``canaries`` is None (random-label,
        out-of-distribution inputs; see :func:`random_label_canaries`).
      canaries: ``(x_canary, y_canary)`` to use instead.
      confidence: The probability with which both lower bounds hold together.
      private: False trains without DP (a control that should audit high).
      seed: Seeds the canaries and the in/out coin (not the DP noise).
      score_fn: ``(model, x, y) -> scores``, higher meaning "more likely in".
      user_ids: For a user-level plan (``DPConfig(privacy_unit="user")``): the owner
        of each example of ``data``. The canaries are then *users*: each of the
        ``num_canaries`` canary users owns ``canary_examples`` canary examples, is
        included or held out as a whole, and is scored by the mean of its examples'
        scores; the bounds are on user-level ε.
      canary_examples: Canary examples per canary user (user level only).
      **fit_kwargs: Passed to ``fit`` (e.g. ``callbacks``).

    Returns:
      An :class:`AuditReport`.
    """
    from jax_privacy import auditing

    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0.5, 1), e.g. 0.95.")
    if config is not None and config.sampling != "poisson":
        raise ValueError(
            f"audit.run needs DPConfig(sampling='poisson'): canaries are added or removed, "
            f"so the audit bounds ε for add-or-remove neighbours, while sampling="
            f"{config.sampling!r} is accounted for replace-one neighbours; the two are not "
            "comparable."
        )
    if config is not None and config.dataset_size is not None:
        raise ValueError(
            "audit.run needs DPConfig(dataset_size=None): the included canaries change "
            "the training set size, and the plan is calibrated for it."
        )
    user_level = config is not None and config.privacy_unit == "user"
    if user_level and user_ids is None:
        raise ValueError(
            "audit.run of a user-level plan needs user_ids= (the owner of each example of "
            "data): the canaries are users, added or removed with all their examples."
        )
    per_user = canary_examples if user_level else 1
    x, y = (np.asarray(a) for a in data)
    model = build_model()
    if canaries is None:
        classes = int(keras.tree.flatten(model.outputs)[0].shape[-1]) if model.outputs else None
        if classes is None:
            raise ValueError("Pass canaries=(x, y): the model's number of classes is unknown.")
        canaries = random_label_canaries(x, classes, num_canaries * per_user, seed)
    cx, cy = (np.asarray(a) for a in canaries)
    owner = np.arange(len(cy)) // per_user  # canary example -> canary unit
    included = np.random.default_rng([seed, 0xC01]).random(owner[-1] + 1) < 0.5
    x_train = np.concatenate([x, cx[included[owner]]])
    y_train = np.concatenate([y, cy[included[owner]]])
    if user_level:
        canary_ids = [("canary", int(u)) for u in owner[included[owner]]]
        fit_kwargs["user_ids"] = [*np.asarray(user_ids).tolist(), *canary_ids]
    if private:
        import keras_dp

        model = keras_dp.make_private(model, config)
        model.fit(x_train, y_train, verbose=0, **fit_kwargs)
        accounted, delta = model.privacy_spent().epsilon, model.dp_config.delta
    else:
        epochs = config.epochs if config.epochs is not None else 1
        fit_kwargs.pop("user_ids", None)
        model.fit(
            x_train,
            y_train,
            batch_size=config.batch_size,
            epochs=int(np.ceil(epochs)),
            verbose=0,
            **fit_kwargs,
        )
        accounted = float("inf")
        delta = config.target_delta or min(1e-5, 0.1 / len(y_train))
    scores = np.asarray(score_fn(model, cx, cy), np.float64)
    scores = np.bincount(owner, weights=scores) / per_user  # one score per canary unit
    auditor = auditing.CanaryScoreAuditor(scores[included], scores[~included])
    significance = (1 - confidence) / 2  # two bounds, jointly at `confidence`
    report = AuditReport(
        accounted_epsilon=float(accounted),
        delta=float(delta),
        epsilon_one_run=float(auditor.epsilon_one_run(significance, delta)),
        epsilon_clopper_pearson=float(auditor.epsilon_clopper_pearson(significance, delta)),
        confidence=confidence,
        auroc=float(auditor.attack_auroc()),
        tpr_at_fpr={f: float(auditor.tpr_at_given_fpr(f)) for f in (0.01, 0.1)},
        in_scores=scores[included],
        out_scores=scores[~included],
    )
    logger.info("Audit: %s", report.summary())
    return report
