"""Per-example gradient norms and clipped sums of linear maps, from activations (pure JAX).

A layer ``out = einsum(eq, x, K)`` gives example b the kernel gradient
``G_b = einsum(x_b, g_b)`` (``g_b = ∂loss_b/∂out_b``), so ‖G_b‖² and the clipped sum
``Σ_b f_b·G_b`` both follow from (x, g) without any G_b being kept: "ghost" norms
(Goodfellow 2015; Li et al. 2022, Bu et al. 2023 for sequences). For a sequence
the norm is taken as the cheaper of two exact forms, chosen from the shapes:

- outer: G_b itself, one example at a time (|S|·|Kx|·|Ko| multiply-adds; then kept
  for the sum, :func:`kernel_grads`);
- Gram: Σ_{s,t} ⟨x_s, x_t⟩⟨g_s, g_t⟩ (|S|²·(|Kx| + |Ko|)),

with S the positions summed in G (in x and out, not in K), Kx and Ko the kernel's
axes from x and from out. Everything is computed in float32 whatever x and g are.

Arrays here carry the examples on axis 0: ``x[b]`` has the shape the layer saw.
"""

from __future__ import annotations

import math
import string
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Einsum(NamedTuple):
    """The index structure of ``out = einsum(x_spec,k_spec->out_spec)``, no ellipsis.

    Attributes:
      x: x's letters; k: the kernel's; out: out's.
      shared: Letters in x, k and out (kept apart in the norm).
      kx: Kernel letters from x only; ko: kernel letters from out only.
      summed: Letters in x and out but not k (positions summed into G).
    """

    x: str
    k: str
    out: str
    shared: str
    kx: str
    ko: str
    summed: str


def parse(equation: str, x_ndim: int) -> Einsum | None:
    """The structure of ``equation`` for an x of rank ``x_ndim``; None when the norm
    forms do not apply (a kernel letter in neither x nor out, an ellipsis in the kernel)."""
    lhs, out = equation.replace(" ", "").split("->")
    xs, ks = lhs.split(",")
    if "..." in ks:
        return None
    if "..." in xs:
        free = [c for c in string.ascii_letters if c not in equation]
        fill = "".join(free[: x_ndim - (len(xs) - 3)])
        xs, out = xs.replace("...", fill), out.replace("...", fill)
    if len(xs) != x_ndim or any(c not in xs + out for c in ks):
        return None
    shared = "".join(c for c in ks if c in xs and c in out)
    kx = "".join(c for c in ks if c in xs and c not in out)
    ko = "".join(c for c in ks if c in out and c not in xs)
    summed = "".join(c for c in out if c in xs and c not in ks)
    return Einsum(xs, ks, out, shared, kx, ko, summed)


def _free(spec: Einsum, count: int) -> str:
    used = spec.x + spec.k + spec.out
    return "".join(c for c in string.ascii_letters if c not in used)[:count]


def _grouped(spec: Einsum, x, g):
    """x as [B, S, P, Kx] and g as [B, S, P, Ko] (float32); letters only in x summed."""
    (z,) = _free(spec, 1)
    sizes = dict(zip(spec.x, x.shape[1:])) | dict(zip(spec.out, g.shape[1:]))
    size = lambda letters: math.prod(sizes[c] for c in letters)  # noqa: E731
    s, p = size(spec.summed), size(spec.shared)
    xr = jnp.einsum(f"{z}{spec.x}->{z}{spec.summed}{spec.shared}{spec.kx}", x)
    gr = jnp.einsum(f"{z}{spec.out}->{z}{spec.summed}{spec.shared}{spec.ko}", g)
    return (
        xr.reshape(x.shape[0], s, p, size(spec.kx)).astype(jnp.float32),
        gr.reshape(g.shape[0], s, p, size(spec.ko)).astype(jnp.float32),
    )


def costs(spec: Einsum, x_shape, out_shape) -> tuple[int, int]:
    """Multiply-adds per example of the (outer, Gram) forms of the squared norm."""
    sizes = dict(zip(spec.x, x_shape)) | dict(zip(spec.out, out_shape))
    size = lambda letters: math.prod(sizes[c] for c in letters)  # noqa: E731
    s, p, a, c = size(spec.summed), size(spec.shared), size(spec.kx), size(spec.ko)
    return s * p * a * c, s * s * p * (a + c)


