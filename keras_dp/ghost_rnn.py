"""Ghost rules of Keras' ``LSTM``, ``GRU`` and ``SimpleRNN`` layers.

A recurrent layer's kernels act at every step, inside a loop, where no tap can go
(:attr:`keras_dp.ghost_tap.Tap.nested`). But each step's pre-activations are

    z_t = x_t·W + h_{t-1}·U + b,

so each example's gradients are sums over its steps of linear maps' gradients:
∂W = Σ_t x_tᵀ g_t, ∂U = Σ_t h_{t-1}ᵀ g'_t, ∂b = Σ_t g_t, with g_t the gradient at
x_t·W + b and g'_t the one at h_{t-1}·U. The rules compute x·W + b for every step
before the loop (one product over the sequence, tapped there with the sequence as its
input, as a ``Dense`` over the sequence is), and add to the recurrent product a value
tapped before the loop too, whose gradient is g'_t; its input, the states h_{t-1}, is
known only once the loop has run, and is handed to the tap then
(:meth:`keras_dp.ghost.Tape.tap_later`). Each kernel's norm and clipped sum are then
exact, from the same forms as a sequence's ``Dense``.

The loop itself is Keras' own (``keras.src.backend.rnn``, through the layer's
``RNN.call``, which keeps its masks, initial and returned states, ``go_backwards``,
``unroll`` and ``stateful``): only the cell's arithmetic is written out here. Without a
mask, h_{t-1} is the previous step's output (h_0 first); under one, a masked step's
output is zeros or the state carried, so each step outputs the state it started from
beside its new one. Input dropout multiplies the sequence before the product (one mask
for every step, as the cell applies it). Recurrent dropout, an LSTM's
``implementation=1`` under input dropout, a GRU with ``reset_after=False`` (whose
recurrent product reads r ⊙ h, not h) and a cell of another class call the layer's
own loop: their variables get per-example gradients.

Measured on 2 CPU cores (``benchmarks/results/recurrent``: Embedding, the layer
with 32 units over 64 tokens, a Dense head, batch 64; compiled steps / plain Keras'):
LSTM 2.49× and 2.35× before, 1.69× and 1.62× with the rule; GRU 1.9× either way (its
per-example gradients of a 32 × 96 kernel cost what the norms cost).
"""

from __future__ import annotations

import keras
from keras import ops

from keras_dp import _keras
from keras_dp import ghost_norms as gn

_EQUATION = "...a,ab->...b"


_CELLS = (keras.layers.LSTMCell, keras.layers.GRUCell, keras.layers.SimpleRNNCell)


def _supported(layer, training) -> bool:
    cell = layer.cell
    if type(cell).call not in tuple(c.call for c in _CELLS):
        return False
    if training and cell.recurrent_dropout > 0:
        return False
    if training and cell.dropout > 0 and getattr(cell, "implementation", 2) == 1:
        return False
    return not isinstance(cell, keras.layers.GRUCell) or cell.reset_after


def _rule(step):
    """A layer's rule from ``step(layer, tape, sequences) -> (inputs, cell, keep)``:
    the inputs the loop scans, the cell's step ``cell(inputs_t, h, rest) -> (h, rest)``
    and the callback that takes h_{t-1} of every step."""

    def rule(layer, tape, original):
        def loop(sequences, initial_state, mask, training=False):
            if isinstance(mask, (list, tuple)):
                mask = mask[0]
            cell = layer.cell
            if training and cell.dropout > 0:
                dp_mask = cell.get_dropout_mask(sequences[:, 0, :])
                sequences = sequences * ops.expand_dims(dp_mask, 1)
            inputs, cell_step, keep = step(layer, tape, sequences)
            run = _masked_loop if mask is not None else _loop
            last, outputs, states, h_prev = run(layer, cell_step, inputs, initial_state, mask)
            keep(ops.flip(h_prev, axis=1) if layer.go_backwards else h_prev)
            return last, outputs, states

        def call(sequences, initial_state=None, mask=None, training=False):
            kwargs = {"initial_state": initial_state, "mask": mask, "training": training}
            if not _supported(layer, training):
                return original(sequences, **kwargs)
            with _keras.installed_inner_loop(layer, loop):
                return original(sequences, **kwargs)

        return call

    return rule


def _rnn(layer, step_fn, inputs, states, mask):
    return _keras.backend_rnn(
        step_fn,
        inputs,
        states,
        go_backwards=layer.go_backwards,
        mask=mask,
        unroll=layer.unroll,
        input_length=keras.tree.flatten(inputs)[0].shape[1],
        zero_output_for_mask=layer.zero_output_for_mask,
        return_all_outputs=True,
    )


