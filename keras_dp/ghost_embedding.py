"""Per-example gradient norms and clipped sums of embedding tables, from ids (pure JAX).

A lookup ``out_t = table[id_t]`` gives example b the table gradient
``A_b = Σ_t onehot(id_t) ⊗ g_t``, so ‖A_b‖² = Σ_{s,t: id_s = id_t} ⟨g_s, g_t⟩ and the
clipped sum ``Σ_b f_b·A_b`` (one scatter-add) follow from the ids and g without any
[V, d] table being formed for an example. The norm is taken by the cheapest exact
form for the sequence's length and width (:func:`embedding_costs`). A table also read
in reverse as logits (tied weights) adds the cross term of its two gradients
(:func:`tied_term`). Everything is computed in float32.

Arrays here carry the examples on axis 0, as in :mod:`keras_dp.ghost_norms`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from keras_dp import ghost_norms as gn

# What sorting one token costs per level of the sort, in multiply-adds of the Gram form,
# measured on 2 CPU cores (96 examples × 64 dimensions: the forms are level at about 128
# tokens; at 64 the Gram form is 1.35× faster, at 1,024 the sorted one 5.7×).
_SORT_COST = 1200


def embedding_costs(length: int, dim: int) -> tuple[int, int, int]:
    """(Gram, sorted, first-position) costs of an embedding's squared norm over
    ``length`` tokens of ``dim`` features, per example, in multiply-adds of the Gram
    form (:func:`embedding_sq_norms`).

    The first-position form's comparisons and segment sum, timed against the Gram
    products on 2 CPU cores (16–88 examples, 24–1,024 tokens, 16–256 features), cost
    about 15 multiply-adds a comparison (growing past 256 tokens) and 40 an element
    summed: (tokens, features) = (64, 64): Gram 0.59 ms, first-position 0.51, sorted
    0.87; (256, 128): 4.4, 1.4, 1.7; (64, 16): 0.25, 0.27, 0.60; (1,024, 64): 15.9,
    10.0, 1.6.
    """
    levels = max(1, math.ceil(math.log2(max(length, 2))))
    compares = length * length * max(1, length // 256)
    gram = length * length * dim
    return gram, length * dim + _SORT_COST * length * levels, 15 * compares + 40 * length * dim


# An embedding's per-example gradient, in multiply-adds of the Gram form per number of
# its V×d table: a zeroed table an example, written, scattered into, read for the norm
# and read for the clipped sum. Measured on 2 CPU cores through fit (batch 64, one pass;
# the table ghost against per-example, ms a step, (tokens, vocabulary, features)):
# (64, 1,000, 64) 0.87 / 15.9, (128, 1,000, 32) 2.0 / 2.5, (256, 5,000, 32) 5.3 / 39;
# (256, 1,000, 16) 7.7 / 1.3, (512, 256, 32) 9.6 / 1.4, (1,024, 100, 64) 29 / 4.7,
# (128, 200, 32) 1.9 / 1.3, (64, 100, 16) 0.45 / 0.50. 32 sorts them all (counted as 1,
# it sent the first three to per-example gradients).
TABLE_COST = 32


def embedding_form(length: int, dim: int) -> str:
    """The cheapest of :func:`embedding_costs`' forms: "gram", "sorted" or "first"
    (position); the Gram form on a tie, then the sorted one."""
    gram, by_sort, by_first = embedding_costs(length, dim)
    if by_sort < min(gram, by_first):
        return "sorted"
    return "first" if by_first < gram else "gram"


# The binned form of a pooled norm (:func:`binned_sq_norms`), in multiply-adds of the
# Gram form: per bin (zeroed, squared, summed) and per position (added into its bin),
# measured on 2 CPU cores (88 examples; (tokens, vocabulary): (64, 1,000) 0.06 ms,
# (64, 5,000) 0.25, (64, 32,000) 1.45, (512, 256) 0.18, (1,024, 100) 0.38; the
# first-position form 0.12, 0.14, 0.14, 23.5, 83; the sorted one 0.78, 0.81, 0.88,
# 8.6, 19.7).
_COST_PER_BIN, _COST_PER_POSITION = 22, 170


def pooled_costs(length: int, vocab: int) -> tuple[int, int, int]:
    """(binned, sorted, first-position) costs of a pooled norm (:func:`pooled_sq_norms`)
    over ``length`` tokens of a ``vocab``-row table, per example, in the units of
    :func:`embedding_costs` (whose Gram form is left out: at one feature its T×T
    products are no cheaper than the first-position form's T² comparisons, and far
    costlier in memory: 30 ms against 18 at 512 tokens)."""
    _, by_sort, by_first = embedding_costs(length, 1)
    return _COST_PER_BIN * vocab + _COST_PER_POSITION * length, by_sort, by_first


def pooled_sq_norms(ids, g, vocab: int) -> jnp.ndarray:
    """Σ_v (Σ_{t: id_t = v} ‖g_t‖)² per example (ids [B, T] in [0, vocab), g [B, T, d]),
    plus :data:`keras_dp.ghost_norms.ROUNDING` times itself: never below ‖Σ_t onehot(id_t)
    ⊗ g_t‖² (the triangle inequality, row by row), and equal to it, to that margin,
    where the g_t of an example are one vector times numbers ≥ 0 (a lookup averaged
    over its positions: :mod:`keras_dp.ghost_pooling`). Each position's norm ‖g_t‖
    added into a row of ``vocab`` bins an example (:func:`binned_sq_norms`), or the
    forms of :func:`embedding_sq_norms` over that one feature, the cheapest
    (:func:`pooled_costs`); over chunks of rows when the batch is large."""
    ids = ids.reshape(ids.shape[0], -1)
    g = g.reshape(ids.shape[0], ids.shape[1], -1).astype(jnp.float32)
    n = jnp.linalg.norm(g, axis=-1)
    costs = pooled_costs(ids.shape[1], vocab)
    if costs[0] <= min(costs[1:]):
        rows = gn.chunk_rows(vocab, ids.shape[0])
        return gn.by_row_chunks(lambda i, m: binned_sq_norms(i, m, vocab), rows, ids, n)
    norms = sorted_sq_norms if costs[1] < costs[2] else first_position_sq_norms
    rows = gn.chunk_rows(ids.shape[1] * ids.shape[1], ids.shape[0])
    return gn.by_row_chunks(norms, rows, ids, n[..., None])


def binned_sq_norms(ids, n, vocab: int) -> jnp.ndarray:
    """Σ_v (Σ_{t: id_t = v} n_t)² per example (ids [B, T], n [B, T] ≥ 0), plus
    :data:`keras_dp.ghost_norms.ROUNDING` times itself: n added into a zeroed row of
    ``vocab`` bins an example. An id outside [0, vocab) is dropped, as its lookup's
    gradient is (its row is NaN, and its example not finite)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, ids.shape, 0)
    bins = jnp.zeros((ids.shape[0], vocab), jnp.float32).at[rows, ids].add(n, mode="drop")
    return (1 + gn.ROUNDING) * jnp.sum(jnp.square(bins), axis=1)


