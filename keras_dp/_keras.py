"""Every private Keras internal keras_dp uses, in one place.

A Keras upgrade that renames one of these is this file's work. Each entry says what
it is for. Tested with keras 3.15.1 (and keras-hub 0.32.0); ``pyproject.toml`` declares
the range.

- ``PyDatasetAdapter`` (``keras.src.trainers.data_adapters``): hands fit our sampled
  batches as this process's share, in order (no Keras shuffling);
  :class:`BatchesAdapter` overrides its ``get_jax_iterator``.
- ``KerasSaveable`` (``keras.src.saving``): the privacy ledger is saved with the weights
  (``.keras``, weights-only checkpoints) as a saveable part of the model; its
  ``_unpickle_model`` loads a pickled (or deep-copied) model.
- ``Layer._flatten_layers``: every sublayer, to refuse layers that mix examples.
- ``Trainer._loss_tracker``, ``Trainer._compile_metrics`` and the ``CompileMetrics``
  internals (``_user_metrics``, ``_flat_metrics``, ``_flatten_y``, ...): the DP step
  updates the loss and compiled metrics itself, over real rows only, chunk by chunk.
- ``Trainer._compile_loss``: whether the compiled loss needs labels; its ``metrics``
  (one ``Mean`` per output of a multi-output model, ``a_loss``, ``b_loss``, ...), which
  ``stateless_compute_loss`` updates and the DP step sums over real rows.
- ``array_slicing.train_validation_split``: ``fit(validation_split=...)``'s split (the
  last rows), exactly as Keras' own ``fit`` makes it, before the sampler sees the rest.
- ``Trainer._symbolic_build``: builds the model, optimizer and metrics before the first
  (traced) step, as Keras' own fit does; ``backend.compute_output_spec`` builds a
  compiled loss that a ``compute_loss`` override leaves unbuilt.
- ``backend.get_keras_mask``/``set_keras_mask``: an output's Keras mask (an attribute
  of the array, lost through ``vmap``) read in one example's step and attached again
  for the compiled metrics.
- ``backend.get_stateless_scope``: whether a layer's ``call`` assigned a trainable
  variable before a ghost rule reads it (``SpectralNormalization`` assigns its kernel).
- ``Layer._call_has_training_arg``: whether ``call`` takes ``training``.
- ``Layer._losses_override``: feeds ``add_loss`` losses of one example's stateless call
  to ``stateless_compute_loss``, as Keras' own JAX trainer does.
- ``Layer._tracker``: adds DP state to a model that ``make_private`` received built.
- ``Dense._kernel``, ``EinsumDense._kernel``, ``Embedding._embeddings``: the stored
  (frozen) kernel under LoRA, and the table behind ``embeddings``, for ghost clipping.
- An instance attribute ``call`` (set and removed around one trace of the DP step):
  ghost clipping's view of Dense, EinsumDense, Embedding and Conv layers
  (``keras_dp.ghost``).
  ``Layer.__call__`` looks ``self.call`` up on the instance; classes are never patched.
- ``RNN.inner_loop`` (an instance attribute set and removed the same way) and
  ``backend.rnn``: the ghost rules of ``LSTM``, ``GRU`` and ``SimpleRNN``
  (``keras_dp.ghost_rnn``) run Keras' own ``RNN.call`` and loop with their step's
  arithmetic written out.
- ``Trainer._make_function``, ``_get_state_sharding_spec`` and
  ``backend.config.is_nnx_enabled``: fit's train function is built as the JAX trainer's
  ``make_train_function`` builds it, with one more input to the jitted step (the noise
  multiplier), and compiled ahead of Keras' loop from the state Keras will pass
  (:func:`dp_train_function`, :func:`compile_ahead`, :func:`train_state`).
- ``python_utils.pythonify_logs``: a step's logs as Keras hands them to batch-end hooks
  (floats, nested dicts flattened, keys sorted), for the DP progress bar, which reads
  them only when it redraws (:class:`keras_dp.callbacks.DPProgbarLogger`).
"""

from __future__ import annotations

import contextlib

import jax
import keras
from keras.src.backend import (
    compute_output_spec,
    get_keras_mask,
    get_stateless_scope,
    set_keras_mask,
)
from keras.src.backend.common.backend_utils import compute_conv_transpose_padding_args_for_jax
from keras.src.backend.config import is_nnx_enabled
from keras.src.saving.keras_saveable import KerasSaveable
from keras.src.trainers.data_adapters.array_slicing import train_validation_split
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter
from keras.src.utils.python_utils import pythonify_logs

from keras_dp import _backend

