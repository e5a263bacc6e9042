"""Per-example squared norms of a convolution's kernel gradient for ghost clipping
(pure JAX), by the fastest of three exact forms, and each example's gradient where
the norm forms it.

Example b's kernel gradient is G_b = Σ_s p_bs ⊗ g_bs over the S output positions,
p_bs the patch position s reads (the window's prod(window)·C numbers of x_b) and g_bs
the gradient there. Its squared norm is taken as

- outer: G_b formed from the unfolded patches and squared (S·Kx·Ko multiply-adds,
  Kx = prod(window)·C, Ko the filters), then kept for the clipped sum
  (:func:`input_grads`);
- Gram: Σ_{s,t} (p_bs·p_bt)(g_bs·g_bt) from the patches' Gram matrix and g's
  (S²·(Kx + Ko));
- shifted: the same sum, the patches' Gram matrix added up from the input's own,
  p_bs·p_bt = Σ_o x_b[σs + δo]·x_b[σt + δo] over the window offsets o (σ the strides,
  δ the dilation, x padded): N²·C + S²·Ko products for the N input positions the
  windows reach, and prod(window)·S² additions. No patches are unfolded.

Which is fastest depends on the shapes (:func:`form_times`, measured). The Gram and
shifted forms are upper bounds by :data:`keras_dp.ghost_norms.ROUNDING` times their
products' gross size, as the dense Gram form (:func:`keras_dp.ghost_norms.grouped_sq_norms`).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from keras_dp import ghost_conv as gc
from keras_dp import ghost_norms as gn

# The shifted form keeps the input's N×N Gram matrix an example; past this many
# numbers its additions over the window offsets ran far slower than their count (88
# examples of 16×16 inputs, N = 256 to 324: 7-40 ms against 0.2-1.8 for the outer form).
SHIFTED_NUMBERS = 1 << 15


def form_times(s: int, taps: int, channels: int, filters: int, n: int | None) -> dict:
    """Each exact form's time for one example (picoseconds, a fit to measurements), by
    name: S output positions, a window of ``taps`` offsets over ``channels``,
    ``filters`` outputs, and the N positions of the (padded) input the windows reach,
    or None where the shifted form is out (a kernel read more than once).

    Fitted by non-negative least squares (relative errors) to the three forms' norms
    alone (no sums), compiled with the step's options, on 2 CPU cores (AMD EPYC), 88
    examples, the 28 convolutions of ``benchmarks/conv_norm_forms.py`` (1-D and 2-D,
    1-128 channels, windows of 1-7, strides 1-2, dilations 1-4). A second run of it
    (``benchmarks/results/conv-norm-forms``): these times pick the fastest form for 26
    and one within 3% for the other two. E.g. ms for Keras' text CNN's Conv1D (width 5,
    32 → 32, 64 positions): outer 0.91, Gram 1.12, shifted 0.68; the small CNN's second
    (3×3, 16 → 32 on 6×6): 0.19, 0.19, 0.23; a TCN's dilated one (3 taps at dilation 2,
    32 → 32): 0.29, 1.03, 0.94. Writing each example's gradient out, not its products,
    is most of the outer form's time; the dense layers' rule
    (:func:`keras_dp.ghost_norms.outer_is_faster`, used for convolutions until session
    60) chose the Gram form for the text CNN's and the 1×1 convolutions of the
    MobileNet-like CNN.
    """
    w = taps * channels
    times = {
        "outer": 1.23 * s * w * filters + 326 * w * filters + 546 * s * w + 251e3,
        "gram": 10.7 * s * s * (w + filters) + 266 * s * w + 199 * s * s + 1.07e6,
    }
    if _shifted_fits(n):
        products = n * n * channels + s * s * filters
        times["shifted"] = 11.1 * products + 94.6 * taps * s * s + 34.8 * (n * n + s * s) + 2.14e6
    return times


def form_costs(s: int, taps: int, channels: int, filters: int, n: int | None) -> dict:
    """Each form's multiply-adds for one example (:func:`form_times`' arguments)."""
    w = taps * channels
    costs = {"outer": s * w * filters, "gram": s * s * (w + filters)}
    if _shifted_fits(n):
        costs["shifted"] = n * n * channels + s * s * filters + taps * s * s
    return costs


def _shifted_fits(n: int | None) -> bool:
    """Whether the shifted form is open: a kernel read once (N given) whose input's
    Gram matrix holds at most :data:`SHIFTED_NUMBERS` numbers."""
    return n is not None and n * n <= SHIFTED_NUMBERS


def _sizes(spec: gc.Conv, x, g) -> tuple[int, int]:
    """(output positions, patch numbers) of one example: S and Kx."""
    return math.prod(g.shape[2:-1]), math.prod(spec.window) * x.shape[-1]


def reach(spec: gc.Conv, out) -> list:
    """The padded input's extent the windows of ``out`` positions read, per axis."""
    return [
        (m - 1) * st + (k - 1) * d + 1
        for m, st, k, d in zip(out, spec.strides, spec.window, spec.dilation)
    ]


def norm_form(spec: gc.Conv, x_shape, g_shape, positions: int | None = None) -> str:
    """ "outer", "gram" or "shifted": the fastest form (:func:`form_times`) for the
    input x [B, 1, *spatial, C] and the gradient g [B, 1, *out, filters]. For a kernel
    read more than once, ``positions`` counts all its reads' output positions, and the
    shifted form is out."""
    out = g_shape[2:-1]
    n = math.prod(reach(spec, out)) if positions is None else None
    s = math.prod(out) if positions is None else positions
    times = form_times(s, math.prod(spec.window), x_shape[-1], g_shape[-1], n)
    return min(times, key=times.get)