def outer_form(spec: Einsum, x_shape, out_shape) -> bool:
    """Whether the outer form of the squared norm is the faster, per example.

    Forming and squaring an example's gradient ran at about half the multiply-adds per
    second of the Gram products, plus ~32 multiply-adds' time for each entry of it
    written out (2 CPU cores, 88 examples; (positions, in, out) = (16, 144, 32): Gram
    0.14 ms, outer 0.34; (64, 256, 64): 1.05 against 2.3; (128, 256, 256) × 32
    examples, equal multiply-adds: 1.9 against 3.8; (36, 9, 16): outer 0.08, Gram 0.09).
    """
    outer, gram = costs(spec, x_shape, out_shape)
    sizes = dict(zip(spec.x, x_shape)) | dict(zip(spec.out, out_shape))
    entries = outer // max(1, math.prod(sizes[c] for c in spec.summed))
    return 2 * outer + 32 * entries <= gram


# A Gram form sums products that cancel where an example's shares of G_b do; float32
# rounds them by units of 2⁻²⁴ of their gross size, not of ‖G_b‖²: near-cancelling
# examples (2-128 positions, 1-4,096 features) drawn at random came out up to
# 3.0·2⁻²⁴·(Σ_s ‖x_s‖‖g_s‖)² below G_b's norm as float32 forms it, some at 0 or below,
# which would leave them unclipped. Each Gram form adds ROUNDING times its products'
# gross size, so that its norm is not below G_b's; an example whose shares do not
# cancel is clipped ROUNDING/2 times its gross-to-norm ratio smaller (about T for T
# positions in random directions: 3e-5 smaller at 64).
ROUNDING = 16 * 2.0**-24


def kernel_sq_norms(spec: Einsum, x, g) -> jnp.ndarray:
    """‖G_b‖² for every example b (float32 [B]), by the faster exact form; the Gram form
    as an upper bound (plus :data:`ROUNDING` times its products' gross size,
    Σ_p (Σ_s ‖x_sp‖‖g_sp‖)², which float32 rounding does not reach)."""
    xr, gr = _grouped(spec, x, g)
    if outer_form(spec, x.shape[1:], g.shape[1:]):
        per = jnp.einsum("bspa,bspc->bpac", xr, gr)
        return jnp.sum(jnp.square(per), axis=(1, 2, 3))
    xx = jnp.einsum("bspa,btpa->bpst", xr, xr)
    gg = jnp.einsum("bspc,btpc->bpst", gr, gr)
    if xr.shape[1] == 1:  # no positions: ‖x_p‖²‖g_p‖², products that cannot cancel
        return jnp.sum(xx * gg, axis=(1, 2, 3))
    sizes = jnp.linalg.norm(xr, axis=-1) * jnp.linalg.norm(gr, axis=-1)  # [B, S, P]
    gross = jnp.sum(jnp.square(jnp.sum(sizes, axis=1)), axis=1)
    return jnp.sum(xx * gg, axis=(1, 2, 3)) + ROUNDING * gross


def kernel_grads(spec: Einsum, x, g, kernel_shape) -> jnp.ndarray:
    """Each example's kernel gradient G_b (float32 [B, *kernel_shape]): the outer form,
    kept for the clipped sum when the norm takes it (``Tap.grads``). Formed as
    :func:`kernel_sq_norms` forms it ([B, P, Kx, Ko]: the small CNN's step with its
    first convolution's G formed as ``einsum("bsa,bsc->bac")`` took 0.1-0.2 ms
    longer, alternated in one process by an ad-hoc script), then laid out as the kernel."""
    xr, gr = _grouped(spec, x, g)
    per = jnp.einsum("bspa,bspc->bpac", xr, gr)
    (z,) = _free(spec, 1)
    sizes = dict(zip(spec.x, x.shape[1:])) | dict(zip(spec.out, g.shape[1:]))
    per = per.reshape(x.shape[0], *(sizes[c] for c in spec.shared + spec.kx + spec.ko))
    per = jnp.einsum(f"{z}{spec.shared}{spec.kx}{spec.ko}->{z}{spec.k}", per)
    return per.reshape(x.shape[0], *kernel_shape)


def kernel_sum(spec: Einsum, x, g, factor, kernel_shape) -> jnp.ndarray:
    """Σ_b factor_b·G_b in float32, one contraction over the examples.

    The factors scale the smaller of x and g, which the contraction also takes first:
    XLA's CPU dot copies its first operand into its own layout. 88 examples × 16
    positions (a 3×3×16 → 32 convolution's patches): 0.31 ms against 0.51 with x
    first; × 64 tokens, 256 → 64: 2.7 against 6.1 ms; 64 → 256 the other way round,
    2.0 against 8.6 ms.
    """
    (z,) = _free(spec, 1)
    scale = lambda a: a.astype(jnp.float32) * factor.reshape((-1,) + (1,) * (a.ndim - 1))  # noqa: E731
    if g.size < x.size:
        out = jnp.einsum(f"{z}{spec.out},{z}{spec.x}->{spec.k}", scale(g), x.astype(jnp.float32))
    else:
        out = jnp.einsum(f"{z}{spec.x},{z}{spec.out}->{spec.k}", scale(x), g.astype(jnp.float32))
    return out.reshape(kernel_shape)


