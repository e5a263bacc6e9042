"""Convolutions for ghost clipping (pure JAX): the layer's output, its gradients, and
the clipped sum.

A convolution ``out = conv(x, K)`` (channels last, one group) is an einsum over x's
unfolded patches: with S the output positions, Kx = C·prod(window) and Ko the
filters, example b's kernel gradient is ``patches_bᵀ·g_b``; its squared norm takes
one of three exact forms (:mod:`keras_dp.ghost_conv_norms`).

On a CPU every convolution here is a forward convolution in XLA's canonical layout
(operands transposed explicitly). XLA's CPU compiler runs the convolutions that
autodiff writes for a gradient (kernel: examples contracted; input: the kernel's
feature axes swapped) far slower inside a loop such as a chunked step's
(jax-ml/jax#12868). Measured on 2 cores, 128 rows in chunks of 16 in a
``fori_loop``, 3×3 kernels (ms, autodiff's → canonical): kernel gradient, 32 → 64
filters on 14×14, 485 → 18; input gradient, 32 → 32 on 30×30, 461 → 15. Outside a
loop they take alike (17 and 16 ms). Accelerators keep autodiff's.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from keras_dp import _backend
from keras_dp import ghost_norms as gn


class Conv(NamedTuple):
    """A convolution ``out = conv(x, K)`` (channels last, one group) seen as an einsum
    over its unfolded patches: S = output positions, Kx = C·prod(window), Ko = filters.

    Attributes:
      window: The kernel's spatial shape.
      strides, dilation: Per spatial axis.
      padding: "VALID", "SAME", or the (low, high) padding of each spatial axis
        (negative: cropped).
    """

    window: tuple
    strides: tuple
    padding: str | tuple
    dilation: tuple


def conv(spec: Conv, x, kernel, canonical: bool | None = None) -> jnp.ndarray:
    """``keras.ops.conv(x, kernel, ...)`` for channels-last x [B, *spatial, C] (cast to
    the kernel's dtype). When ``canonical`` (default: on a CPU) its gradient at x is a
    canonical convolution and at the kernel a contraction of the unfolded patches
    (under ``jax.vmap``, each example's: a batched matrix product)."""
    x = x.astype(kernel.dtype)
    if canonical is None:
        canonical = _backend.on_cpu()
    return _canonical_conv(spec, x, kernel) if canonical else _forward(spec, x, kernel)


def conv_patches(spec: Conv, x) -> jnp.ndarray:
    """x [B, 1, *spatial, C] as patches [B, positions, prod(window)·C], in the kernel's
    (*window, C) order: one strided slice per window offset (an im2col without the
    grouped convolution ``lax.conv_general_dilated_patches`` uses, slow on CPUs)."""
    x = _padded(spec, x.reshape(x.shape[0], *x.shape[2:]))
    patches = jnp.stack(_windows(spec, x), axis=-2)  # [B, *out, prod(window), C]
    return patches.reshape(x.shape[0], -1, patches.shape[-2] * patches.shape[-1])


def _windows(spec: Conv, x) -> list:
    """One strided slice [B, *out, C] of x [B, *spatial, C] (its padding explicit) per
    window offset, in the kernel's order: what the offset's kernel entries multiply."""
    pieces = []
    for at in window_slices(spec, _out_spatial(spec, x.shape[1:-1])):
        start, limit = [a.start for a in at], [a.stop for a in at]
        strides = (1, *spec.strides, 1)
        pieces.append(jax.lax.slice(x, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]), strides))
    return pieces


def window_slices(spec: Conv, out) -> list:
    """Per window offset (the kernel's order), the strided slice along each spatial
    axis of the padded input that the offset's kernel entries read for the ``out``
    output positions."""
    return [
        tuple(
            slice(o * d, o * d + (m - 1) * st + 1, st)
            for o, d, m, st in zip(offset, spec.dilation, out, spec.strides)
        )
        for offset in itertools.product(*(range(k) for k in spec.window))
    ]


