"""What ghost clipping costs, and so how a step runs it: one pass or chunks, and
whether ``clipping="auto"`` uses ghost norms for a model at all.

Decided from a trace of one example (:class:`keras_dp.ghost.Plan`): the FLOPs of its
forward pass and each tap's costs. Nothing here changes what a step computes (the
clipped sum, C, the noise and ε are the same whichever way it runs), only how fast.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import jax
from jax.extend.core import Literal

from keras_dp import _backend, _keras
from keras_dp import ghost_transpose as gt
from keras_dp.ghost_tap import norm_costs

if TYPE_CHECKING:
    from keras_dp.ghost import Plan

logger = logging.getLogger(__name__)

# On a CPU, the whole shard in one pass when one example's forward pass is at most
# this many FLOPs and the shard's per-example gradients (fallback variables, float32)
# fit in _ONE_PASS_FALLBACK_BYTES; otherwise the chunks of
# :func:`keras_dp.step.chunk_size`. Measured through fit on 2 CPU cores (batch 64, 88
# rows; an MLP 64-w-w-10 whose middle layer has no ghost rule, w×w per-example; one
# pass against chunks of 16, ms a step; benchmarks/fallback_pass.py): w = 64 (1.5 MB)
# 0.68 / 0.60, w = 96 (3.3 MB) 0.96 / 1.00, w = 128 (5.8 MB) 1.42 / 1.14 and
# 1.52 / 1.30, w = 256 (23 MB) 4.15 / 3.25, w = 512 (92 MB) 41.7 / 16.8.
_ONE_PASS_FLOPS = 10**6
_ONE_PASS_FALLBACK_BYTES = 2**22
# clipping="auto" keeps ghost norms where all per-example gradients of a whole expected
# batch would exceed this (memory, not speed).
_PER_EXAMPLE_BYTES = 2**28
# clipping="auto" on a CPU: a model with a ghost convolution takes per-example
# gradients when its ghost norms cost this many times its kernels' sizes (ghost_pays).
_CONV_RATIO = 80


def forward_flops(model, row) -> int:
    """FLOPs of the built model's forward pass on ``row`` (one example with a batch
    axis of 1), counted on a trace as :class:`keras_dp.ghost.Plan` counts them.
    Stateless: nothing is compiled and no variable changes (a layer may assign state
    in ``call``)."""
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    kwargs = {"training": False} if _keras.call_has_training_arg(model) else {}

    def forward(r):
        return model.stateless_call(trainable, non_trainable, r, **kwargs)[0]

    return flops(jax.make_jaxpr(forward)(row).jaxpr)


def one_pass(plan_: Plan | None, config, rows: int) -> bool:
    """Whether a CPU step computes its ``rows`` (one shard, padding included) in one
    pass rather than in chunks (``microbatch_size`` unset, ghost norms).

    Each chunk costs the loop's bookkeeping, whose work grows with the parameters
    (the clipped sum accumulated, embedding tables scattered into): with ghost norms a
    small model's rows cost less than that. Measured on 2 CPU cores, batch 64 (117
    rows; chunks of 16 against one pass): an embedding text classifier (8 kFLOP an
    example) 4.1 → 2.9 ms a step, an MLP (0.2 MFLOP) 1.9 ms both, a small CNN (0.2
    MFLOP) 1.9 ms both (4.6 → 3.7 before its convolutions' canonical layouts,
    :mod:`keras_dp.ghost_conv`); a 2-layer BERT (~10 MFLOP), a CNN on 32×32×3 images
    (~12 MFLOP: 68–80 ms in chunks, 219 ms in one pass) or Gemma3 keeps its chunks,
    where the padding rows would cost more than the loop. So does a step whose
    per-example gradients (variables without a ghost rule) would exceed 4 MiB in one
    pass: out of the caches, they cost more than the loop (``_ONE_PASS_FALLBACK_BYTES``),
    and one whose fallback variables include a convolution's kernel (a regularised
    one, or one in channels-first layout): autodiff forms their per-example gradients
    as one grouped convolution over the rows, slow over many (a convolutional
    autoencoder before its ``Conv2DTranspose`` layers had a rule,
    ``benchmarks/clipping.py --models autoencoder``: 11.4–11.9 ms a step in one pass,
    4.8–4.9 in chunks of 16, 4.8–4.9 per-example).
    """
    if plan_ is None or not _may_pass_once(config) or plan_.fallback_convolved:
        return False
    fallback_bytes = 4 * rows * plan_.fallback_size
    return plan_.flops <= _ONE_PASS_FLOPS and fallback_bytes <= _ONE_PASS_FALLBACK_BYTES


def likely_one_pass(model, config, row) -> bool:
    """:func:`one_pass` as far as it can be told before any step is traced: ghost
    norms, a built model, and the forward FLOPs of ``row`` (one example, batch axis 1)
    within the bound. A model whose forward pass does not trace here is not."""
    if not config.ghost_clipping or not _may_pass_once(config) or not model.built:
        return False
    try:
        count = forward_flops(model, row)
    except Exception as err:  # a guess for sizing batches only: never fail fit over it
        logger.debug("Forward FLOPs unknown (the forward pass did not trace: %s).", err)
        return False
    return count <= _ONE_PASS_FLOPS


def _may_pass_once(config) -> bool:
    return config.microbatch_size is None and _backend.on_cpu()


def ghost_pays(plan_: Plan | None, config) -> bool:
    """``clipping="auto"``: whether a step computes ghost norms at all (True), or
    every per-example gradient as ``clipping="per_example"`` does (False).

    Only a model with a ghost convolution on a CPU runs per-example gradients: when its
    norms (Σ of :func:`keras_dp.ghost_tap.norm_costs`' norm, multiply-adds an example,
    plus a convolution's sum where its norm leaves its per-example gradient unformed,
    :func:`_ghost_cost`) cost at least ``_CONV_RATIO`` (80) times its kernels' sizes
    (the numbers their per-example gradients hold), one pass or chunked. Measured
    through fit on 2 CPU cores (AMD EPYC), batch 64, ms a step, per-example / ghost, in
    two or three runs of ``benchmarks/clipping.py --repeats 3`` (2026-12-07): the
    temporal convolutions (ratio 63) 1.66–2.64 / 1.57–2.41; the MobileNet-like CNN (72)
    4.65–6.67 / 3.87–4.77; the CNN on 32×32×3 (99) 24.5–27.0 / 19.2–25.9 (tied within
    this machine's spread); the ResNeXt-like one (89) 10.1–17.4 / 10.3–12.6 (tied); the
    Siamese CNN (134: both its convolutions read twice, so unformed) 2.63–4.06 /
    4.11–5.53; on 16×16×3 (14) 7.7 / 6.9; the small CNN on 8×8 digits (12) 1.38 / 1.05.
    The bar was 32, without the sums, until the depthwise rule stopped unfolding
    patches (the MobileNet-like CNN: per-example 4.91 / ghost 6.89 before).

    Dense and EinsumDense layers keep ghost norms, also where a norm costs more than
    the kernel holds numbers (LoRA adapters and dense layers over sequences): such a
    norm takes the outer form, whose per-example gradients are kept for the sum
    (:meth:`keras_dp.ghost_tap.Tap.grads`), so ghost does the per-example work there
    and less elsewhere. Until it kept them, the sum contracted x and g again, and a
    chunked step with such layers ran per-example gradients. With them kept
    (``benchmarks/clipping.py``, two runs of 4 and 6 paired repeats, ms a step, ghost
    against the per-example program): a tiny BERT with LoRA 24.8 / 27.7 and 24.0 /
    26.7–27.2, faster in 16 of 20 paired fits; Gemma3 (4 layers, 128 tokens) with LoRA
    269 / 279–307 and 246 / 252–257, faster in 15 of 20.

    A model with a transposed convolution (its rule's einsum,
    :mod:`keras_dp.ghost_transpose`) runs per-example gradients on a CPU, in the same
    einsum-and-fold form: its ghost step's passes over the large gradients at each
    window (zeroed rows, formed gradients' squares) cost more than they save. Measured
    through fit on 2 CPU cores, batch 64, ms a step (per-example / ghost, two
    repeats, ``benchmarks/clipping.py --models autoencoder decoder vae-decoder unet``):
    a convolutional autoencoder 1.57 / 2.38, a DCGAN-like decoder 5.40 / 7.98, the
    decoder of Keras' VAE example 15.9 / 22.8, a small U-Net 24.7 / 30.3 (plain Keras:
    1.88, 12.5, 112 and 90 ms; its transposed convolution is an input-dilated one).

    Ghost norms are kept on an accelerator (not measured there), and where the new
    per-example gradients (float32, for a whole expected batch) would exceed 256 MiB:
    memory follows the activations with ghost norms, the parameters without.
    """
    if not _backend.on_cpu() or plan_ is None:
        return True
    kernels = [t for t in plan_.active if t.use_kernel]
    transposed = any(t.kind == "einsum" and gt.is_transposed(t.spec) for t in kernels)
    if not transposed and not any(t.kind == "conv" for t in kernels):
        return True
    reads = {}  # a kernel read by several taps: one size, one norm over them all
    for t in kernels:
        reads.setdefault(t.kernel, []).append(t)
    norms = sum(_ghost_cost(ts) for ts in reads.values())
    sizes = sum(math.prod(ts[0].kernel_shape) for ts in reads.values())
    if 4 * sizes * config.batch_size > _PER_EXAMPLE_BYTES:  # their gradients would be large
        return True
    return not transposed and norms < _CONV_RATIO * sizes


def _ghost_cost(reads) -> int:
    """Multiply-adds an example of a kernel's ghost norm (its ``reads``' taps,
    :func:`keras_dp.ghost_tap.norm_costs`) and, for a convolution whose norm leaves each
    example's gradient unformed, its sum's second contraction over the positions
    (:func:`keras_dp.ghost_conv.conv_sum`), the outer form's count. Unformed: read
    more than once, or one read whose cheapest form by multiply-adds is the Gram or
    the shifted form (:func:`keras_dp.ghost_conv_norms.form_costs`). That is the count
    ``_CONV_RATIO`` was set with; the step itself forms a gradient only where the outer
    form is fastest by :func:`keras_dp.ghost_conv_norms.norm_form` (measured times,
    writes included). Charged by the dense layers' rule the step used until session 60
    (``ghost_norms.outer_is_faster``), the MobileNet-like CNN's 1×1 convolutions would
    have counted as unformed and sent it to per-example gradients, where ghost measured
    faster; ``norm_form`` forms them."""
    norm, outer = norm_costs(reads)
    unformed = reads[0].kind == "conv" and (len(reads) > 1 or norm != outer)
    return norm + outer if unformed else norm


def reaches_convolution(jaxpr, inputs) -> bool:
    """Whether any of ``jaxpr``'s inputs at positions ``inputs`` reaches the kernel
    operand of a convolution (through any operations; inner jaxprs included, an inner
    jaxpr whose inputs are not its equation's taken as reading them all).

    A variable read so without a ghost rule (a regularised convolution's kernel, one
    in channels-first layout) gets its per-example gradient from autodiff over the
    rows: one grouped convolution, which XLA's CPU compiler runs slowly over many rows
    at once (:func:`one_pass`)."""
    return _reaches(jaxpr, {jaxpr.invars[i] for i in inputs})


def _reaches(jaxpr, reached: set) -> bool:
    for eqn in jaxpr.eqns:
        read = [not isinstance(v, Literal) and v in reached for v in eqn.invars]
        if not any(read):
            continue
        if eqn.primitive.name == "conv_general_dilated" and read[1]:
            return True
        for inner in _inner_jaxprs(eqn):
            mine = len(inner.invars) == len(read)
            inside = {v for v, r in zip(inner.invars, read) if r or not mine}
            if _reaches(inner, inside):
                return True
        reached.update(eqn.outvars)
    return False


def _inner_jaxprs(eqn) -> list:
    found = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            item = getattr(item, "jaxpr", item)  # a ClosedJaxpr's
            if hasattr(item, "eqns"):
                found.append(item)
    return found


def flops(jaxpr) -> int:
    """Floating-point operations of ``jaxpr``'s matrix products and convolutions
    (inner jaxprs included; a loop's body counted once per known trip)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // out_features
        inner = sum(flops(item) for item in _inner_jaxprs(eqn))
        total += inner * eqn.params.get("length", 1)  # scan
    return total