def bias_grads(g, bias_shape) -> jnp.ndarray:
    """Each example's bias gradient (float32 [B, *bias_shape]): g summed over the axes
    the bias is broadcast along."""
    per = _reduce_to(g.astype(jnp.float32), tuple(bias_shape))
    return per.reshape(g.shape[0], *bias_shape)


def _reduce_to(g, shape) -> jnp.ndarray:
    """g [B, *out] summed over the axes a bias of ``shape`` (trailing-aligned) broadcasts along."""
    lead = g.ndim - 1 - len(shape)
    g = jnp.sum(g, axis=tuple(range(1, 1 + lead))) if lead > 0 else g
    axes = tuple(i + 1 for i, n in enumerate(shape) if n == 1 and g.shape[i + 1] != 1)
    return jnp.sum(g, axis=axes, keepdims=True) if axes else g


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


# An embedding's norm forms keep T×max(T, d) numbers an example (a comparison, Gram
# products or sums of g), several such arrays at once, and a convolution's unfolded
# patches its window times its input. A batch whose temporaries fit in
# NORM_PASS_NUMBERS is one pass (the usual batches: the same operations as without
# chunks); a larger one is taken in chunks of NORM_CHUNK_NUMBERS (benchmarks/clipping.py
# at logical batch 1,024, 1,170 rows, peak temporary memory of the step: text
# classifier 56 MiB in one pass, 33 in chunks of 2²⁰ numbers, 22 in chunks of 2¹⁸;
# the small CNN 34, 19, 17.6; plain Keras 16.5 and 11).
NORM_PASS_NUMBERS = 1 << 20
NORM_CHUNK_NUMBERS = 1 << 18


def embedding_sq_norms(ids, g) -> jnp.ndarray:
    """‖Σ_t onehot(id_t) ⊗ g_t‖² per example: Σ_{s,t: id_s = id_t} ⟨g_s, g_t⟩, by the
    cheapest exact form: the T×T Gram products, g summed over equal ids at each id's
    first position (:func:`first_position_sq_norms`), or for long sequences over the
    runs of the sorted ids (:func:`sorted_sq_norms`); over chunks of rows
    (:func:`by_row_chunks`) when the batch is large."""
    ids = ids.reshape(ids.shape[0], -1)
    g = g.reshape(ids.shape[0], ids.shape[1], -1).astype(jnp.float32)
    if ids.shape[1] == 1:
        return jnp.sum(jnp.square(g), axis=(1, 2))
    form = embedding_form(ids.shape[1], g.shape[2])
    norms = {"sorted": sorted_sq_norms, "first": first_position_sq_norms, "gram": gram_sq_norms}
    rows = chunk_rows(ids.shape[1] * max(ids.shape[1], g.shape[2]), ids.shape[0])
    return by_row_chunks(norms[form], rows, ids, g)


def gram_sq_norms(ids, g) -> jnp.ndarray:
    """Σ_{s,t: id_s = id_t} ⟨g_s, g_t⟩ per example (ids [B, T], g [B, T, d]): the T×T
    Gram products of g, kept where the ids are equal; plus :data:`ROUNDING` times their
    gross size, Σ_{s,t: id_s = id_t} ‖g_s‖‖g_t‖ (an upper bound, as
    :func:`kernel_sq_norms`'s; added term by term, in the same pass: as a second sum it
    took 25% longer)."""
    same = ids[:, :, None] == ids[:, None, :]
    gg = jnp.einsum("bsd,btd->bst", g, g)
    size = jnp.linalg.norm(g, axis=-1)
    margin = ROUNDING * size[:, :, None] * size[:, None, :]
    return jnp.sum(jnp.where(same, gg + margin, 0.0), axis=(1, 2))


