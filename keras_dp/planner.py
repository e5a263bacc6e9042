"""Choosing a plan: calibrate a grid of batch sizes and epochs, best first.

At a fixed ε, what matters for the model is the noise on the *averaged* gradient,
σ·C/B: its standard deviation in units of the clip norm is σ/B. Larger batches need
more noise per step but divide it by more examples; more epochs need more noise.
:func:`plan` calibrates every combination with dp_accounting and sorts them by σ/B, so a
user can see the trade-off before training (and pick, e.g., the best plan that fits the
compute budget: the number of updates and the expected batch are in the table).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from keras_dp.config import DPConfig


class Plans(list):
    """A list of calibrated :class:`DPConfig`, best (smallest σ/B) first; prints as a table."""

    def __str__(self) -> str:
        return plan_table(self)


def plan(
    target_epsilon: float,
    dataset_size: int,
    batch_sizes: Iterable[int],
    epochs: Iterable[float],
    target_delta: float | None = None,
    **config_fields,
) -> Plans:
    """One calibrated plan per (batch size, epochs), sorted by σ/B, best first.

    Each plan is exactly ``DPConfig(target_epsilon=..., batch_size=b, epochs=e,
    target_delta=..., dataset_size=..., **config_fields).calibrate()``: ε ≤ target for
    the whole plan, under the config's sampler and accountant (about 0.5-1 s a plan).

    Args:
      target_epsilon: The ε every plan may spend.
      dataset_size: N, the number of examples.
      batch_sizes: Expected batch sizes B to try.
      epochs: Numbers of passes over the data to try.
      target_delta: δ (default ``min(1e-5, 0.1/N)``).
      **config_fields: Any other :class:`DPConfig` field (``l2_clip_norm``,
        ``sampling``, ``accountant``, ...), the same for every plan.

    Returns:
      :class:`Plans` (a list of :class:`DPConfig`); ``print`` it for the table.

    Example:

    >>> plans = plan(3.0, 60_000, batch_sizes=[256, 1024], epochs=[3])
    >>> [p.batch_size for p in plans]  # 1024 adds less noise per averaged gradient
    [1024, 256]
    """
    batch_sizes, epochs = list(batch_sizes), list(epochs)
    if not batch_sizes or not epochs:
        raise ValueError("plan needs at least one batch size and one number of epochs.")
    configs = []
    for batch_size, passes in itertools.product(sorted(batch_sizes), sorted(epochs)):
        config = DPConfig(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            batch_size=batch_size,
            epochs=passes,
            dataset_size=dataset_size,
            **config_fields,
        )
        configs.append(config.calibrate())
    return Plans(sorted(configs, key=effective_noise))


def effective_noise(config: DPConfig) -> float:
    """σ/B: the noise std on the averaged gradient, in units of the clip norm C."""
    return config.noise_multiplier / config.batch_size


def plan_table(configs: Iterable[DPConfig]) -> str:
    """A Markdown table of calibrated plans: batch, epochs, steps, σ, σ/B, B_max, ε at
    the plan's δ and at δ/10 and 10·δ (or δ/100 when 10·δ is not below 1/N)."""
    configs = list(configs)
    if not configs:
        return "(no plans)"
    delta = configs[0].delta
    n = configs[0].dataset_size
    other = delta * 10 if delta * 10 < 1 / n else delta / 100
    lines = [
        f"| B | epochs | steps | σ | σ/B | B_max | ε at δ={delta:.2g} | ε at δ={delta / 10:.2g} "
        f"| ε at δ={other:.2g} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        b_max = c.max_batch_size if c.max_batch_size is not None else "-"
        lines.append(
            f"| {c.batch_size} | {c.epochs:g} | {c.steps} | {c.noise_multiplier:.4g} | "
            f"{effective_noise(c):.3g} | {b_max} | {c.epsilon():.3g} | "
            f"{c.epsilon(delta=delta / 10):.3g} | {c.epsilon(delta=other):.3g} |"
        )
    return "\n".join(lines)
