"""The loss tracker and compiled metrics of a DP step, over real rows only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras

from keras_dp import _keras

# What DP training counts per epoch, beside the loss (from private rows, without noise:
# like the loss, not covered by the guarantee).
DP_COUNTERS = ("clipped_fraction", "nonfinite_examples")


def add_counters(model) -> None:
    """Gives ``model`` the epoch counters of DP training (once), as Keras metrics.

    ``clipped_fraction``: the fraction of the epoch's real examples whose gradient norm
    exceeded C (a guide for choosing C). ``nonfinite_examples``: the epoch's real
    examples whose gradient was not finite (they contributed nothing). Being metrics,
    both are totals over the epoch, reset by Keras at each epoch's start.
    """
    if getattr(model, "_dp_counters", None) is None:
        counters = (keras.metrics.Mean(name=DP_COUNTERS[0]), keras.metrics.Sum(name=DP_COUNTERS[1]))
        _keras.track_after_build(model, "_dp_counters", counters)


def update(model, metrics_vars, loss, num_real, y, y_pred, real, sample_weight, nonfinite, clipped):
    """The loss tracker, the DP counters, and the compiled metrics when ``y_pred`` (the
    rows and their Keras masks, :func:`one_row`) is given; the logs.

    ``loss`` is (the mean loss, the number of rows it is the mean of). ``real`` is the
    bool mask of real rows. ``y_pred=None``: the compiled metrics were already updated
    chunk by chunk (:func:`update_compiled`) or there are none.
    """
    mapping = list(zip(model.metrics_variables, metrics_vars))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        mean_loss, loss_rows = loss
        _keras.loss_tracker(model).update_state(mean_loss, sample_weight=loss_rows)
        counters = getattr(model, "_dp_counters", None)
        if counters is not None:
            fraction, dropped = counters
            real_count = jnp.maximum(num_real, 1).astype(jnp.float32)
            fraction.update_state(clipped.astype(jnp.float32) / real_count, sample_weight=num_real)
            dropped.update_state(nonfinite.astype(jnp.float32))
        compiled = _keras.compiled_metrics(model)
        if y_pred is not None and compiled is not None:
            _update_compiled(compiled, y, y_pred, real, sample_weight)
        logs = model.get_metrics_result()
    return logs, _values(model, scope)


def update_compiled(model, metrics_vars, y, y_pred, real, sample_weight):
    """The compiled metrics' variables after one chunk of rows (padding weighs 0)."""
    mapping = list(zip(model.metrics_variables, metrics_vars))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        _update_compiled(_keras.compiled_metrics(model), y, y_pred, real, sample_weight)
    return _values(model, scope)


def one_row(y_pred):
    """``y_pred`` of a batch of one example as one row, and each output's Keras mask
    (``Embedding(mask_zero=True)``, ``Masking``; None where it has none) as one row.

    A Keras mask is an attribute of the array: it does not come out of ``vmap``, so
    the rows carry it beside them and :func:`_update_compiled` attaches it again.
    """
    masks = [_keras.get_keras_mask(a) for a in jax.tree.leaves(y_pred)]
    rows = jax.tree.map(lambda a: a[0], y_pred)
    return rows, [None if m is None else m[0] for m in masks]


def _update_compiled(compiled, y, predictions, real, sample_weight):
    """Keras gives unweighted ``metrics`` no sample weight, which would count padding;
    here every compiled metric gets the row mask (times ``sample_weight`` for
    ``weighted_metrics``). Padding rows' values are replaced by zeros first: a weight
    of 0 does not cancel a NaN (padding repeats example 0, which may be non-finite).
    Each output's Keras mask is attached again, so metrics skip masked positions (of
    sequences) as Keras' own step makes them."""
    y_pred, keras_masks = predictions
    y, y_pred, sample_weight = (masked(a, real) for a in (y, y_pred, sample_weight))
    leaves, structure = jax.tree.flatten(y_pred)
    for leaf, keras_mask in zip(leaves, keras_masks):
        if keras_mask is not None:
            _keras.set_keras_mask(leaf, keras_mask)
    y_pred = jax.tree.unflatten(structure, leaves)
    ys, preds, plain, weighted = _keras.metric_groups(compiled, y, y_pred)
    real = real.astype(jnp.float32)
    for metrics, weight in (
        (plain, row_weights(real, None, preds[0])),
        (weighted, row_weights(real, sample_weight, preds[0])),
    ):
        for metric, y_t, y_p in zip(metrics, ys, preds):
            if metric:
                metric.update_state(y_t, y_p, sample_weight=weight)


def add_rows(values: list, slots: list[int], changes: list, real: jax.Array) -> list:
    """``values`` with each real row's change to ``values[slot]`` added (padding rows'
    are replaced by zeros first, so a NaN there adds nothing).

    ``changes[j]`` holds, row by row, what one example's ``compute_loss`` added to the
    metric variable ``slots[j]`` starting from zero: for Keras' per-output loss trackers
    (``Mean``: a total and a count) the sums give the mean over the real rows.
    """
    values = list(values)
    for slot, change in zip(slots, masked(changes, real)):
        values[slot] = values[slot] + jnp.sum(change, axis=0).astype(values[slot].dtype)
    return values


def masked(tree, real: jax.Array):
    """``tree`` with every row that is not real set to zero (``jnp.where``, not ``*``)."""
    if tree is None:
        return None

    def zero_padding(a):
        a = jnp.asarray(a)
        keep = real.reshape(real.shape + (1,) * (a.ndim - 1))
        return jnp.where(keep, a, jnp.zeros((), a.dtype))

    return jax.tree.map(zero_padding, tree)


def _values(model, scope) -> list:
    values = []
    for ref in model.metrics_variables:
        value = scope.get_current_value(ref)
        values.append(ref.value if value is None else value)
    return values


def row_weights(real: jax.Array, sample_weight, y_pred):
    """The row mask (times ``sample_weight``), shaped to weigh ``y_pred``'s rows."""
    if sample_weight is None:
        # Per-row weights broadcast over a sequence axis (e.g. causal LM tokens).
        extra = max(0, jnp.ndim(y_pred) - 2)
        return real.reshape(real.shape + (1,) * extra)
    sw = jnp.asarray(sample_weight)
    return sw * real.reshape(real.shape + (1,) * (sw.ndim - 1)).astype(sw.dtype)
