"""Per-example gradients, L2 clipping and their masked sum, in chunks (pure JAX).

A privacy unit's gradient is clipped as a whole (all variables together) to L2
norm C, so that adding or removing one unit moves the sum by at most C. Rows are
ordered real-first; only the chunks that hold real rows are computed, and the rows
left after the whole chunks go through smaller chunks, so little padding is computed.

Over several devices the physical batch is split into equal shards (one per
device along the batch axis of the mesh), each ordered real-first: each shard is
clipped and summed where it lives (``jax.shard_map`` over the batch axis) and only
the per-shard sums are reduced, so per-example gradients never leave their device.
(A ``jax.vmap`` over shards with ``spmd_axis_name`` computed wrong per-example
gradients of convolutions on sharded data with jax 0.10.2; a manual per-device
program leaves nothing to the partitioner's batching of them.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from keras_dp.ghost_tap import cross_terms


def global_norm(tree) -> jax.Array:
    """L2 norm of all leaves of ``tree`` together."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


class ClippedSum(NamedTuple):
    """What :func:`clipped_sum` returns.

    Attributes:
      grad_sum: Σ over real rows of the clipped gradients (float32).
      losses: Each row's loss; NaN for a row whose gradient was not finite (zeros in
        chunks that were skipped).
      aux: Each row's aux (with ``fold``: ``(kept, acc)``).
      nonfinite: Real rows whose gradient was not finite (they contribute nothing).
      clipped: Real rows whose gradient norm exceeded C (they were scaled down).
    """

    grad_sum: object
    losses: jax.Array
    aux: object
    nonfinite: jax.Array
    clipped: jax.Array


def stored(tree):
    """``tree`` with its bfloat16 and float16 leaves computed once into memory, so that
    an example's norm and its share of the sum read the same numbers.

    XLA copies cheap operations into each fused loop that reads their result, and with
    excess precision allowed (its default) a copy may skip rounding to bfloat16: the
    norm and the sum then saw different gradients, and under ``mixed_bfloat16`` an
    example's clipped contribution reached 1.0007·C (an LM head whose logits read a
    ReversibleEmbedding, with ghost norms; 1.00003·C an MLP with a LayerNormalization).
    An optimisation barrier keeps one stored copy (float32 leaves are left as they
    are: no rounding to skip).
    """
    leaves, treedef = jax.tree.flatten(tree)
    low = [i for i, a in enumerate(leaves) if jnp.dtype(a.dtype) in (jnp.bfloat16, jnp.float16)]
    if low:
        kept = iter(jax.lax.optimization_barrier([leaves[i] for i in low]))
        leaves = [next(kept) if i in low else a for i, a in enumerate(leaves)]
    return jax.tree.unflatten(treedef, leaves)


def clip_to_norm(tree, l2_clip_norm: float):
    """``tree`` in float32 scaled to L2 norm at most ``l2_clip_norm``; whether it was
    finite; its norm before clipping.

    The norm and the scaling are computed in float32 whatever the leaves' dtype
    (scaling bfloat16 leaves in bfloat16 overshot C by up to 0.26%), from one
    :func:`stored` copy of the leaves. A gradient with a NaN or infinite entry is
    replaced by zeros (the example then contributes nothing) and reported as not finite.
    """
    tree = stored(tree)
    norm = global_norm(tree)
    finite = jnp.isfinite(norm)
    scale = jnp.where(finite, jnp.minimum(1.0, l2_clip_norm / jnp.maximum(norm, 1e-12)), 0.0)
    clipped = jax.tree.map(
        lambda x: jnp.where(finite, x.astype(jnp.float32) * scale, jnp.float32(0)), tree
    )
    return clipped, finite, norm


