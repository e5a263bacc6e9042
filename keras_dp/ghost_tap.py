"""What one tap of ghost clipping computes: a linear map seen in the trace, its
variables' per-example squared norms and their clipped sum from the map's input x and
the gradient g at its output (:mod:`keras_dp.ghost_norms`,
:mod:`keras_dp.ghost_conv`), and what each form costs.

A kernel's norm takes the cheaper exact form. When that is the outer form, each
example's gradient G_b is formed on the way: it is kept (:meth:`Tap.grads`) and
joins the per-example gradients of the step, and the clipped sum is Σ_b f_b·G_b
(Kx·Ko multiply-adds an example) rather than the contraction of x and g again
(S·Kx·Ko), which also frees x and g once the norms are known.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from keras_dp import ghost_conv as gc
from keras_dp import ghost_conv_norms as gcn
from keras_dp import ghost_embedding as ge
from keras_dp import ghost_norms as gn


@dataclasses.dataclass(frozen=True)
class Tap:
    """One linear map seen in the trace.

    Attributes:
      kind: "einsum" (x → einsum(spec, x, kernel)), "conv" (x → conv(x, kernel)),
        "depthwise" (x → each channel of x convolved with its own filters, the output
        [S, C, M]), "embedding" (ids → table[ids]) or "bias" (a bias alone).
      spec: The einsum's index structure (kind "einsum"), or the convolution's
        (:class:`keras_dp.ghost_conv.Conv`, kinds "conv" and "depthwise").
      kernel: The kernel's (or table's) index among the trainable variables, or None.
      bias: The bias' index, or None.
      kernel_shape, bias_shape: Their shapes.
      out: The tapped output of one example (shape and dtype).
      layer: The layer's path, for messages.
      use_kernel, use_bias: Whether the kernel's / bias' norm and sum come from this tap.
      nested: Whether the tap was traced inside a loop, map or branch of the call
        (never ghost).
      tied: Whether the kernel is a table that a second tap reads too (its lookup, and
        its reversed read as logits: a tied embedding); the norm then adds the cross
        term of the two reads (:func:`cross_terms`), and each tap adds its own sum.
      pooled: Whether an embedding's output reaches the loss only through one sum over
        its positions (:mod:`keras_dp.ghost_pooling`): its norm then takes each
        position's gradient norm in place of the gradient
        (:func:`keras_dp.ghost_embedding.pooled_sq_norms`), an upper bound that is
        exact there.
      shared: Whether the tap's variables are read by other taps too, all einsums of
        one structure, all convolutions or all lookups (a layer called more than once):
        their norms come from every read together (:func:`cross_terms`: the reads'
        positions concatenated, as one einsum or lookup over them), and each tap adds
        its own sum.
    """

    kind: str
    spec: gn.Einsum | None
    kernel: int | None
    bias: int | None
    kernel_shape: tuple
    bias_shape: tuple
    out: jax.ShapeDtypeStruct
    layer: str
    use_kernel: bool = False
    use_bias: bool = False
    nested: bool = False
    tied: bool = False
    pooled: bool = False
    shared: bool = False

    @property
    def active(self) -> bool:
        return self.use_kernel or self.use_bias

    def formed(self, x, g) -> bool:
        """Whether the kernel's norm takes the outer form, which forms each example's
        gradient G_b: it is then kept (:meth:`grads`) and the clipped sum is Σ f_b·G_b,
        Kx·Ko multiply-adds an example instead of the contraction (S·Kx·Ko) again."""
        if not self.use_kernel or self.kind == "embedding" or self.tied or self.shared:
            return False
        if self.kind == "depthwise":  # window·C·M numbers an example: always formed
            return True
        if self.kind == "conv":
            return gcn.formed(self.spec, x.shape, g.shape)
        return gn.outer_form(self.spec, x.shape[1:], g.shape[1:], rows=x.shape[0])

    def grads(self, x, g) -> dict:
        """``{variable index: each example's gradient}`` (float32 [B, *shape]) when the
        kernel is :meth:`formed`: the kernel's and the bias' (g summed to its shape),
        so that x and g need not be kept for the sum."""
        if not self.formed(x, g):
            return {}
        if self.kind == "conv":
            out = {self.kernel: gcn.input_grads(self.spec, x, g, self.kernel_shape)}
        elif self.kind == "depthwise":
            out = {self.kernel: gc.depthwise_grads(self.spec, x, g, self.kernel_shape)}
        else:
            out = {self.kernel: gn.kernel_grads(self.spec, x, g, self.kernel_shape)}
        if self.use_bias:
            out[self.bias] = gn.bias_grads(g, self.bias_shape)
        return out

    def sq_norms(self, x, g) -> jax.Array | None:
        """Squared norms of example b's gradients of this tap's variables (float32 [B])
        from the input x and the gradient g at the tap, unless :meth:`formed` or
        :attr:`shared` (:func:`cross_terms` takes those)."""
        if self.shared or self.formed(x, g):
            return None
        total = jnp.zeros(g.shape[0], jnp.float32)
        if self.use_kernel:
            if self.kind == "embedding":
                if self.pooled:
                    total = total + ge.pooled_sq_norms(x, g, self.kernel_shape[0])
                else:
                    total = total + ge.embedding_sq_norms(x, g)
            elif self.kind == "conv":
                total = total + gcn.sq_norms(((self.spec, x, g),))
            else:
                total = total + gn.kernel_sq_norms(self.spec, x, g)
        if self.use_bias:
            per = gn.bias_grads(g, self.bias_shape)
            total = total + jnp.sum(jnp.square(per).reshape(per.shape[0], -1), axis=1)
        return total

    def sums(self, x, g, factor) -> dict:
        """``{variable index: Σ_b factor_b · gradient_b}`` in float32, unless :meth:`formed`."""
        out = {}
        if self.formed(x, g):
            return out
        both = self.use_kernel and self.use_bias and self.kind == "einsum" and not self.tied
        if both and folds_bias(self.spec, self.kernel_shape, self.bias_shape, x):
            out[self.kernel], out[self.bias] = kernel_and_bias_sum(
                self.spec, x, g, factor, self.kernel_shape
            )
            return out
        if self.use_kernel:
            if self.kind == "embedding":
                out[self.kernel] = ge.embedding_sum(x, g, factor, self.kernel_shape)
            elif self.kind == "conv":
                out[self.kernel] = gc.conv_sum(self.spec, x, g, factor, self.kernel_shape)
            elif self.kind == "depthwise":  # shared: this read's share
                per = gc.depthwise_grads(self.spec, x, g, self.kernel_shape)
                out[self.kernel] = jnp.tensordot(factor, per, 1)
            else:
                out[self.kernel] = gn.kernel_sum(self.spec, x, g, factor, self.kernel_shape)
        if self.use_bias:
            out[self.bias] = jnp.tensordot(factor, gn.bias_grads(g, self.bias_shape), 1)
        return out

    def costs(self) -> tuple[int, int]:
        """(ghost norm, forming the per-example gradient), multiply-adds per example.

        The einsum's per-example gradient is its outer form, so the cheaper exact form
        never costs more; an embedding's gradient is a scatter of its T rows into a
        table of V rows, against the cheapest of the T² products of the Gram form, the
        T² comparisons of the first-position form and sorting the T ids
        (:func:`keras_dp.ghost_embedding.embedding_costs`); each number of that table
        costs :data:`keras_dp.ghost_embedding.TABLE_COST` multiply-adds.
        """
        if self.kind == "depthwise":  # formed, the norm its square
            outer, _ = gn.form_costs(*self.form_sizes())
            return outer, outer
        if self.kind == "conv":  # read once, the shifted form too (ghost_conv_norms)
            out = self.out.shape[1:-1]  # [1, *out, filters]
            n = None if self.shared else math.prod(gcn.reach(self.spec, out))
            *_, channels, filters = self.kernel_shape
            s = math.prod(self.out.shape[:-1])
            costs = gcn.form_costs(s, math.prod(self.spec.window), channels, filters, n)
            return min(costs.values()), costs["outer"]
        if self.kind == "einsum" and self.spec is not None:
            outer, gram = gn.form_costs(*self.form_sizes())
            return min(outer, gram), outer
        if self.kind == "embedding":
            t, d = math.prod(self.out.shape[:-1]), self.out.shape[-1]
            table = ge.TABLE_COST * math.prod(self.kernel_shape)
            if self.pooled:
                norm = min(ge.pooled_costs(t, self.kernel_shape[0])) + t * d
            else:
                norm = min(ge.embedding_costs(t, d))
            return norm, t * d + table
        return 0, 0

    def form_sizes(self) -> tuple[int, int, int, int]:
        """(S, P, Kx, Ko) of one example's einsum, or of a convolution's as one einsum
        over its patches (:func:`keras_dp.ghost_norms.sizes`; a depthwise one's channels
        are P)."""
        if self.kind == "depthwise":
            *positions, channels, filters = self.out.shape
            return math.prod(positions), channels, math.prod(self.spec.window), filters
        if self.kind == "conv":
            positions = math.prod(self.out.shape[:-1])
            window = self.kernel_shape[-2] * math.prod(self.spec.window)
            return positions, 1, window, self.out.shape[-1]
        x_shape = _x_shape(self.spec, self.out.shape, self.kernel_shape)
        return gn.sizes(self.spec, x_shape, self.out.shape)


# The most numbers a folded bias may copy x into (float32: 256 KiB). The copy, x with
# a feature of ones, grows with the batch, while the loop the fold saves is compiled
# once: the MLP's step at logical batch 1,024 (1,170 rows) needed 7.2 MiB of
# temporary memory with its first layer (64 → 256) folded, 6.3 MiB without; a step
# took 5.85 ms folded, 5.88 without.
FOLD_COPY_LIMIT = 1 << 16


def folds_bias(spec: gn.Einsum, kernel_shape, bias_shape, x=None) -> bool:
    """Whether a bias' clipped sum rides in its kernel's contraction
    (:func:`kernel_and_bias_sum`): one kernel letter from x, first in the kernel, and a
    bias over exactly the kernel's other letters, the last of out in their order; and,
    given x, its copy with a feature of ones at most :data:`FOLD_COPY_LIMIT` numbers."""
    ko = spec.k[1:]
    fits = (
        not spec.shared
        and len(spec.kx) == 1
        and spec.k[0] == spec.kx
        and spec.out.endswith(ko)
        and tuple(bias_shape) == tuple(kernel_shape[1:])
    )
    if not fits or x is None:
        return fits
    return x.size // kernel_shape[0] * (kernel_shape[0] + 1) <= FOLD_COPY_LIMIT


def kernel_and_bias_sum(spec: gn.Einsum, x, g, factor, kernel_shape):
    """(Σ_b f_b·G_b, Σ_b f_b·(g_b summed to the bias)) in float32, one contraction: x
    gains a feature of ones, whose row of the result is the bias' sum; only where
    :func:`folds_bias` holds. On a CPU the bias' own contraction over the examples (a
    vector times a matrix) was a loop that XLA generated and compiled on its own."""
    axis = 1 + spec.x.index(spec.kx)
    ones = jnp.ones((*x.shape[:axis], 1, *x.shape[axis + 1 :]), jnp.float32)
    x1 = jnp.concatenate([x.astype(jnp.float32), ones], axis=axis)
    both = gn.kernel_sum(spec, x1, g, factor, (kernel_shape[0] + 1, *kernel_shape[1:]))
    return both[:-1], both[-1]


def cross_terms(taps, xs, gs) -> jax.Array | None:
    """The squared norms that span taps, per example (float32 [B]); None when no
    variable is read by two taps.

    - A tied table: 2·⟨A_b, R_b⟩, A_b its gradient through its lookups (the "embedding"
      taps), R_b through its reversed reads (the "einsum" taps,
      :func:`keras_dp.ghost_embedding.ties`), each side's positions laid end to end.
      Added to the norms of A_b and R_b (the two taps' own; with more than two reads,
      :attr:`Tap.shared`, each side's whole norm, below) it makes ‖A_b + R_b‖², the
      table's per-example norm, from above (with a rounding margin,
      :func:`keras_dp.ghost_embedding.tied_term`): a BART or T5 table looked up for the
      encoder and the decoder and read as the logits.
    - A :attr:`Tap.shared` kernel, the whole norm: its gradient is Σ over its reads of
      each read's Σ_s x_s ⊗ g_s, one einsum's over the reads' positions concatenated,
      so the norm is that einsum's (the cheaper exact form for all the positions,
      :func:`keras_dp.ghost_norms.chunked_sq_norms`; a convolution's over its
      patches, :func:`keras_dp.ghost_conv_norms.sq_norms`; a table's lookups' over all
      their tokens, :func:`keras_dp.ghost_embedding.embedding_sq_norms`, exact even
      where each lookup alone is pooled). A shared bias' or depthwise kernel's: its
      reads' gradients formed, summed, then squared.
    """
    total = None

    def add(term):
        nonlocal total
        total = term if total is None else total + term

    tied, kernels, convs, lookups, formed = {}, {}, {}, {}, {}
    for t, x, g in zip(taps, xs, gs):
        if t.shared and t.use_bias:
            formed.setdefault(t.bias, []).append(gn.bias_grads(g, t.bias_shape))
        if not t.use_kernel or not (t.tied or t.shared):
            continue
        if t.kind == "depthwise":
            per = gc.depthwise_grads(t.spec, x, g, t.kernel_shape)
            formed.setdefault(t.kernel, []).append(per)
            continue
        if t.kind == "conv":
            convs.setdefault(t.kernel, []).append((t.spec, x, g))
            continue
        if t.kind == "embedding":  # ids [B, T], g [B, T, d]
            read = (x.reshape(x.shape[0], -1), g.reshape(x.shape[0], -1, g.shape[-1]))
        else:
            read = gn.grouped(t.spec, x, g)  # [B, S, P, Kx], [B, S, P, Ko]
        if t.tied:  # its lookups, then its reversed reads
            tied.setdefault(t.kernel, ([], []))[t.kind == "einsum"].append(read)
        if t.shared:
            (lookups if t.kind == "embedding" else kernels).setdefault(t.kernel, []).append(read)
    for found, logits in tied.values():
        add(ge.tied_term(*_end_to_end(found), *_end_to_end(logits)))
    for grouped in kernels.values():
        xr, gr = _end_to_end(grouped)  # [B, ΣS, P, Kx], [B, ΣS, P, Ko]
        outer = gn.outer_is_faster(*xr.shape[1:], gr.shape[-1], summed=False)
        add(gn.chunked_sq_norms(xr, gr, outer))
    for conv_reads in convs.values():  # the same, over their patches
        add(gcn.sq_norms(conv_reads))
    for found in lookups.values():  # a table's lookups: all their tokens at once
        add(ge.embedding_sq_norms(*_end_to_end(found)))
    for per in formed.values():
        summed = sum(per[1:], per[0])
        add(jnp.sum(jnp.square(summed).reshape(summed.shape[0], -1), axis=1))
    return total


def _end_to_end(reads) -> tuple:
    """Reads' arrays (tuples of [B, S_i, ...]) concatenated along their positions."""
    return tuple(jnp.concatenate(parts, axis=1) for parts in zip(*reads))