def formed(spec: gc.Conv, x_shape, g_shape) -> bool:
    """Whether the norm of a kernel read once takes the outer form and keeps each
    example's gradient (:func:`input_grads`) for the clipped sum: the fastest form
    (:func:`norm_form`), and the gradients of the rows no larger than the inputs x and
    g (:func:`keras_dp.ghost_norms.keeps`). Otherwise the outer norm is taken in chunks
    of rows and the sum is the convolution's own kernel gradient."""
    if norm_form(spec, x_shape, g_shape) != "outer":
        return False
    kernel = math.prod(spec.window) * x_shape[-1] * g_shape[-1]
    inputs = math.prod(x_shape[1:]) + math.prod(g_shape[1:])
    return gn.keeps(x_shape[0], kernel, inputs)


def sq_norms(reads) -> jnp.ndarray:
    """Per-example squared norms (float32 [B]) of one kernel's gradient from ``reads``,
    the (spec, x [B, 1, *spatial, C], g [B, 1, *out, filters]) of each convolution that
    reads it: one, or several for a layer called more than once. A single read takes
    the fastest form (:func:`norm_form`). Several: their gradient is Σ over the reads
    of each read's patches ⊗ g, one Dense einsum's over all the reads' positions laid
    end to end, whose norm takes the faster of the outer and Gram forms for them all
    (:func:`keras_dp.ghost_norms.grouped_sq_norms`). Chunks of rows when the batch is
    large (:func:`keras_dp.ghost_norms.by_row_chunks`)."""
    if len(reads) == 1:
        spec, x, g = reads[0]
        if norm_form(spec, x.shape, g.shape) == "shifted":
            n, s = math.prod(reach(spec, g.shape[2:-1])), math.prod(g.shape[2:-1])
            rows = gn.chunk_rows(n * n + 2 * s * s, x.shape[0])
            return gn.by_row_chunks(lambda x, g: shifted_sq_norms(spec, x, g), rows, x, g)
    sizes = [_sizes(spec, x, g) for spec, x, g in reads]
    positions, window = sum(s for s, _ in sizes), sizes[0][1]
    filters = reads[0][2].shape[-1]
    outer = norm_form(reads[0][0], reads[0][1].shape, reads[0][2].shape, positions) == "outer"
    per_row = positions * window + (window * filters if outer else 2 * positions**2)
    specs = [spec for spec, _, _ in reads]

    def norms(*arrays):
        xs = [gc.conv_patches(spec, x)[:, :, None] for spec, x in zip(specs, arrays[0::2])]
        gs = [g.reshape(g.shape[0], -1, 1, g.shape[-1]) for g in arrays[1::2]]
        xr = jnp.concatenate(xs, axis=1).astype(jnp.float32)  # [B, ΣS, 1, window·C]
        return gn.grouped_sq_norms(xr, jnp.concatenate(gs, axis=1).astype(jnp.float32), outer)

    arrays = [a for _, x, g in reads for a in (x, g)]
    return gn.by_row_chunks(norms, gn.chunk_rows(per_row, arrays[0].shape[0]), *arrays)


def shifted_sq_norms(spec: gc.Conv, x, g) -> jnp.ndarray:
    """The shifted form's squared norms (float32 [B]) from x [B, 1, *spatial, C] and g
    [B, 1, *out, filters]: the patches' Gram matrix as the input's Gram matrix summed
    over the window offsets, times g's, plus the Gram form's rounding margin
    (:data:`keras_dp.ghost_norms.ROUNDING` times (Σ_s ‖p_s‖‖g_s‖)², ‖p_s‖² the Gram
    matrix's diagonal)."""
    batch, out = x.shape[0], g.shape[2:-1]
    extent = reach(spec, out)
    padded = gc._padded(spec, x.reshape(batch, *x.shape[2:]).astype(jnp.float32))
    padded = padded[(slice(None), *(slice(0, r) for r in extent))]
    flat = padded.reshape(batch, -1, padded.shape[-1])
    inputs = jnp.einsum("bnc,bmc->bnm", flat, flat).reshape(batch, *extent, *extent)
    patches = 0
    for at in gc.window_slices(spec, out):  # the same offset in both halves
        patches = patches + inputs[(slice(None), *at, *at)]
    s = math.prod(out)
    patches = patches.reshape(batch, s, s)
    gf = g.reshape(batch, s, g.shape[-1]).astype(jnp.float32)
    grads = jnp.einsum("bsf,btf->bst", gf, gf)
    diagonal = lambda a: jnp.diagonal(a, axis1=1, axis2=2)  # noqa: E731
    sizes = jnp.sqrt(diagonal(patches) * diagonal(grads))
    gross = jnp.square(jnp.sum(sizes, axis=1))
    return jnp.sum(patches * grads, axis=(1, 2)) + gn.ROUNDING * gross


def input_grads(spec: gc.Conv, x, g, kernel_shape) -> jnp.ndarray:
    """Each example's kernel gradient (float32 [B, *kernel_shape]) from the input x
    [B, 1, *spatial, C] and g [B, 1, *out, filters]: its patches' contraction with g,
    a chunk of rows at a time when the batch is large."""
    positions, window = _sizes(spec, x, g)
    rows = gn.chunk_rows(positions * window + window * g.shape[-1], x.shape[0])

    def grads(x, g):
        g = g.reshape(g.shape[0], -1, g.shape[-1])
        return gn.kernel_grads(gn.DENSE, gc.conv_patches(spec, x), g, kernel_shape)

    return gn.by_row_chunks(grads, rows, x, g)