def clipped_sum(
    example_fn: Callable,
    params,
    rows,
    mask: jax.Array,
    l2_clip_norm: float,
    chunk_size: int,
    num_shards: int = 1,
    shard_axis: str | None = None,
    fold=None,
    fold_init=None,
    mesh=None,
    ghost=None,
):
    """Σ over real rows of clip(∇ example_fn), chunk by chunk.

    Args:
      example_fn: ``(params, row, index) -> (loss, aux)`` for ONE row (a pytree
        without a batch axis); ``index`` is the row's position, for per-row
        randomness. Differentiated with respect to ``params``.
      params: The pytree being trained.
      rows: A pytree of arrays whose leading axis (the physical batch) is
        ``num_shards`` shards of a multiple of ``chunk_size`` rows each.
      mask: bool[physical batch]; within each shard, real rows first.
      l2_clip_norm: C.
      chunk_size: Rows per vectorised chunk (per shard); memory follows it.
      num_shards: Equal shards of the batch, one per device along ``shard_axis``.
      shard_axis: The axis of ``mesh`` the batch is sharded over.
      mesh: The ``jax.sharding.Mesh``; each device then computes its own shard
        (``jax.shard_map`` over ``shard_axis``, other axes left to XLA). None: the
        shards are a plain ``jax.vmap`` on one device (for tests).
      fold: Optional ``(acc, chunk_rows, chunk_values, chunk_mask) -> acc``. Then
        ``example_fn``'s aux is ``(kept, values)``: ``kept`` is returned per row as
        usual, ``values`` are folded into ``acc`` chunk by chunk and never stored
        for the whole batch (e.g. predictions feeding metrics). Over shards the
        folded results are combined as ``fold_init + Σ (acc_shard - fold_init)``,
        so ``acc`` must be additive (as metric totals and counts are).
      fold_init: The initial ``acc``.
      ghost: None (per-example gradients), or ``(is_ghost, taps)``: ghost clipping
        (see :func:`_ghost`). Then ``params`` is a list, ``is_ghost[i]`` says whether
        ``params[i]``'s norm and sum come from the taps, and ``example_fn`` is
        ``(params, row, index, zs) -> (loss, aux, residuals)``.

    Returns:
      A :class:`ClippedSum`: the clipped sum (float32), each row's loss and aux
      (zeros in chunks that were skipped), and the numbers of real rows whose
      gradient was not finite, and whose gradient was clipped. ``index`` is the
      row's rank among the real rows when they are dealt round-robin over the shards (see
      :func:`keras_dp.sampling.shard_layout`), so it does not depend on the shard
      count. With ``fold``, aux is ``(kept, acc)``.
    """
    local = functools.partial(
        _shard_sum,
        example_fn,
        l2_clip_norm=l2_clip_norm,
        chunk_size=chunk_size,
        fold=fold,
        fold_init=fold_init,
        ghost=ghost,
    )
    if num_shards == 1:
        grad_sum, losses, aux, counts = local(params, rows, mask, jnp.arange(mask.shape[0]))
        return ClippedSum(grad_sum, losses, aux, counts[0], counts[1])
    per_shard = mask.shape[0] // num_shards
    if mesh is not None and shard_axis is not None:
        grad_sums, losses, aux, counts = _per_device(
            local, params, rows, mask, num_shards, mesh, shard_axis, fold
        )
    else:
        split = lambda x: x.reshape((num_shards, per_shard) + x.shape[1:])  # noqa: E731
        merge = lambda x: x.reshape((num_shards * per_shard,) + x.shape[2:])  # noqa: E731
        ids = jnp.arange(per_shard)[None, :] * num_shards + jnp.arange(num_shards)[:, None]
        grad_sums, losses, aux, counts = jax.vmap(local, in_axes=(None, 0, 0, 0))(
            params, jax.tree.map(split, rows), split(mask), ids
        )
        losses = merge(losses)
        aux = (
            (jax.tree.map(merge, aux[0]), aux[1]) if fold is not None else jax.tree.map(merge, aux)
        )
    if fold is not None:
        kept, acc = aux
        aux = (kept, jax.tree.map(lambda a, i: i + jnp.sum(a - i, axis=0), acc, fold_init))
    counts = jnp.sum(counts, axis=0)
    return ClippedSum(
        jax.tree.map(lambda g: jnp.sum(g, axis=0), grad_sums), losses, aux, counts[0], counts[1]
    )


def _per_device(local, params, rows, mask, num_shards, mesh, shard_axis, fold):
    """``local`` on each device's shard: per-shard sums stacked, per-row outputs in order.

    ``params`` enter as replicated inputs, not closed over: a closed-over value keeps
    its sharding on the outer mesh, and a gradient that autodiff creates for it inside
    the map (a scan's, e.g. ``keras.layers.RNN``) was refused by JAX for its mesh."""
    spec = jax.sharding.PartitionSpec(shard_axis)
    lead = lambda a: a[None]  # noqa: E731

    def per_device(params, rows, mask):
        shard = jax.lax.axis_index(shard_axis)
        ids = jnp.arange(mask.shape[0]) * num_shards + shard
        grad_sum, losses, aux, counts = local(params, rows, mask, ids)
        if fold is not None:
            aux = (aux[0], jax.tree.map(lead, aux[1]))
        return jax.tree.map(lead, grad_sum), losses, aux, lead(counts)

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(jax.sharding.PartitionSpec(), spec, spec),
        out_specs=spec,
        axis_names=frozenset({shard_axis}),
        check_vma=False,
    )(params, rows, mask)