def norm_costs(reads) -> tuple[int, int]:
    """(ghost norm, forming the per-example gradient) of one kernel read by ``reads``
    (its taps), multiply-adds per example as :meth:`Tap.costs` counts them, for the
    norm as :func:`cross_terms` takes it: a side of several reads over all their
    positions at once (the Gram form grows with their square), and a tied table's
    cross term between its lookups and its reversed reads (T·S·d for T tokens and S
    positions of logits). The per-example gradient is one table for all the lookups.
    """
    if len(reads) == 1:
        return reads[0].costs()
    if all(t.kind == "depthwise" for t in reads):  # each read's formed, then summed
        formed = sum(t.costs()[1] for t in reads)
        return formed, formed
    found = [t for t in reads if t.kind == "embedding"]
    maps = [t for t in reads if t.kind != "embedding"]
    norm = formed = 0
    if len(found) == 1:
        norm, formed = found[0].costs()
    elif found:
        tokens, dim = sum(math.prod(t.out.shape[:-1]) for t in found), found[0].out.shape[-1]
        norm = min(ge.embedding_costs(tokens, dim))
        formed = tokens * dim + ge.TABLE_COST * math.prod(found[0].kernel_shape)
    if maps:
        sizes = [t.form_sizes() for t in maps]
        outer, gram = gn.form_costs(sum(s[0] for s in sizes), *sizes[0][1:])
        norm, formed = norm + min(outer, gram), formed + outer
    if found and maps:
        tokens = sum(math.prod(t.out.shape[:-1]) for t in found)
        positions = sum(s[0] * s[1] for s in sizes)
        norm += tokens * positions * found[0].out.shape[-1]
    return norm, formed


def _x_shape(spec: gn.Einsum, out_shape, kernel_shape) -> tuple:
    """One example's x shape as far as the output and the kernel tell (the kernel's
    letters from x, Kx, sized by the kernel; a letter only x has counted as 1)."""
    sizes = dict(zip(spec.k, kernel_shape)) | dict(zip(spec.out, out_shape))
    return tuple(sizes.get(c, 1) for c in spec.x)
