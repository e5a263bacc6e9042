"""Ghost rules of Keras layers: each does what its class's ``call`` does, with taps.

A rule returns the ``call`` that :class:`keras_dp.ghost.Tape` installs on a layer
instance while a DP step is traced: the class's computation, written out, with the
kernel and bias read through ``tape.read`` and each linear map's output passed
through ``tape.tap`` (which keeps the map's input). Anything a rule does not cover
(a LoRA layout it cannot split, a convolution with LoRA, an embedding with LoRA)
calls the class's own ``call``, whose variables then get per-example gradients.
``LSTM``, ``GRU`` and ``SimpleRNN`` take their rules from :mod:`keras_dp.ghost_rnn`.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_dp import _keras, ghost_rnn
from keras_dp import ghost_conv as gc
from keras_dp import ghost_norms as gn
from keras_dp import ghost_transpose as gt


def rule(layer):
    """The ghost rule of ``layer``'s class (None when it has none, or is quantized):
    ``rule(layer, tape, original_call) -> call``."""
    if getattr(layer, "quantization_mode", None) is not None:
        return None
    for cls, rule in _RULES:
        if type(layer).call is cls.call:
            return rule
    return None


def _activate(layer, x):
    return layer.activation(x) if layer.activation is not None else x


def einsum_tapped(layer, tape, equation, inputs, kernel, bias):
    """einsum(equation, inputs, kernel) (+ bias), tapped with ``inputs`` as its x (the
    bias alone where the equation has no ghost form)."""
    spec = gn.parse(equation, len(inputs.shape))
    y = ops.einsum(equation, inputs, tape.read(kernel))
    if bias is not None:
        y = ops.add(y, tape.read(bias))
    kind = "einsum" if spec is not None else "bias"
    return tape.tap(layer, y, inputs, kind, spec, kernel if spec else None, bias)


def _linear(layer, tape, equation, inputs):
    """einsum(equation, inputs, kernel) + bias, tapped; LoRA as x·W₀ + s·(x·A)·B."""
    bias = layer.bias
    if not layer.lora_enabled:
        return einsum_tapped(layer, tape, equation, inputs, layer.kernel, bias)
    a, b = layer.lora_kernel_a, layer.lora_kernel_b
    lhs, out = equation.split("->")
    xs, ks = lhs.split(",")
    last = ks[-1]
    y = ops.einsum(equation, inputs, _keras.stored_kernel(layer))
    u_out = out.replace(last, "0")
    u_eq, v_eq = f"{xs},{ks[:-1]}0->{u_out}", f"{u_out},0{last}->{out}"
    u = ops.einsum(u_eq, inputs, tape.read(a))
    u = tape.tap(layer, u, inputs, "einsum", gn.parse(u_eq, len(inputs.shape)), a)
    su = ops.multiply(u, layer.lora_alpha / layer.lora_rank)
    v = ops.einsum(v_eq, su, tape.read(b))
    y = ops.add(y, tape.tap(layer, v, su, "einsum", gn.parse(v_eq, len(su.shape)), b))
    if bias is not None:
        y = ops.add(y, tape.read(bias))
        y = tape.tap(layer, y, None, "bias", None, None, bias)
    return y


def _lora_ok(layer, equation) -> bool:
    """LoRA as two einsums needs the kernel's last axis on the output only."""
    if not layer.lora_enabled:
        return True
    lhs, out = equation.split("->")
    xs, ks = lhs.split(",")
    kernel = _keras.stored_kernel(layer)
    return (
        "..." not in ks
        and "0" not in equation
        and ks[-1] in out
        and ks[-1] not in xs
        and not kernel.trainable
        and tuple(layer.lora_kernel_a.shape) == tuple(kernel.shape[:-1]) + (layer.lora_rank,)
    )


def _dense(layer, tape, original):
    equation = "...a,ab->...b"

    def call(inputs, training=None):
        if not _lora_ok(layer, equation):
            return original(inputs, training=training)
        return _activate(layer, _linear(layer, tape, equation, inputs))

    return call


def _einsum_dense(layer, tape, original):
    def call(inputs, training=None):
        if not _lora_ok(layer, layer.equation):
            return original(inputs, training=training)
        return _activate(layer, _linear(layer, tape, layer.equation, inputs))

    return call