def embedding_sq_norms(ids, g) -> jnp.ndarray:
    """‖Σ_t onehot(id_t) ⊗ g_t‖² per example: Σ_{s,t: id_s = id_t} ⟨g_s, g_t⟩, by the
    cheapest exact form: the T×T Gram products, g summed over equal ids at each id's
    first position (:func:`first_position_sq_norms`), or for long sequences over the
    runs of the sorted ids (:func:`sorted_sq_norms`); over chunks of rows
    (:func:`keras_dp.ghost_norms.by_row_chunks`) when the batch is large."""
    ids = ids.reshape(ids.shape[0], -1)
    g = g.reshape(ids.shape[0], ids.shape[1], -1).astype(jnp.float32)
    if ids.shape[1] == 1:
        return jnp.sum(jnp.square(g), axis=(1, 2))
    form = embedding_form(ids.shape[1], g.shape[2])
    norms = {"sorted": sorted_sq_norms, "first": first_position_sq_norms, "gram": gram_sq_norms}
    rows = gn.chunk_rows(ids.shape[1] * max(ids.shape[1], g.shape[2]), ids.shape[0])
    return gn.by_row_chunks(norms[form], rows, ids, g)


def gram_sq_norms(ids, g) -> jnp.ndarray:
    """Σ_{s,t: id_s = id_t} ⟨g_s, g_t⟩ per example (ids [B, T], g [B, T, d]): the T×T
    Gram products of g, kept where the ids are equal; plus
    :data:`keras_dp.ghost_norms.ROUNDING` times their gross size, Σ_{s,t: id_s = id_t}
    ‖g_s‖‖g_t‖ (an upper bound, as :func:`keras_dp.ghost_norms.kernel_sq_norms`'s;
    added term by term, in the same pass: as a second sum it took 25% longer)."""
    same = ids[:, :, None] == ids[:, None, :]
    gg = jnp.einsum("bsd,btd->bst", g, g)
    size = jnp.linalg.norm(g, axis=-1)
    margin = gn.ROUNDING * size[:, :, None] * size[:, None, :]
    return jnp.sum(jnp.where(same, gg + margin, 0.0), axis=(1, 2))