__all__ = [
    "KerasSaveable",
    "BatchesAdapter",
    "call_has_training_arg",
    "assigned_in_call",
    "installed_calls",
    "stored_kernel",
    "stored_embeddings",
    "compiled_metrics",
    "has_compiled_loss",
    "loss_tracker",
    "loss_metric_slots",
    "unpickle_model",
    "train_validation_split",
    "get_keras_mask",
    "set_keras_mask",
    "losses_override",
    "metric_groups",
    "pythonify_logs",
    "sublayers",
    "symbolic_build",
    "track_after_build",
    "user_metrics_compiled",
]


class BatchesAdapter(PyDatasetAdapter):
    """Keras' adapter of a ``PyDataset`` whose batches are tuples of numpy arrays
    already (:class:`keras_dp.data.DPBatches`, one worker): its JAX iterator yields
    them as they are. Keras' passes every leaf of every batch through a converter that
    returns numpy arrays unchanged (~40 µs of host time a step)."""

    def get_jax_iterator(self):
        if self.enqueuer is not None:  # workers: Keras' own ordered enqueuer
            return super().get_jax_iterator()
        batches = self.py_dataset
        return (batches[i] for i in range(batches.num_batches))


def unpickle_model(archive):
    """A model from the in-memory ``.keras`` archive that Keras' ``__reduce__`` wrote."""
    return KerasSaveable._unpickle_model(archive)


def sublayers(model) -> list:
    """Every layer inside ``model`` (not the model itself)."""
    return list(model._flatten_layers(include_self=False))


def loss_tracker(model):
    """The ``Mean`` metric behind the ``loss`` log."""
    return model._loss_tracker


def compiled_metrics(model):
    """The ``CompileMetrics`` of ``model.compile(metrics=..., weighted_metrics=...)``."""
    return model._compile_metrics


def user_metrics_compiled(model) -> bool:
    """Whether the user compiled any metric (metrics or weighted_metrics)."""
    compiled = model._compile_metrics
    return compiled is not None and bool(compiled._user_metrics or compiled._user_weighted_metrics)


def metric_groups(compiled, y, y_pred) -> tuple[list, list, list, list]:
    """(flat y, flat y_pred, unweighted metrics, weighted metrics) of ``compiled``."""
    if not compiled.built:
        compiled.build(y, y_pred)
    return (
        compiled._flatten_y(y),
        compiled._flatten_y(y_pred),
        compiled._flat_metrics,
        compiled._flat_weighted_metrics,
    )


def loss_metric_slots(model) -> list[int]:
    """Where the compiled loss's own metrics (the per-output loss trackers of a
    multi-output model) sit in ``model.metrics_variables``; empty for one output."""
    compile_loss = getattr(model, "_compile_loss", None)
    if compile_loss is None:
        return []
    owned = {id(v) for metric in compile_loss.metrics for v in metric.variables}
    return [i for i, v in enumerate(model.metrics_variables) if id(v) in owned]


def has_compiled_loss(model) -> bool:
    return getattr(model, "_compile_loss", None) is not None


def symbolic_build(model, data_batch) -> None:
    """Builds ``model``, its optimizer, compiled metrics and compiled loss from
    ``data_batch`` (one or two real examples).

    A ``compute_loss`` override that never calls the compiled loss leaves it unbuilt,
    and Keras' ``fit`` would then build it again from the first batch it is fed: ours
    packs x with the DP rows (``dp_x``, ``dp_mask_key``). So it is built here."""
    model._symbolic_build(data_batch=data_batch)
    compile_loss = getattr(model, "_compile_loss", None)
    if compile_loss is None or compile_loss.built:
        return
    spec = lambda a: None if a is None else keras.KerasTensor(a.shape, a.dtype)  # noqa: E731
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(
        keras.tree.map_structure(spec, data_batch)
    )
    y_pred = compute_output_spec(model, x, training=False)
    compute_output_spec(compile_loss, y, y_pred, sample_weight)


def call_has_training_arg(model) -> bool:
    return model._call_has_training_arg


@contextlib.contextmanager
def losses_override(model, losses):
    """``stateless_compute_loss`` sees ``losses`` (from ``stateless_call``) as the
    model's ``add_loss`` losses."""
    if not losses:
        yield
        return
    model._losses_override.clear()
    model._losses_override = losses
    try:
        yield
    finally:
        model._losses_override.clear()


def track_after_build(layer, name: str, value) -> None:
    """``setattr(layer, name, value)`` with Keras' tracking, also once ``layer`` is built.

    Keras locks a built layer's state; adding DP state (epoch counters, the adaptive
    clip norm) to a model that ``make_private`` received built needs the lock lifted
    for the one assignment, as Keras' own ``_untrack_variable`` does.
    """
    tracker = getattr(layer, "_tracker", None)
    locked = tracker is not None and tracker.locked
    if locked:
        tracker.unlock()
    try:
        setattr(layer, name, value)
    finally:
        if locked:
            tracker.lock()