def chunk_rows(numbers_per_row: int, batch: int) -> int:
    """Rows a chunk for :func:`by_row_chunks`: the whole ``batch`` when its norm
    temporaries, ``numbers_per_row`` each, fit in :data:`NORM_PASS_NUMBERS`, otherwise
    the rows that fit in :data:`NORM_CHUNK_NUMBERS` (at least one)."""
    if batch * numbers_per_row <= NORM_PASS_NUMBERS:
        return batch
    return max(1, NORM_CHUNK_NUMBERS // numbers_per_row)


def by_row_chunks(norms, rows: int, *arrays) -> jnp.ndarray:
    """``norms(*arrays)`` (float32, one value or array a row; each array's rows on
    axis 0) computed ``rows`` rows at a time, in a loop, when there are more.

    The last chunk is not padded: it starts ``rows`` before the end, so its first rows
    are computed again and written again with their own values (each value is one
    row's alone; nothing is summed across rows here, so no row can count twice).
    """
    batch = arrays[0].shape[0]
    if batch <= rows:
        return norms(*arrays)

    def part(start):
        return norms(*(jax.lax.dynamic_slice_in_dim(a, start, rows) for a in arrays))

    def chunk(i, out):
        start = jnp.minimum(i * rows, batch - rows)
        return jax.lax.dynamic_update_slice_in_dim(out, part(start).astype(out.dtype), start, 0)

    shape = jax.eval_shape(part, 0).shape[1:]
    out = jnp.zeros((batch, *shape), jnp.float32)
    return jax.lax.fori_loop(0, -(-batch // rows), chunk, out)


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
    """Σ_v ‖Σ_{t: id_t = v} g_t‖² from the rows' sums of g [B, V', d], plus :data:`ROUNDING`
    times their gross size Σ_v (Σ_{t: id_t = v} ‖g_t‖)² from the sums ``sizes`` [B, V'] of
    the positions' norms. The clipped sum (:func:`embedding_sum`) adds each share f_b·g_t
    into the table one by one, among other examples', rounded by units of 2⁻²⁴ of its
    size: a crafted example (64 tokens, each id twice with opposite gradients of size
    10⁴) added 1.004·C among 7 others without the margin, which bounds f_b·(the shares'
    size) by C/(4·2⁻¹²)."""
    return jnp.sum(jnp.square(rows), axis=(1, 2)) + ROUNDING * jnp.sum(jnp.square(sizes), axis=1)


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


def ties(spec: Einsum) -> bool:
    """Whether ``spec`` reads its kernel as an embedding table [V, d] read in reverse:
    ``out[..., v] = Σ_d x[..., d]·table[v, d]`` (a tied output projection)."""
    return not spec.shared and len(spec.kx) == 1 and spec.k == spec.ko + spec.kx


def tied_cross(ids, g, spec: Einsum, h, delta) -> tuple[jnp.ndarray, jnp.ndarray]:
    """⟨A_b, R_b⟩ per example (float32 [B]) for a table read twice: A_b its lookup's
    gradient, Σ_t onehot(id_t) ⊗ g_t (ids [B, T], g [B, T, d]), and R_b its reversed
    read's, Σ_s δ_s ⊗ h_s (:func:`ties`: h [B, S, d] in, δ [B, S, V] at the logits).
    Σ_{s,t} δ_s[id_t]·⟨g_t, h_s⟩: S·T·d multiply-adds an example, the two [V, d]
    gradients never formed; ‖A_b + R_b‖² = ‖A_b‖² + ‖R_b‖² + 2·⟨A_b, R_b⟩.

    Also the products' gross size, Σ_{s,t} |δ_s[id_t]|·‖g_t‖‖h_s‖ (float32 [B]): where
    A_b ≈ -R_b the norm's three terms cancel, and :data:`ROUNDING` times 4 gross sizes
    bounds what float32 rounding takes from it (:func:`keras_dp.ghost_tap.cross_terms`).
    """
    ids = ids.reshape(ids.shape[0], -1)
    g = g.reshape(ids.shape[0], ids.shape[1], -1).astype(jnp.float32)
    xr, gr = _grouped(spec, h, delta)
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

    rows = chunk_rows(3 * ids.shape[1] * xr.shape[1], ids.shape[0])
    both = by_row_chunks(cross, rows, ids, g, xr, gr)
    return both[:, 0], both[:, 1]


def tied_term(ids, g, spec: Einsum, h, delta) -> jnp.ndarray:
    """2·⟨A_b, R_b⟩ (:func:`tied_cross`) plus :data:`ROUNDING` times 4 of its products'
    gross sizes (float32 [B]): added to the two reads' own squared norms, an upper bound
    on ‖A_b + R_b‖². Where A_b ≈ -R_b the three terms, each about 2·|⟨A_b, R_b⟩| (at
    most twice the gross size), cancel: a soak drew ‖A_b‖² = 14.8, ‖R_b‖² = 15.2 whose
    ‖A_b + R_b‖² = 0.0034 came out 1.1e-5 low, 3 units of 2⁻²⁴ of the terms' 60."""
    inner, gross = tied_cross(ids, g, spec, h, delta)
    return 2 * inner + 4 * ROUNDING * gross


DENSE = Einsum("ab", "bc", "ac", "", "b", "c", "a")  # rows × features → rows × units