def first_position_sq_norms(ids, g) -> jnp.ndarray:
    """Σ_v ‖Σ_{t: id_t = v} g_t‖² per example (ids [B, T], g [B, T, d]), unsorted: the
    first position of each token's id found by T×T comparisons, g summed into it (a
    segment sum per example), the sums squared. T² comparisons and T·d additions
    against the Gram form's T²·d multiply-adds; the same value (each row of the
    table's gradient is one such sum), plus :func:`_row_norms`' rounding margin."""
    length = ids.shape[1]
    # The narrowest type of 0..T: a quarter of int32's memory for the T×T positions (88
    # examples × 64 tokens: the first positions in 82 µs with int8, 224 with int32).
    kind = jnp.int8 if length <= 127 else jnp.int16 if length <= 32767 else jnp.int32
    position = jax.lax.broadcasted_iota(kind, (*ids.shape, length), 2)
    same = ids[:, :, None] == ids[:, None, :]
    last = jnp.asarray(length, kind)
    first = jnp.min(jnp.where(same, position, last), axis=-1).astype(jnp.int32)  # ≤ its own

    def sums(rows, to):
        return jax.ops.segment_sum(rows, to, num_segments=length)

    g = g.astype(jnp.float32)
    return _row_norms(jax.vmap(sums)(g, first), jax.vmap(sums)(jnp.linalg.norm(g, axis=-1), first))


def _row_norms(rows, sizes) -> jnp.ndarray:
    """Σ_v ‖Σ_{t: id_t = v} g_t‖² from the rows' sums of g [B, V', d], plus
    :data:`keras_dp.ghost_norms.ROUNDING` times their gross size Σ_v (Σ_{t: id_t = v}
    ‖g_t‖)² from the sums ``sizes`` [B, V'] of the positions' norms. The clipped sum
    (:func:`embedding_sum`) adds each share f_b·g_t into the table one by one, among other
    examples', rounded by units of 2⁻²⁴ of its size: a crafted example (64 tokens, each id
    twice with opposite gradients of size 10⁴) added 1.004·C among 7 others without the
    margin, which bounds f_b·(the shares' size) by C/(4·2⁻¹²)."""
    return jnp.sum(jnp.square(rows), axis=(1, 2)) + gn.ROUNDING * jnp.sum(jnp.square(sizes), axis=1)