def assigned_in_call(variable, value) -> bool:
    """Whether the running stateless call has assigned ``variable``: its current value
    in Keras' ``StatelessScope`` is no longer ``value``, the one the call was given."""
    scope = get_stateless_scope()
    current = scope.get_current_value(variable) if scope is not None else None
    return current is not None and current is not value


def stored_kernel(layer):
    """The kernel variable a Dense/EinsumDense stores (frozen under LoRA)."""
    return layer._kernel


def conv_transpose_pads(layer, input_shape) -> list:
    """The (low, high) padding per spatial axis that Keras' JAX ``conv_transpose``
    gives ``jax.lax.conv_transpose`` for ``layer`` (channels last) on ``input_shape``."""
    return compute_conv_transpose_padding_args_for_jax(
        input_shape=input_shape,
        kernel_shape=tuple(layer.kernel.shape),
        strides=layer.strides,
        padding=layer.padding,
        output_padding=layer.output_padding,
        dilation_rate=layer.dilation_rate,
    )


def stored_embeddings(layer):
    """The table variable an Embedding stores."""
    return layer._embeddings


@contextlib.contextmanager
def installed_calls(calls: dict):
    """Each layer's ``call`` replaced by ``calls[layer]`` on the instance, for the block.

    Only while one function is traced: on exit every instance is as it was.
    """
    done = []
    try:
        for layer, fn in calls.items():
            if "call" in vars(layer):
                continue  # the instance already has its own call: left alone
            object.__setattr__(layer, "call", fn)
            done.append(layer)
        yield
    finally:
        for layer in done:
            object.__delattr__(layer, "call")


@contextlib.contextmanager
def installed_inner_loop(layer, loop):
    """An ``RNN`` layer's ``inner_loop`` replaced by ``loop`` on the instance, for the
    block (inside one trace, as :func:`installed_calls`)."""
    object.__setattr__(layer, "inner_loop", loop)
    try:
        yield
    finally:
        object.__delattr__(layer, "inner_loop")


def backend_rnn(step, inputs, initial_states, **kwargs):
    """Keras' own recurrent loop (``keras.src.backend.rnn``): masks, ``go_backwards``,
    ``unroll`` as the ``RNN`` layers run them."""
    from keras.src import backend

    return backend.rnn(step, inputs, initial_states, **kwargs)


def dp_train_function(model, noised_step):
    """(fit's train function, its jitted step) built as Keras' JAX trainer builds them
    (``make_train_function``: the step jitted with the state donated and, under a
    ``keras.distribution``, the state's shardings out; ``_make_function`` runs
    ``steps_per_execution`` of them a call), except that the jitted step is
    ``noised_step(state, data, noise_multiplier)``, the multiplier read from
    ``model._dp_noise_input`` at each call. None where Keras' own function is kept
    (run eagerly, ``jit_compile=False``, Flax NNX's ``nnx.jit``): its step then reads
    the plan's σ."""
    if not jits_its_step(model):
        return None
    out_shardings = None
    if keras.distribution.distribution() is not None:
        out_shardings = (None, model._get_state_sharding_spec())
    jitted = jax.jit(
        noised_step,
        donate_argnums=0,
        out_shardings=out_shardings,
        compiler_options=_backend.compiler_options(),
    )

    def step_function(state, data):
        return jitted(state, data, model._dp_noise_input)

    return model._make_function(step_function), jitted


def jits_its_step(model) -> bool:
    """Whether fit's train function is :func:`dp_train_function`'s jitted step (not
    Keras' own: run eagerly, ``jit_compile=False``, Flax NNX)."""
    return not (model.run_eagerly or not model.jit_compile or is_nnx_enabled())


def compile_ahead(model, jitted, batch, multiplier, lowered=None) -> None:
    """Traces and compiles ``jitted`` (:func:`dp_train_function`'s) for ``batch`` and the
    model's state as Keras' fit will pass them, so that fit's first call finds it
    compiled. ``batch`` as the JAX trainer feeds it without a distribution (numpy
    arrays, or the same device_put: one compiled program), ``multiplier`` a float32
    scalar (its value is not read). ``lowered()``, if given, is called between the
    trace and lowering (Python) and XLA's compile (which releases the GIL)."""
    program = jitted.trace(train_state(model), batch, multiplier).lower()
    if lowered is not None:
        lowered()
    program.compile()


def train_state(model) -> tuple:
    """The JAX trainer's ``state`` argument of ``train_step``, from the model's variables:
    what Keras' fit passes (its ``_get_jax_state`` of all four kinds)."""
    return (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
