"""Per-example gradient norms and clipped sums of linear maps, from activations (pure JAX).

A layer ``out = einsum(eq, x, K)`` gives example b the kernel gradient
``G_b = einsum(x_b, g_b)`` (``g_b = ∂loss_b/∂out_b``), so ‖G_b‖² and the clipped sum
``Σ_b f_b·G_b`` both follow from (x, g) without any G_b being kept: "ghost" norms
(Goodfellow 2015; Li et al. 2022, Bu et al. 2023 for sequences). For a sequence
the norm is taken as the faster of two exact forms, chosen from the shapes by
measured times (:func:`form_times`):

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


def grouped(spec: Einsum, x, g):
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


def sizes(spec: Einsum, x_shape, out_shape) -> tuple[int, int, int, int]:
    """(S, P, Kx, Ko) of one example: the sizes of the positions summed, the shared
    letters, and the kernel's letters from x and from out."""
    known = dict(zip(spec.x, x_shape)) | dict(zip(spec.out, out_shape))
    size = lambda letters: math.prod(known[c] for c in letters)  # noqa: E731
    return size(spec.summed), size(spec.shared), size(spec.kx), size(spec.ko)


def costs(spec: Einsum, x_shape, out_shape) -> tuple[int, int]:
    """Multiply-adds per example of the (outer, Gram) forms of the squared norm."""
    return form_costs(*sizes(spec, x_shape, out_shape))


def form_costs(s: int, p: int, a: int, c: int) -> tuple[int, int]:
    """(outer, Gram) multiply-adds for S positions, P shared, Kx = a and Ko = c."""
    return s * p * a * c, s * s * p * (a + c)


def outer_form(spec: Einsum, x_shape, out_shape, rows: int | None = None) -> bool:
    """Whether the outer form is the faster, per example (:func:`outer_is_faster`): of
    the norm alone, or, given the chunk's ``rows``, of the norm and the clipped sum, each
    example's gradient kept for it (``Tap.grads``), and then only where those gradients
    take no more memory than x and g do, or at most :data:`KEPT_NUMBERS` numbers for
    all the rows (:func:`keeps`: the step keeps one or the other for its sum). BERT tiny fully
    fine-tuned (``benchmarks/clipping.py``), whose projections now keep them: its step's
    peak temporary memory at logical batch 1,024 went 1,765 → 1,509 MiB (plain Keras'
    on the same 1,170 rows: 1,488)."""
    s, p, a, c = sizes(spec, x_shape, out_shape)
    if rows is None:
        return outer_is_faster(s, p, a, c, summed=False)
    return keeps(rows, p * a * c, s * p * (a + c)) and outer_is_faster(s, p, a, c)


# The most numbers (float32: 16 MiB) one tap's kept per-example gradients may hold
# beyond its x and g (:func:`keeps`).
KEPT_NUMBERS = 1 << 22


def keeps(rows: int, kernel: int, inputs: int) -> bool:
    """Whether ``rows`` examples' gradients of ``kernel`` numbers each may be kept for
    the clipped sum: they hold no more numbers than the ``inputs`` (x and g, an
    example) the sum would read instead, or at most :data:`KEPT_NUMBERS` in all.

    Refused, the sum contracts x and g again (a chunk of a CNN's 3×3 convolution of 128
    channels on 16×16, 330 rows: the step 19% slower), and memory is what the tap's
    inputs take (that CNN's step at logical batch 1,024, one chunk of 1,170 rows:
    1,410 → 898 MiB, plain Keras' 735)."""
    return rows * kernel <= max(KEPT_NUMBERS, rows * inputs)