def _out_spatial(spec: Conv, padded) -> list:
    """The output's spatial shape over an input whose padding is explicit."""
    reach = [(k - 1) * d + 1 for k, d in zip(spec.window, spec.dilation)]
    return [(n - r) // s + 1 for n, r, s in zip(padded, reach, spec.strides)]


def depthwise(spec: Conv, x, kernel) -> jnp.ndarray:
    """``keras.ops.depthwise_conv(x, kernel)`` for channels-last x [N, *spatial, C] and
    kernel [*window, C, M], as output [N, S, C, M] (:func:`depthwise_layout` lays it
    out as Keras does): Σ over the window offsets o of x's strided slice at o times
    the kernel's entries at o, summed in float32. No grouped convolution (it and its
    gradients are slow on CPUs) and no unfolded patches (prod(window) times x's
    numbers, and a transposed copy of them for an einsum)."""
    pieces = _windows(spec, _padded(spec, x))
    weights = kernel.astype(jnp.float32).reshape(len(pieces), *kernel.shape[-2:])
    out = sum(p.astype(jnp.float32)[..., None] * w for p, w in zip(pieces, weights))
    return out.reshape(x.shape[0], -1, *kernel.shape[-2:]).astype(kernel.dtype)


# A depthwise kernel's per-example gradients (:func:`depthwise_grads`) read one
# strided slice of the input per window offset, and XLA's CPU backend writes each slice
# out for its reduction, all of them before the reductions. They are taken in one pass
# while the slices hold at most DEPTHWISE_NUMBERS numbers (16 MiB in float32), in
# chunks of rows that hold that many otherwise. Measured on 2 CPU cores: the
# MobileNet-like model of benchmarks/clipping.py (first depthwise layer: 9 slices of
# 13×13×16 an example) at its usual 88 rows, 2.1M numbers, took 3.31 ms a compiled step
# in one pass against 4.36 in chunks of 2¹⁸ numbers and 4.79 as a loop over the
# offsets; at logical batch 1,024 (1,170 rows) its step's peak temporary memory was
# 265 MiB in one pass, 167 in chunks of 2¹⁸ to 2²² numbers.
DEPTHWISE_NUMBERS = 1 << 22


def depthwise_grads(spec: Conv, x, g, kernel_shape) -> jnp.ndarray:
    """Each example's depthwise kernel gradient (float32 [B, *window, C, M]) from its
    input x [B, 1, *spatial, C] and the gradient g [B, 1, S, C, M] at
    :func:`depthwise`'s output: G_b[o, c, m] = Σ_s x_b[s·stride + o·dilation, c] ·
    g_b[s, c, m], one multiply-reduce over a strided slice of x per window offset o, so
    no patches are unfolded (they hold prod(window) times x's numbers, and their
    contraction with g is a product XLA's CPU dots run slowly: 88 examples of
    15×15×16, a 3×3 window, measured alone, 0.52–0.59 ms and 8.2 MiB against
    1.77–1.88 ms and 17.2 MiB), in chunks of rows past :data:`DEPTHWISE_NUMBERS`."""
    numbers = math.prod(spec.window) * math.prod(g.shape[2:-1])  # the slices, an example
    rows = gn.chunk_rows(numbers, x.shape[0], DEPTHWISE_NUMBERS, DEPTHWISE_NUMBERS)

    def grads(x, g):
        x = _padded(spec, x.reshape(x.shape[0], *x.shape[2:]).astype(jnp.float32))
        out = _out_spatial(spec, x.shape[1:-1])
        g = g.reshape(g.shape[0], *out, *g.shape[-2:]).astype(jnp.float32)
        axes = tuple(range(1, len(out) + 1))
        per_offset = [jnp.sum(piece[..., None] * g, axis=axes) for piece in _windows(spec, x)]
        return jnp.stack(per_offset, axis=1).reshape(x.shape[0], *kernel_shape)  # [B, W, C, M]

    return gn.by_row_chunks(grads, rows, x, g)


def grouped_equation(rank: int) -> str:
    """The einsum of a convolution of G groups over :func:`grouped` patches
    [N, S, *window, G, C/G] with its kernel as [*window, C/G, G, F/G]: G is in the
    patches, the kernel and the output [N, S, G, F/G], so each group's gradient is kept
    apart."""
    window = "ijk"[:rank]
    return f"ns{window}gc,{window}cgo->nsgo"


def grouped(spec: Conv, x, kernel, groups: int) -> tuple:
    """(patches [N, S, *window, G, C/G], output [N, S, G, F/G]): ``keras.ops.conv(x,
    kernel)`` of ``groups`` groups (XLA's ``feature_group_count``: group g reads channels
    g·C/G … and writes filters g·F/G …) for channels-last x [N, *spatial, C] and kernel
    [*window, C/G, F], as :func:`grouped_equation`'s einsum over x's unfolded patches
    (no grouped convolution, slow on CPUs); :func:`depthwise_layout` lays it out as
    Keras does.

    The einsum reads the kernel as [*window, C/G, G, F/G], a reshape: its gradients
    and sums (``ghost_norms``) come out in that order, which reshapes back to the
    kernel's, and the letters x shares with it lead both shapes (a tap's cost reads
    them from the kernel's shape)."""
    patches = conv_patches(spec, x[:, None])
    patches = patches.reshape(*patches.shape[:2], *spec.window, groups, -1).astype(kernel.dtype)
    operand = kernel.reshape(*kernel.shape[:-1], groups, kernel.shape[-1] // groups)
    return patches, jnp.einsum(grouped_equation(len(spec.window)), patches, operand)


def depthwise_layout(spec: Conv, x_shape, out) -> jnp.ndarray:
    """:func:`depthwise`'s output [N, S, C, M] as [N, *out, C·M] (channel c·M + m), or
    :func:`grouped`'s [N, S, G, F/G] as [N, *out, F]."""
    padded = [n + low + high for n, (low, high) in zip(x_shape[1:-1], _pads(spec, x_shape[1:-1]))]
    return out.reshape(x_shape[0], *_out_spatial(spec, padded), -1)


def conv_sum(spec: Conv, x, g, factor, kernel_shape, canonical: bool | None = None):
    """Σ_b factor_b·G_b in the kernel's layout (*window, C, filters), from the input x
    [B, 1, *spatial, C] and g [B, 1, *out, filters]: the kernel gradient of the
    convolution over the examples at the output gradient factor_b·g_b, read from x as
    it is (a contraction of the patches copied them into its layout first; the small
    CNN's compiled step on 88 rows, 1.85 → 1.55 ms). ``canonical`` as in :func:`conv`.
    """
    x = x.reshape(x.shape[0], *x.shape[2:]).astype(jnp.float32)
    g = g.reshape(g.shape[0], *g.shape[2:]).astype(jnp.float32)
    g = g * factor.reshape((-1,) + (1,) * (g.ndim - 1))
    if canonical is None:
        canonical = _backend.on_cpu()
    if canonical:
        return _kernel_grad(spec, x, g)
    _, pullback = jax.vjp(lambda k: _forward(spec, x, k), jnp.zeros(kernel_shape, jnp.float32))
    return pullback(g)[0]


def _numbers(spec: Conv) -> tuple:
    spatial = "DHW"[3 - len(spec.window) :]
    return (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")


def _pads(spec: Conv, spatial) -> list:
    """(low, high) padding per spatial axis: none for "VALID"; for "SAME" as XLA pads
    (the odd row at the end); explicit ones as given."""
    if not isinstance(spec.padding, str):
        return list(spec.padding)
    if spec.padding != "SAME":
        return [(0, 0)] * len(spatial)
    pads = []
    for n, k, d, s in zip(spatial, spec.window, spec.dilation, spec.strides):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def _padded(spec: Conv, x) -> jnp.ndarray:
    """x [B, *spatial, C] with the convolution's padding made explicit."""
    config = [(0, 0, 0), *((low, high, 0) for low, high in _pads(spec, x.shape[1:-1])), (0, 0, 0)]
    return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


def _forward(spec: Conv, x, kernel) -> jnp.ndarray:
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=spec.strides,
        padding=_pads(spec, x.shape[1:-1]),
        rhs_dilation=spec.dilation,
        dimension_numbers=_numbers(spec),
    )


def _kernel_grad(spec: Conv, x, g) -> jnp.ndarray:
    """Σ_b of x_b's kernel gradient at g_b [B, *out, filters], canonically:
    G[k, c, f] = Σ_b Σ_p x[b, s·p + d·k, c]·g[b, p, f] is x with its channels and
    examples swapped, convolved with g (examples → filters) at stride d and kernel
    dilation s; its first prod(window) offsets are the kernel's."""
    out = jax.lax.conv_general_dilated(
        jnp.swapaxes(_padded(spec, x), 0, -1),
        jnp.moveaxis(g, 0, -2),
        window_strides=spec.dilation,
        padding="VALID",
        rhs_dilation=spec.strides,
        dimension_numbers=_numbers(spec),
    )
    out = out[(slice(None), *(slice(0, k) for k in spec.window))]
    return jnp.moveaxis(out, 0, -2)


def _input_grad(spec: Conv, g, kernel, x_shape) -> jnp.ndarray:
    """The gradient at x [B, *spatial, C] from g at the output, canonically: g
    dilated by the strides and padded to full overlap, convolved with the kernel
    flipped in space and its channels and filters swapped."""
    pads = []
    for n, m, k, d, s, (low, _) in zip(
        x_shape[1:-1],
        g.shape[1:-1],
        spec.window,
        spec.dilation,
        spec.strides,
        _pads(spec, x_shape[1:-1]),
    ):
        pads.append(((k - 1) * d - low, n - 1 + low - (m - 1) * s))
    flipped = jnp.flip(kernel, tuple(range(len(spec.window)))).swapaxes(-1, -2)
    return jax.lax.conv_general_dilated(
        g,
        flipped,
        window_strides=(1,) * len(spec.window),
        padding=pads,
        lhs_dilation=spec.strides,
        rhs_dilation=spec.dilation,
        dimension_numbers=_numbers(spec),
    )


# Unfolded patches of one call (float32 bytes: one example's under jax.vmap) above
# which a kernel's gradient is a canonical convolution instead of their contraction:
# a 3×3, 64-channel convolution over 224×224 would unfold 115 MB an example.
_PATCH_BYTES = 2**24


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _canonical_conv(spec: Conv, x, kernel):
    return _forward(spec, x, kernel)


def _canonical_conv_fwd(spec: Conv, x, kernel):
    return _forward(spec, x, kernel), (x, kernel)


def _canonical_conv_bwd(spec: Conv, residuals, g):
    """The input's gradient canonically; the kernel's from the unfolded patches, so
    that each example's kernel gradient (the per-example path, under ``jax.vmap``) is
    a batched matrix product rather than a grouped convolution, unless the patches
    would exceed ``_PATCH_BYTES`` (then canonically too: no memory beyond x and g)."""
    x, kernel = residuals
    dx = _input_grad(spec, g, kernel, x.shape)
    positions = math.prod(g.shape[:-1])
    if 4 * positions * math.prod(kernel.shape[:-1]) > _PATCH_BYTES:
        return dx, _kernel_grad(spec, x, g).astype(kernel.dtype)
    patches = conv_patches(spec, x[:, None])
    per_position = g.reshape(g.shape[0], -1, g.shape[-1])
    dk = jnp.einsum("bsk,bsf->kf", patches, per_position).reshape(kernel.shape)
    return dx, dk.astype(kernel.dtype)


_canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)
