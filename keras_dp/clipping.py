"""Per-example gradients, L2 clipping and their masked sum, in chunks (pure JAX).

A privacy unit's gradient is clipped as a whole (all variables together) to L2
norm C, so that adding or removing one unit moves the sum by at most C. Rows are
ordered real-first; only the chunks that hold real rows are computed.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def global_norm(tree) -> jax.Array:
    """L2 norm of all leaves of ``tree`` together."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_to_norm(tree, l2_clip_norm: float):
    """``tree`` scaled to L2 norm at most ``l2_clip_norm``, and whether it was finite.

    A gradient with a NaN or infinite entry is replaced by zeros (the example then
    contributes nothing) and reported as not finite.
    """
    norm = global_norm(tree)
    finite = jnp.isfinite(norm)
    scale = jnp.where(finite, jnp.minimum(1.0, l2_clip_norm / jnp.maximum(norm, 1e-12)), 0.0)
    clipped = jax.tree.map(lambda x: jnp.where(finite, x * scale.astype(x.dtype), 0), tree)
    return clipped, finite


def clipped_sum(
    example_fn: Callable,
    params,
    rows,
    mask: jax.Array,
    l2_clip_norm: float,
    chunk_size: int,
):
    """Σ over real rows of clip(∇ example_fn), chunk by chunk.

    Args:
      example_fn: ``(params, row, index) -> (loss, aux)`` for ONE row (a pytree
        without a batch axis); ``index`` is the row's position, for per-row
        randomness. Differentiated with respect to ``params``.
      params: The pytree being trained.
      rows: A pytree of arrays whose leading axis (the physical batch) is a
        multiple of ``chunk_size``.
      mask: bool[physical batch]; real rows first, then padding.
      l2_clip_norm: C.
      chunk_size: Rows per vectorised chunk; memory follows it.

    Returns:
      ``(grad_sum, losses, aux, nonfinite)``: the clipped sum (float32), each row's
      loss and aux (zeros in chunks that were skipped), and the number of real rows
      whose gradient was not finite.
    """
    physical = mask.shape[0]
    num_chunks = physical // chunk_size
    grad_fn = jax.value_and_grad(example_fn, has_aux=True)

    def per_row(row, index):
        (loss, aux), grads = grad_fn(params, row, index)
        clipped, finite = clip_to_norm(grads, l2_clip_norm)
        return clipped, finite, loss, aux

    vmapped = jax.vmap(per_row)

    def chunk_of(tree, i):
        return jax.tree.map(
            lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk_size, chunk_size), tree
        )

    # Shapes of one chunk's outputs, to allocate the per-row buffers.
    shapes = jax.eval_shape(vmapped, chunk_of(rows, 0), jnp.arange(chunk_size))
    _, _, loss_shape, aux_shape = shapes
    zeros = lambda s: jnp.zeros((physical, *s.shape[1:]), s.dtype)  # noqa: E731
    init = (
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
        zeros(loss_shape),
        jax.tree.map(zeros, aux_shape),
        jnp.zeros((), jnp.int32),
    )

    def body(i, carry):
        grad_sum, losses, aux, nonfinite = carry
        chunk_mask = chunk_of(mask, i)
        clipped, finite, loss, chunk_aux = vmapped(
            chunk_of(rows, i), i * chunk_size + jnp.arange(chunk_size)
        )
        weight = chunk_mask & finite
        grad_sum = jax.tree.map(
            lambda s, g: s + jnp.tensordot(weight.astype(jnp.float32), g.astype(jnp.float32), 1),
            grad_sum,
            clipped,
        )
        put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x, i * chunk_size, 0)  # noqa: E731
        losses = put(losses, loss)
        aux = jax.tree.map(put, aux, chunk_aux)
        nonfinite = nonfinite + jnp.sum(chunk_mask & ~finite).astype(jnp.int32)
        return grad_sum, losses, aux, nonfinite

    num_real = jnp.sum(mask.astype(jnp.int32))
    chunks_with_real_rows = jnp.minimum((num_real + chunk_size - 1) // chunk_size, num_chunks)
    return jax.lax.fori_loop(0, chunks_with_real_rows, body, init)
