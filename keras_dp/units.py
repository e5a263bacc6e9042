"""The privacy unit of a row: one example, or one user's block of examples (pure JAX).

:func:`keras_dp.clipping.clipped_sum` clips each *row's* gradient as a whole. A row is
one example at example level (and under user-level "els"), and one user's block of up
to k examples under user-level "uls": the unit's loss is then the mean of the per-
example losses over the block's real examples, so the user's whole contribution is
clipped to C whatever their number of examples.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def unit_fn(per_example: Callable, block: int | None) -> Callable:
    """``(params, row, index) -> (loss, aux)`` of one row, from
    ``per_example(params, x, y, sample_weight, index) -> (loss, aux)`` of one example.

    Example rows are ``(x, y, sample_weight)``; user blocks ``(x, y, sample_weight,
    inner_mask)`` with a leading axis of ``block`` examples. Example j of the block at
    row ``index`` gets index ``index * block + j`` (its own dropout randomness).
    """
    if block is None:
        return lambda params, row, index: per_example(params, *row, index)

    def user_fn(params, row, index):
        x, y, sample_weight, inner = row
        ids = index * block + jnp.arange(block)
        losses, aux = jax.vmap(per_example, in_axes=(None, 0, 0, 0, 0))(
            params, x, y, sample_weight, ids
        )
        count = jnp.sum(inner.astype(jnp.float32))
        loss = jnp.sum(jnp.where(inner, losses, 0.0)) / jnp.maximum(count, 1.0)
        return loss, aux

    return user_fn


def for_metrics(rows, predictions, mask: jax.Array):
    """``(y, sample_weight, predictions, mask)`` with one row per example: user blocks
    flattened, their padding examples masked out."""
    if len(rows) == 3:
        _, y, sample_weight = rows
        return y, sample_weight, predictions, mask
    _, y, sample_weight, inner = rows
    flat = lambda a: None if a is None else a.reshape((-1,) + a.shape[2:])  # noqa: E731
    real = jnp.logical_and(mask[:, None], inner).reshape(-1)
    tree_flat = lambda t: None if t is None else jax.tree.map(flat, t)  # noqa: E731
    return tree_flat(y), tree_flat(sample_weight), tree_flat(predictions), real


def first_example(rows):
    """``(x, y, sample_weight)`` of one example (batch of 1) from the rows."""
    if len(rows) == 3:
        return jax.tree.map(lambda a: a[:1], rows)
    return jax.tree.map(lambda a: a[0, :1], rows[:3])