def sorted_sq_norms(ids, g) -> jnp.ndarray:
    """Σ_v ‖Σ_{t: id_t = v} g_t‖² per example (ids [B, T], g [B, T, d]): the tokens
    sorted by id, g summed over each run of equal ids, the sums squared. O(T log T + T·d)
    against the Gram form's T²·d; the same value (each row of the table's gradient is
    one such sum), plus :func:`_row_norms`' rounding margin."""
    batch, length = ids.shape
    order = jnp.argsort(ids, axis=1)
    ids = jnp.take_along_axis(ids, order, axis=1)
    g = g.astype(jnp.float32)
    norms = jnp.take_along_axis(jnp.linalg.norm(g, axis=-1), order, axis=1)  # before g's
    g = jnp.take_along_axis(g, order[..., None], axis=1)  # gather: 2.3× slower after it
    starts = jnp.concatenate([jnp.ones((batch, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    runs = jnp.cumsum(starts, axis=1) - 1  # each token's run of equal ids, in [0, T)

    def run_sums(rows, run):
        return jax.ops.segment_sum(rows, run, num_segments=length, indices_are_sorted=True)

    return _row_norms(jax.vmap(run_sums)(g, runs), jax.vmap(run_sums)(norms, runs))


def embedding_sum(ids, g, factor, table_shape) -> jnp.ndarray:
    """Σ_b factor_b·(the table's gradient of example b), as one scatter-add."""
    rows = g.reshape(-1, table_shape[-1]).astype(jnp.float32)
    weights = jnp.repeat(factor, rows.shape[0] // factor.shape[0])
    flat = ids.reshape(-1).astype(jnp.int32)
    return jnp.zeros(table_shape, jnp.float32).at[flat].add(rows * weights[:, None])


def ties(spec: gn.Einsum) -> bool:
    """Whether ``spec`` reads its kernel as an embedding table [V, d] read in reverse:
    ``out[..., v] = Σ_d x[..., d]·table[v, d]`` (a tied output projection)."""
    return not spec.shared and len(spec.kx) == 1 and spec.k == spec.ko + spec.kx


def tied_cross(ids, g, xr, gr) -> tuple[jnp.ndarray, jnp.ndarray]:
    """⟨A_b, R_b⟩ per example (float32 [B]) for a table looked up and read in reverse:
    A_b its lookups' gradient, Σ_t onehot(id_t) ⊗ g_t (ids [B, T], g [B, T, d]), and R_b
    its reversed reads', Σ_s δ_s ⊗ h_s (:func:`ties`; h and δ at the logits as
    :func:`keras_dp.ghost_norms.grouped` lays them out, xr [B, S, 1, d] and
    gr [B, S, 1, V]). The lookups' or the reads' positions may be several calls' laid end
    to end. Σ_{s,t} δ_s[id_t]·⟨g_t, h_s⟩: S·T·d multiply-adds an example, the two [V, d]
    gradients never formed; ‖A_b + R_b‖² = ‖A_b‖² + ‖R_b‖² + 2·⟨A_b, R_b⟩.

    Also the products' gross size, Σ_{s,t} |δ_s[id_t]|·‖g_t‖‖h_s‖ (float32 [B]): where
    A_b ≈ -R_b the norm's three terms cancel, and :data:`keras_dp.ghost_norms.ROUNDING`
    times 4 gross sizes bounds what float32 rounding takes from it
    (:func:`keras_dp.ghost_tap.cross_terms`).
    """
    ids = ids.reshape(ids.shape[0], -1)
    g = g.reshape(ids.shape[0], ids.shape[1], -1).astype(jnp.float32)
    xr, gr = xr.reshape(xr.shape[0], -1, xr.shape[-1]), gr.reshape(gr.shape[0], -1, gr.shape[-1])

    def cross(ids, g, xr, gr):
        at = jnp.broadcast_to(ids[:, None, :], (ids.shape[0], gr.shape[1], ids.shape[1]))
        picked = jnp.take_along_axis(gr, at, axis=2)  # δ_s[id_t], [B, S, T]
        sizes = jnp.linalg.norm(xr, axis=2)[:, :, None] * jnp.linalg.norm(g, axis=2)[:, None]
        return jnp.stack(
            [
                jnp.sum(picked * jnp.einsum("btd,bsd->bst", g, xr), axis=(1, 2)),
                jnp.sum(jnp.abs(picked) * sizes, axis=(1, 2)),
            ],
            axis=1,
        )

    rows = gn.chunk_rows(3 * ids.shape[1] * xr.shape[1], ids.shape[0])
    both = gn.by_row_chunks(cross, rows, ids, g, xr, gr)
    return both[:, 0], both[:, 1]


def tied_term(ids, g, xr, gr) -> jnp.ndarray:
    """2·⟨A_b, R_b⟩ (:func:`tied_cross`) plus :data:`keras_dp.ghost_norms.ROUNDING` times 4 of its
    products' gross sizes (float32 [B]): added to the two reads' own squared norms, an upper
    bound on ‖A_b + R_b‖². Where A_b ≈ -R_b the three terms, each about 2·|⟨A_b, R_b⟩| (at
    most twice the gross size), cancel: a soak drew ‖A_b‖² = 14.8, ‖R_b‖² = 15.2 whose
    ‖A_b + R_b‖² = 0.0034 came out 1.1e-5 low, 3 units of 2⁻²⁴ of the terms' 60."""
    inner, gross = tied_cross(ids, g, xr, gr)
    return 2 * inner + 4 * gn.ROUNDING * gross
