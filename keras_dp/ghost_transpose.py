"""Transposed convolutions for ghost clipping (pure JAX): the layer as an einsum and a fold.

A transposed convolution is the adjoint of a strided convolution: input position i
adds its features times the kernel, x_i·K ([window, F] numbers), into the output
positions of its window. keras_dp computes it so, as the einsum u = x·K
(:func:`transpose_equation`), which :class:`keras_dp.ghost.Tape` taps as a Dense over
the input positions with the layer's own undilated input as its x, and the fold of u
into the output (:func:`fold`). The gradient at u is each window's slice of the
output's gradient, so a kernel's per-example norm, its clipped sum and the outer
form's per-example gradients are a dense layer's (:mod:`keras_dp.ghost_norms`), and
nothing made of the zeros of a dilated input is kept.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp

from keras_dp import ghost_conv as gc
from keras_dp import ghost_norms as gn


def transpose_equation(rank: int) -> str:
    """A transposed convolution's einsum before :func:`fold`: each input position's
    features times the kernel [*window, F, C] gives that position's window of outputs,
    u [B, *spatial, *window, F] (2-D: ``"zpqc,ijfc->zpqijf"``)."""
    spatial, window = "pqr"[:rank], "ijk"[:rank]
    return f"z{spatial}c,{window}fc->z{spatial}{window}f"


def is_transposed(spec) -> bool:
    """Whether an einsum tap's ``spec`` is :func:`transpose_equation`'s: the transposed
    convolution rule's tap."""
    rank = 0 if spec is None else len(spec.x) - 2
    return 1 <= rank <= 3 and spec == gn.parse(transpose_equation(rank), rank + 2)


def fold(u, strides, dilation, pads) -> jnp.ndarray:
    """A transposed convolution's output [B, *out, F] from its windows u [B, *spatial,
    *window, F] (:func:`transpose_equation`): window offset w of input position i adds
    into output position s·i + d·w − (d·(k − 1) − low), as ``jax.lax.conv_transpose``
    with ``transpose_kernel=True`` and the (low, high) ``pads`` computes it (the input
    dilated by the strides, padded, convolved with the flipped kernel). One padded
    copy of each offset's plane, summed in float32 at least (as a convolution
    accumulates). Its gradient is each window's strided slice of the output's
    gradient (:func:`_windows`), so a tap at u sees each example's patches of g and
    its norm is a dense layer's over the input positions, no zeros unfolded."""
    pads = tuple(map(tuple, pads))
    return _fold(u, tuple(strides), tuple(dilation), pads, tuple(u.shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _fold(u, strides, dilation, pads, u_shape):
    rank = len(strides)
    spatial, window = u.shape[1 : 1 + rank], u.shape[1 + rank : 1 + 2 * rank]
    dtype = u.dtype
    u = u.astype(jnp.promote_types(dtype, jnp.float32))
    total = None
    for w in itertools.product(*map(range, window)):
        config = [(0, 0, 0)]
        for n, s, d, k, (low, high), wi in zip(spatial, strides, dilation, window, pads, w):
            size = (n - 1) * s + 1 + low + high - d * (k - 1)  # the output's length
            start = d * wi - (d * (k - 1) - low)
            config.append((start, size - (n - 1) * s - 1 - start, s - 1))
        part = u[(slice(None),) * (1 + rank) + w]  # [B, *spatial, F]
        placed = jax.lax.pad(part, jnp.zeros((), u.dtype), config + [(0, 0, 0)])
        total = placed if total is None else total + placed
    return total.astype(dtype)


def _fold_fwd(u, strides, dilation, pads, u_shape):
    return _fold(u, strides, dilation, pads, u_shape), None


def _fold_bwd(strides, dilation, pads, u_shape, _, g):
    return (_windows(g, u_shape, strides, dilation, pads),)


def _windows(g, u_shape, strides, dilation, pads) -> jnp.ndarray:
    """:func:`fold`'s transpose: u's shape [B, *spatial, *window, F] filled with g at
    each window's output positions (zero beyond the output): the patches of g under
    the strided convolution whose adjoint the transposed one is, padded (d·(k − 1) −
    low, d·(k − 1) − high) (:func:`keras_dp.ghost_conv.conv_patches`). Autodiff of
    the padded copies would scatter each offset into a zeroed u of its own (one 3×3
    stride-2 layer's gradients at 1,170 rows: 474 MB of temporaries, against 67 for
    Keras' own transposed convolution)."""
    rank = len(strides)
    window = u_shape[1 + rank : 1 + 2 * rank]
    padding = tuple(
        (d * (k - 1) - low, d * (k - 1) - high) for d, k, (low, high) in zip(dilation, window, pads)
    )
    spec = gc.Conv(tuple(window), tuple(strides), padding, tuple(dilation))
    return gc.conv_patches(spec, g[:, None]).reshape(u_shape)


_fold.defvjp(_fold_fwd, _fold_bwd)
