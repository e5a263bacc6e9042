"""Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"): the clip norm follows a target quantile of the gradient norms (pure JAX).

Each update releases, besides the noisy gradient sum, the noisy count of real examples
whose gradient norm was at most C, centred: Σ (b_i − ½) + N(0, σ_b²). Adding or removing
one example moves that count by ½, and the clipped sum by C, so with gradient noise σ_Δ·C
the pair is one Gaussian mechanism of multiplier σ where σ⁻² = σ_Δ⁻² + (2σ_b)⁻²: the
accountant's event is unchanged (see ``DPConfig.gradient_noise_multiplier``). Replacing
one example moves both by twice as much, so the same holds with sensitivity 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def unclipped_fraction(
    unclipped: jax.Array, num_real: jax.Array, key: jax.Array, count_noise: float, batch_size: int
) -> jax.Array:
    """b̃: the privatised fraction of examples with norm ≤ C, in units of the expected batch.

    ``(Σ_real (b_i − ½) + N(0, σ_b²)) / B + ½``: the centred sum has sensitivity ½, and
    the expected batch size B (public) replaces the real count. ``key`` must be
    independent of the gradient noise's (the step splits its key in two).
    """
    centred = unclipped.astype(jnp.float32) - num_real.astype(jnp.float32) / 2
    noise = count_noise * jax.random.normal(key, ())
    return (centred + noise) / batch_size + 0.5


def next_clip_norm(
    clip_norm: jax.Array, fraction: jax.Array, quantile: float, learning_rate: float
) -> jax.Array:
    """The geometric update C ← C·exp(−η (b̃ − γ)): C shrinks while more than γ of the
    examples fit under it, and grows while fewer do."""
    return clip_norm * jnp.exp(-learning_rate * (fraction - quantile))