def _shard_sum(
    example_fn,
    params,
    rows,
    mask,
    ids,
    l2_clip_norm,
    chunk_size,
    fold=None,
    fold_init=None,
    ghost=None,
):
    """:func:`clipped_sum` over one shard; ``ids`` are the rows' indices.

    The real rows (first in the shard) are covered by whole chunks of
    ``chunk_size``, the last one padded: fewer than ``chunk_size`` padding rows are
    computed, and chunks of padding only are skipped.
    """
    physical = mask.shape[0]
    num_chunks = physical // chunk_size
    if ghost is None:
        compute = _per_example(example_fn, params, l2_clip_norm)
    else:
        compute = _ghost(example_fn, params, l2_clip_norm, *ghost)

    def rows_at(tree, start, size):
        return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size), tree)

    def computed(chunk_rows, chunk_ids, chunk_mask, acc):
        """A chunk's clipped sum, losses, kept aux, counts of its real rows (not finite,
        clipped), and ``acc`` with its folded values."""
        part, loss, chunk_aux, finite, over = compute(chunk_rows, chunk_ids, chunk_mask)
        loss = jnp.where(finite, loss, jnp.nan)  # a row that contributed nothing
        if fold is not None:
            chunk_aux, values = chunk_aux
            acc = fold(acc, chunk_rows, values, chunk_mask & finite)
        flags = jnp.stack([chunk_mask & ~finite, chunk_mask & finite & over], axis=1)
        counted = jnp.sum(flags.astype(jnp.int32), axis=0)
        return part, loss, chunk_aux, counted, acc

    if num_chunks == 1:  # one vectorised pass: no loop condition to read back, one trace
        part, losses, aux, counts, acc = computed(rows, ids, mask, fold_init)
        grad_sum = jax.tree.map(lambda g: g.astype(jnp.float32), part)
        return _outputs((grad_sum, losses, aux, counts, acc), fold)

    # Shapes of one chunk's outputs, to allocate the per-row buffers.
    shapes = jax.eval_shape(
        compute,
        rows_at(rows, 0, chunk_size),
        rows_at(ids, 0, chunk_size),
        rows_at(mask, 0, chunk_size),
    )
    _, loss_shape, aux_shape, _, _ = shapes
    if fold is not None:
        aux_shape = aux_shape[0]  # the kept part; the folded part is never stored
    zeros = lambda s: jnp.zeros((physical, *s.shape[1:]), s.dtype)  # noqa: E731
    init = (
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
        zeros(loss_shape),
        jax.tree.map(zeros, aux_shape),
        jnp.zeros((2,), jnp.int32),  # real rows: not finite, clipped
        fold_init,
    )

    def chunk(start, carry):
        """Adds the rows ``start:start + chunk_size`` (those below ``physical``) to the carry.

        ``dynamic_slice`` clamps a start that would run past the end back into range,
        so a chunk near the end re-reads rows an earlier chunk already summed. The
        slice is therefore taken at the clamped start explicitly, and a row counts only
        if its absolute position is at or after ``start`` (and it is real).
        """
        grad_sum, losses, aux, counts, acc = carry
        at = jnp.minimum(start, physical - chunk_size)
        fresh = at + jnp.arange(chunk_size) >= start
        chunk_mask = rows_at(mask, at, chunk_size) & fresh
        part, loss, chunk_aux, counted, acc = computed(
            rows_at(rows, at, chunk_size), rows_at(ids, at, chunk_size), chunk_mask, acc
        )
        grad_sum = jax.tree.map(lambda s, g: s + g, grad_sum, part)

        def put(buf, x):  # rows re-read from an earlier chunk keep their stored value
            keep = fresh.reshape(fresh.shape + (1,) * (x.ndim - 1))
            return jax.lax.dynamic_update_slice_in_dim(
                buf, jnp.where(keep, x, rows_at(buf, at, chunk_size)), at, 0
            )

        losses = put(losses, loss)
        aux = jax.tree.map(put, aux, chunk_aux)
        return grad_sum, losses, aux, counts + counted, acc

    # Whole chunks only, as many as the real rows need; the last one may hold padding
    # rows, which are computed and weighted 0. One compiled shape of the per-example
    # gradient: a tail of smaller chunks (8 + 4 + 2 + 1 for 15 leftover rows) computed
    # no padding but compiled one shape per size, and measured no faster a step.
    num_real = jnp.sum(mask.astype(jnp.int32))
    count = (num_real + chunk_size - 1) // chunk_size
    step = lambda i, c: chunk(i * chunk_size, c)  # noqa: E731
    return _outputs(jax.lax.fori_loop(0, count, step, init), fold)