def _embedding_lookup(layer, tape, inputs):
    if inputs.dtype != "int32" and inputs.dtype != "int64":
        inputs = ops.cast(inputs, "int32")
    table = _keras.stored_embeddings(layer)
    out = ops.cast(ops.take(tape.read(table), inputs, axis=0), layer.compute_dtype)
    # The row each id reads: take wraps -V..-1 as NumPy does (-1 reads row V-1), so
    # the norm must count -1 and V-1 as one row (two ids would drop their cross term
    # and understate the norm) and the sum must add into that row.
    rows = ops.where(inputs < 0, inputs + table.shape[0], inputs)
    return tape.tap(layer, out, rows, "embedding", None, table)


def _embedding(layer, tape, original):
    def call(inputs):
        if layer.lora_enabled:
            return original(inputs)
        return _embedding_lookup(layer, tape, inputs)

    return call


def _reversible_embedding(layer, tape, original):
    """The lookup, and the reversed read (logits = x·tableᵀ, or x·reverse_embeddings
    when untied): with tied weights the table has two taps, whose norms
    :func:`keras_dp.ghost_tap.cross_terms` joins."""

    def call(inputs, reverse=False):
        if layer.lora_enabled or (layer.mask_zero and not reverse):
            return original(inputs, reverse=reverse)
        if not reverse:
            return _embedding_lookup(layer, tape, inputs)
        if layer.tie_weights:
            kernel, equation = _keras.stored_embeddings(layer), "...d,vd->...v"
        else:
            kernel, equation = layer.reverse_embeddings, "...d,dv->...v"
        table = tape.read(kernel)
        if layer.reverse_dtype is not None:
            dtype = layer.reverse_dtype
            inputs, table = ops.cast(inputs, dtype), ops.cast(table, dtype)
        spec = gn.parse(equation, len(inputs.shape))
        logits = ops.einsum(equation, inputs, table)
        logits = tape.tap(layer, logits, inputs, "einsum", spec, kernel)
        if layer.logit_soft_cap is not None:
            cap = layer.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits

    return call


def _conv(layer, tape, original):
    """Conv1D/2D/3D (channels last, "valid"/"same" padding or Conv1D's "causal", no
    LoRA); a convolution of more than one group is an einsum over the patches
    (:func:`_grouped_tapped`)."""

    def call(inputs):
        if (
            layer.data_format != "channels_last"
            or layer.padding not in ("valid", "same", "causal")
            or getattr(layer, "lora_enabled", False)
        ):
            return original(inputs)
        padding = layer.padding
        if padding == "causal":  # as Conv1D does: zeros before the first position
            left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
            inputs = ops.pad(inputs, [[0, 0], [left, 0], [0, 0]])
            padding = "valid"
        spec = _conv_spec(layer, padding)
        if layer.groups != 1:
            return _activate(layer, _grouped_tapped(layer, tape, spec, inputs))
        return _activate(layer, _conv_tapped(layer, tape, spec, inputs, layer.kernel))

    return call


def _conv_spec(layer, padding) -> gc.Conv:
    return gc.Conv(
        tuple(layer.kernel_size), tuple(layer.strides), padding.upper(), tuple(layer.dilation_rate)
    )


def _conv_tapped(layer, tape, spec, inputs, kernel):
    """conv(inputs, kernel) + the layer's bias (its ``filters``), tapped."""
    out = gc.conv(spec, inputs, ops.convert_to_tensor(tape.read(kernel)))
    bias = layer.bias if layer.use_bias else None
    if bias is not None:
        shape = (1,) * (layer.rank + 1) + (layer.filters,)
        out = ops.add(out, ops.reshape(tape.read(bias), shape))
    return tape.tap(layer, out, inputs, "conv", spec, kernel, bias)


def _bias_tapped(layer, tape, out):
    """out + the layer's bias, with a tap of its own (out unchanged without a bias)."""
    if not layer.use_bias:
        return out
    out = ops.add(out, tape.read(layer.bias))
    return tape.tap(layer, out, None, "bias", None, None, layer.bias)


def _depthwise_tapped(layer, tape, inputs, kernel):
    """Each channel convolved with its own filters (``ops.depthwise_conv``), one window
    offset at a time (:func:`keras_dp.ghost_conv.depthwise`), tapped at its output
    [N, S, C, M] with the input as its x: each example's kernel gradient is formed one
    offset at a time too (:func:`keras_dp.ghost_conv.depthwise_grads`). No patches are
    unfolded."""
    spec = _conv_spec(layer, layer.padding)
    out = gc.depthwise(spec, inputs, ops.convert_to_tensor(tape.read(kernel)))
    out = tape.tap(layer, out, inputs, "depthwise", spec, kernel)
    return gc.depthwise_layout(spec, inputs.shape, out)