def _loop(layer, cell_step, inputs, initial_state, mask):
    """Keras' loop; without a mask, each step's output is its new state, so h_{t-1}
    is the previous output (h_0 first), in the loop's order."""

    def step_fn(inputs_t, states):
        h, rest = cell_step(inputs_t, states[0], states[1:])
        return h, [h, *rest]

    last, outputs, states = _rnn(layer, step_fn, inputs, list(initial_state), mask)
    h_prev = ops.concatenate([ops.expand_dims(initial_state[0], 1), outputs[:, :-1]], axis=1)
    return last, outputs, states, h_prev


def _masked_loop(layer, cell_step, inputs, initial_state, mask):
    """Keras' loop under a mask: a masked step's output is zeros or the state carried,
    so each step outputs its new state beside the one it started from, and the state
    holds both (a masked output takes the state's shape)."""
    units = layer.cell.units

    def step_fn(inputs_t, states):
        h = states[0][..., :units]
        h_new, rest = cell_step(inputs_t, h, states[1:])
        both = ops.concatenate([h_new, h], axis=-1)
        return both, [both, *rest]

    h0, *rest = initial_state
    both = [ops.concatenate([h0, h0], axis=-1), *rest]
    last, outputs, states = _rnn(layer, step_fn, inputs, both, mask)
    states = [states[0][..., :units], *states[1:]]
    return last[..., :units], outputs[..., :units], states, outputs[..., units:]


def _tap_input_product(layer, tape, sequences, bias):
    """x·W (+ bias) over the whole sequence, tapped with the sequence as its input (as a
    ``Dense`` over the sequence), and the product's einsum spec."""
    from keras_dp import ghost_layers  # it imports this module for RULES

    p = ghost_layers.einsum_tapped(layer, tape, _EQUATION, sequences, layer.cell.kernel, bias)
    return p, gn.parse(_EQUATION, len(sequences.shape))


def _added_products(layer, tape, sequences):
    """(x·W + b, tapped, plus a zero tapped for h_{t-1}·U, whose gradient g'_t is g_t: the
    recurrent product adds straight into z_t; the callback that takes h_{t-1}; U)."""
    cell = layer.cell
    bias = cell.bias if cell.use_bias else None
    p, spec = _tap_input_product(layer, tape, sequences, bias)
    p, keep = tape.tap_later(layer, p, "einsum", spec, cell.recurrent_kernel)
    return p, keep, tape.read(cell.recurrent_kernel)


def _lstm(layer, tape, sequences):
    cell = layer.cell
    p, keep, recurrent = _added_products(layer, tape, sequences)

    def cell_step(p_t, h, rest):
        (c,) = rest
        z = p_t + ops.matmul(h, recurrent)
        z0, z1, z2, z3 = ops.split(z, 4, axis=-1)
        i = cell.recurrent_activation(z0)
        f = cell.recurrent_activation(z1)
        c = f * c + i * cell.activation(z2)
        o = cell.recurrent_activation(z3)
        return o * cell.activation(c), [c]

    return p, cell_step, keep


def _gru(layer, tape, sequences):
    cell = layer.cell
    units = cell.units
    shape = (*sequences.shape[:-1], 3 * units)
    q = ops.zeros(shape, cell.compute_dtype)
    p, spec = _tap_input_product(layer, tape, sequences, None)
    if cell.use_bias:  # [2, 3·units]: the input's bias, then the recurrent product's
        b = ops.broadcast_to(tape.read(cell.bias), (*sequences.shape[:-1], 2, 3 * units))
        b = tape.tap(layer, b, None, "bias", None, None, cell.bias)
        p, q = p + b[..., 0, :], q + b[..., 1, :]
    # The recurrent product's own gradient (r ⊙ g on its third part): a zero tapped here.
    q, keep = tape.tap_later(layer, q, "einsum", spec, cell.recurrent_kernel)
    recurrent = tape.read(cell.recurrent_kernel)

    def cell_step(pq_t, h, rest):
        p_t, q_t = pq_t
        inner = ops.matmul(h, recurrent) + q_t
        x_z, x_r, x_h = ops.split(p_t, 3, axis=-1)
        r_z, r_r, r_h = ops.split(inner, 3, axis=-1)
        z = cell.recurrent_activation(x_z + r_z)
        r = cell.recurrent_activation(x_r + r_r)
        return z * h + (1 - z) * cell.activation(x_h + r * r_h), []

    return (p, q), cell_step, keep


def _simple(layer, tape, sequences):
    """h_t = activation(x_t·W + b + h_{t-1}·U): the LSTM's products, one gate."""
    cell = layer.cell
    p, keep, recurrent = _added_products(layer, tape, sequences)

    def cell_step(p_t, h, rest):  # Keras makes activation=None its linear function
        return cell.activation(p_t + ops.matmul(h, recurrent)), []

    return p, cell_step, keep


RULES = [
    (keras.layers.LSTM, _rule(_lstm)),
    (keras.layers.GRU, _rule(_gru)),
    (keras.layers.SimpleRNN, _rule(_simple)),
]