def _per_example(example_fn, params, l2_clip_norm):
    """A chunk's clipped sum from per-example gradients (``jax.vmap`` of the gradient)."""
    grad_fn = jax.value_and_grad(example_fn, has_aux=True)

    def per_row(row, index):
        (loss, aux), grads = grad_fn(params, row, index)
        clipped, finite, norm = clip_to_norm(grads, l2_clip_norm)
        return clipped, finite, norm > l2_clip_norm, loss, aux

    def compute(chunk_rows, ids, chunk_mask):
        clipped, finite, over, loss, aux = jax.vmap(per_row)(chunk_rows, ids)
        weight = (chunk_mask & finite).astype(jnp.float32)
        part = jax.tree.map(lambda g: jnp.tensordot(weight, g.astype(jnp.float32), 1), clipped)
        return part, loss, aux, finite, over

    return compute


def _ghost(example_fn, params, l2_clip_norm, is_ghost, taps):
    """A chunk's clipped sum with ghost norms (one forward and one backward pass).

    ``example_fn(params, row, index, zs) -> (loss, aux, residuals)`` adds ``zs[k]`` (zeros)
    at the output of tap k and returns tap k's input as ``residuals[k]``. Each row's
    gradient with respect to its zs is g, the gradient at every tap's output; the
    variables with ``is_ghost`` False are differentiated per row in the same pass
    (their per-example gradients, as the per-example path forms them); the ghost
    variables are not differentiated at all. Each row's squared norm is the sum of its
    taps' ghost norms (``tap.sq_norms(x, g)``) and of its per-example gradients' (the
    variables with ``is_ghost`` False, and those a tap forms on the way,
    ``tap.grads(x, g)``: biases and kernels whose norm takes the outer form); the
    clipped sum is ``tap.sums(x, g, factor)`` and Σ factor_b·grad_b, in float32, with
    the rows that are padding or not finite zeroed first (not multiplied: 0·NaN is NaN)
    in the floating-point arrays. An embedding's integer ids are left as they are: they
    cannot be non-finite, and zeroing them, which waited for the norms, made the
    compiled step without noise of ``benchmarks/clipping.py``'s text classifier 11–14%
    slower (both programs alternated in one process, 2-core EPYC).
    """
    params = list(params)
    own = [p for p, g in zip(params, is_ghost) if not g]

    def per_row(row, index, z):
        def loss_fn(own, z):
            mine = iter(own)
            merged = [p if g else next(mine) for p, g in zip(params, is_ghost)]
            loss, aux, residuals = example_fn(merged, row, index, z)
            return loss, (loss, aux, residuals)

        (own_grads, g), (loss, aux, residuals) = jax.grad(loss_fn, (0, 1), has_aux=True)(own, z)
        return own_grads, g, loss, aux, residuals

    def compute(chunk_rows, ids, chunk_mask):
        size = chunk_mask.shape[0]
        zs = [jnp.zeros((size, *t.out.shape), t.out.dtype) for t in taps]
        own_grads, gs, loss, aux, residuals = jax.vmap(per_row)(chunk_rows, ids, zs)
        own_grads, gs, residuals = stored((own_grads, gs, residuals))  # norms and sums agree
        grads = dict(zip((i for i, g in enumerate(is_ghost) if not g), own_grads))
        sq = jnp.zeros(size, jnp.float32)
        for t, x, g in zip(taps, residuals, gs):
            grads.update(t.grads(x, g))
            norms = t.sq_norms(x, g)
            sq = sq if norms is None else sq + norms
        cross = cross_terms(taps, residuals, gs)  # tied tables: their two reads' term
        sq = sq if cross is None else sq + cross
        for g in grads.values():
            sq = sq + jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(size, -1), axis=1)
        norm = jnp.sqrt(sq)
        finite = jnp.isfinite(norm)
        keep = chunk_mask & finite
        factor = jnp.where(keep, jnp.minimum(1.0, l2_clip_norm / jnp.maximum(norm, 1e-12)), 0.0)
        factor = factor.astype(jnp.float32)

        def zeroed(a):  # integer ids cannot be non-finite: left as they are
            if not jnp.issubdtype(a.dtype, jnp.inexact):
                return a
            return jnp.where(keep.reshape((size,) + (1,) * (a.ndim - 1)), a, jnp.zeros((), a.dtype))

        part = [None] * len(params)
        for t, x, g in zip(taps, residuals, gs):
            for i, total in t.sums(jax.tree.map(zeroed, x), zeroed(g), factor).items():
                part[i] = total if part[i] is None else part[i] + total  # a tied table's two
        for i, g in grads.items():
            part[i] = jnp.tensordot(factor, zeroed(g).astype(jnp.float32), 1)
        return part, loss, aux, finite, norm > l2_clip_norm

    return compute


def _outputs(carry, fold):
    grad_sum, losses, aux, counts, acc = carry
    return grad_sum, losses, (aux, acc) if fold is not None else aux, counts