def _grouped_tapped(layer, tape, spec, inputs):
    """A convolution of ``layer.groups`` groups (:func:`keras_dp.ghost_conv.grouped`):
    :func:`keras_dp.ghost_conv.grouped_equation`'s einsum over the unfolded patches,
    tapped with the patches as its x (the group axis shared by x, kernel and output, so
    the norm keeps each group's gradient apart), laid out as Keras does, then its bias."""
    kernel = ops.convert_to_tensor(tape.read(layer.kernel))
    patches, out = gc.grouped(spec, inputs, kernel, groups=layer.groups)
    equation = gn.parse(gc.grouped_equation(layer.rank), patches.ndim)
    out = tape.tap(layer, out, patches, "einsum", equation, layer.kernel)
    out = gc.depthwise_layout(spec, inputs.shape, out)
    return _bias_tapped(layer, tape, out)


def _covered(layer, *kernels) -> bool:
    """Channels last, "valid"/"same" padding, and the kernels where the rule reads them."""
    return (
        layer.data_format == "channels_last"
        and layer.padding in ("valid", "same")
        and all(getattr(layer, name, None) is not None for name in kernels)
    )


def _depthwise(layer, tape, original):
    """DepthwiseConv1D/2D (channels last, "valid"/"same" padding); its bias has a tap
    of its own (the einsum's output is [..., C, M], the bias C·M)."""

    def call(inputs):
        if not _covered(layer, "kernel"):
            return original(inputs)
        out = _depthwise_tapped(layer, tape, inputs, layer.kernel)
        return _activate(layer, _bias_tapped(layer, tape, out))

    return call


def _separable(layer, tape, original):
    """SeparableConv1D/2D (channels last, "valid"/"same" padding): the depthwise
    convolution (:func:`_depthwise_tapped`), then the pointwise one, a 1×1 convolution
    with the bias, as :func:`_conv` taps it."""

    def call(inputs):
        if not _covered(layer, "depthwise_kernel", "pointwise_kernel"):
            return original(inputs)
        h = _depthwise_tapped(layer, tape, inputs, layer.depthwise_kernel)
        spec = gc.Conv((1,) * layer.rank, (1,) * layer.rank, "VALID", (1,) * layer.rank)
        return _activate(layer, _conv_tapped(layer, tape, spec, h, layer.pointwise_kernel))

    return call


def _conv_transpose(layer, tape, original):
    """Conv1D/2D/3DTranspose (channels last): each input position's features times the
    kernel, an einsum tapped with the undilated input as its x, folded into the output
    (:func:`keras_dp.ghost_transpose.fold`), then the bias with a tap of its own."""

    def call(inputs):
        if layer.data_format != "channels_last" or getattr(layer, "lora_enabled", False):
            return original(inputs)
        equation = gt.transpose_equation(layer.rank)
        spec = gn.parse(equation, len(inputs.shape))
        u = ops.einsum(equation, inputs, tape.read(layer.kernel))
        u = tape.tap(layer, u, inputs, "einsum", spec, layer.kernel)
        pads = _keras.conv_transpose_pads(layer, tuple(inputs.shape))
        out = gt.fold(u, layer.strides, layer.dilation_rate, pads)
        return _activate(layer, _bias_tapped(layer, tape, out))

    return call


# The per-example path installs these alone (keras_dp.ghost.per_example_fn): their
# kernels' per-example gradients are then products of the unfolded patches, not
# autodiff's grouped convolutions.
conv_rules = (_conv, _depthwise, _separable, _conv_transpose)

_RULES = [
    (keras.layers.Dense, _dense),
    (keras.layers.EinsumDense, _einsum_dense),
    (keras.layers.Embedding, _embedding),
    (keras.layers.Conv1D, _conv),
    (keras.layers.Conv2D, _conv),  # Conv2D and Conv3D share the base class' call
    (keras.layers.DepthwiseConv2D, _depthwise),  # and DepthwiseConv1D: one call
    (keras.layers.SeparableConv2D, _separable),  # and SeparableConv1D
    (keras.layers.Conv2DTranspose, _conv_transpose),  # and Conv1D/3DTranspose
]
_RULES += ghost_rnn.RULES
if hasattr(keras.layers, "ReversibleEmbedding"):
    _RULES.append((keras.layers.ReversibleEmbedding, _reversible_embedding))