def form_times(s: int, p: int, a: int, c: int, summed: bool = True) -> tuple[float, float]:
    """(outer, Gram) time of one example (picoseconds, a fit to measurements) for S
    positions, P shared, Kx = a and Ko = c: the norm and the clipped sum (the outer form
    sums the gradients it formed, the Gram form contracts x and g again), or, not
    ``summed``, the norm alone (a kernel read more than once takes its sum apart).

    Fitted by non-negative least squares (relative errors) to each form's time, compiled
    with the step's options, on 2 CPU cores (AMD EPYC), 88 examples, the 43 einsums over
    positions of ``benchmarks/dense_norm_forms.py`` (4-256 positions, 4-512 features,
    attention's projections, a kernel per head). A second run of it
    (``benchmarks/results/dense-norm-forms``): these times pick the faster form for 42
    of its 48 einsums (one position included), the others within 1.36× (0.10 against
    0.075 ms); the rule before (``2·outer + 32·Kx·Ko ≤ Gram`` multiply-adds) for 25,
    up to 4.5× slower. E.g. ms with the sum, (positions, in, out) = (64, 64, 64),
    BERT tiny's query: outer 0.40, Gram 1.34; (16, 144, 32): 0.19 and 0.33; (4, 256,
    256): 1.40 and 0.42; (128, 256, 256): 9.0 and 22.6. Writing each example's
    gradient out costs the outer form more than its products at few positions; the
    Gram form's S² products and their margin grow fastest.
    """
    positions, kernel, width = s * p * a * c, p * a * c, s * p * (a + c)
    if summed:
        outer = 10.2 * positions + 147 * kernel + 26.5 * width + 8.33e5
        gram = 9.99 * s * width + 150 * width + 702 * s * s * p + 1.07e6 + 14.6 * positions
    else:
        outer = 9.53 * positions + 39.6 * kernel + 9.0 * width + 2.39e5
        gram = 5.22 * s * width + 495 * width + 236 * s * s * p + 3.85e5
    return outer, gram


def outer_is_faster(s: int, p: int, a: int, c: int, summed: bool = True) -> bool:
    """Whether the outer form takes less time than the Gram form (:func:`form_times`)
    for the sizes (S, P, Kx, Ko); never for one position, where the Gram form is
    ‖x‖²·‖g‖² (no products to spare)."""
    if s <= 1:
        return False
    outer, gram = form_times(s, p, a, c, summed)
    return outer <= gram


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
    xr, gr = grouped(spec, x, g)
    return chunked_sq_norms(xr, gr, outer_form(spec, x.shape[1:], g.shape[1:]))


def chunked_sq_norms(xr, gr, outer: bool) -> jnp.ndarray:
    """:func:`grouped_sq_norms`, in chunks of rows (:func:`by_row_chunks`) where the
    form's temporaries (G_b, or the two Gram matrices) hold more numbers than x and g
    and more than :data:`NORM_PASS_NUMBERS` in all."""
    s, p, a, c = xr.shape[1:] + gr.shape[-1:]
    per_row = p * a * c if outer else 2 * p * s * s
    batch = xr.shape[0]
    rows = chunk_rows(per_row, batch, max(NORM_PASS_NUMBERS, batch * s * p * (a + c)))
    return by_row_chunks(lambda xr, gr: grouped_sq_norms(xr, gr, outer), rows, xr, gr)


def grouped_sq_norms(xr, gr, outer: bool) -> jnp.ndarray:
    """:func:`kernel_sq_norms` of :func:`grouped`'s xr [B, S, P, Kx] and gr [B, S, P, Ko]
    (float32), by the outer form if ``outer``, else the Gram form with its margin."""
    if outer:
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
    xr, gr = grouped(spec, x, g)
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


def chunk_rows(
    numbers_per_row: int,
    batch: int,
    pass_numbers: int | None = None,
    chunk_numbers: int | None = None,
) -> int:
    """Rows a chunk for :func:`by_row_chunks`: the whole ``batch`` when its norm
    temporaries, ``numbers_per_row`` each, fit in ``pass_numbers``, otherwise the rows
    that fit in ``chunk_numbers`` (at least one). Unset, the limits are
    :data:`NORM_PASS_NUMBERS` and :data:`NORM_CHUNK_NUMBERS` as they are at the call
    (tests lower them)."""
    pass_numbers = NORM_PASS_NUMBERS if pass_numbers is None else pass_numbers
    chunk_numbers = NORM_CHUNK_NUMBERS if chunk_numbers is None else chunk_numbers
    if batch * numbers_per_row <= pass_numbers:
        return batch
    return max(1, chunk_numbers // numbers_per_row)


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


DENSE = Einsum("ab", "bc", "ac", "", "b", "c", "a")  # rows × features → rows × units
