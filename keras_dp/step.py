"""One DP-SGD update: what ``DPModel.train_step`` computes (pure JAX over Keras state).

Formal guarantee: one call is one optimizer update and one accounted step. Each real
row's gradient over the *trainable* variables (a row is one privacy unit: an example,
or a user's block) is clipped to L2 norm C, so adding or removing one unit changes
the sum by at most C; the clipped gradients are summed, N(0, (σ·C)²) noise is added
once to the sum (or BandMF's correlated noise, :mod:`keras_dp.bandmf`), and the result
is divided by the *expected* batch size B before the optimizer applies it. Padding
rows and rows whose gradient is not finite contribute nothing.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_dp import (
    _backend,
    _keras,
    adaptive,
    clipping,
    distribute,
    ghost,
    ghost_cost,
    ledger,
    metrics,
    noise,
    noise_state,
    step_logs,
    units,
)
from keras_dp.config import DPConfig
from keras_dp.rows import split_mask_key, unpack_rows

logger = logging.getLogger(__name__)

# Per-example dropout keys: row k's seed state is offset by (k + 1)·golden ratio.
_GOLDEN = np.uint32(0x9E3779B1)


@contextlib.contextmanager
def paused_gc():
    """Python's cyclic garbage collector paused for the block (a trace of the DP step).

    A trace makes hundreds of thousands of short-lived Python objects; collections
    during it promoted them to the oldest generation, whose count then set off a full
    collection of the whole heap inside the first epoch (0.31-0.37 s in 4 of 22 of the
    MLP's first epochs of ~1 s, ``benchmarks/first_epoch_gc.py``; none of 22 paused).
    Paused, they are freed by reference counting as the trace ends. The collector's
    state before the block is restored after it.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def paused_gc_on_first_call(fn):
    """``fn``, whose first call runs with Python's cyclic garbage collector paused
    (:func:`paused_gc`): Keras' train function traces and compiles the DP step on its
    first call, unless ``fit`` compiled it ahead. Later calls are untouched."""
    first = True

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal first
        if not first:
            return fn(*args, **kwargs)
        first = False
        with paused_gc():
            return fn(*args, **kwargs)

    return call


def noise_multiplier(config: DPConfig, packed: dict):
    """The noise multiplier on the clipped sum (σ, or σ_Δ with adaptive clipping;
    ``DPConfig.gradient_noise_multiplier``): the batch's ``dp_noise`` input when fit's
    train function added it (:func:`with_noise`), else the plan's, as the same float32
    value (:func:`keras_dp.noise.multiplier_input`)."""
    if "dp_noise" in packed:
        return packed["dp_noise"]
    if config.gradient_noise_multiplier is None:
        raise ValueError(
            "train_step needs a calibrated plan: call model.fit, or set "
            "model.set_dp_config(config.calibrate(dataset_size=N)) first."
        )
    return noise.multiplier_input(config.gradient_noise_multiplier)


def with_noise(data, multiplier):
    """``data`` (a DPBatches batch) with the noise multiplier added to its packed x as
    ``dp_noise``: an input of the compiled step, never a constant of its program."""
    if isinstance(data, dict):  # x alone
        return {**data, "dp_noise": multiplier}
    packed, *rest = data
    return ({**packed, "dp_noise": multiplier}, *rest)


def train_step(model, state, data):
    """One DP-SGD update (``DPModel.train_step``): the guarantee is in this module's
    docstring. ``state`` and ``data`` are as in Keras' JAX trainer; ``data`` is a batch
    of :class:`keras_dp.data.DPBatches`, as leaves or one matrix
    (:func:`keras_dp.rows.unpack_rows`)."""
    config = model._dp_config
    trainable, non_trainable, optimizer_vars, metrics_vars = state
    packed, y, sample_weight = keras.utils.unpack_x_y_sample_weight(unpack_rows(data))
    x = packed["dp_x"]
    mask, key_rows = split_mask_key(packed["dp_mask_key"])
    seed_slots = [
        i for i, v in enumerate(model.non_trainable_variables) if ledger.SEED_STATE in v.path
    ]

    compiled = _keras.compiled_metrics(model)
    has_metrics = _keras.user_metrics_compiled(model)
    # Built metrics are updated chunk by chunk inside the loop, so no row's prediction
    # is kept for the whole batch and memory follows the chunk. (Unbuilt ones, which
    # fit's symbolic build normally prevents, see the whole batch once.)
    fold_compiled = has_metrics and compiled.built
    keep_predictions = has_metrics and not compiled.built
    # The compiled loss's per-output trackers (``a_loss``, ...): each example's own
    # update (from zeroed trackers), summed over real rows like the compiled metrics.
    loss_slots = _keras.loss_metric_slots(model)
    fold_metrics = fold_compiled or bool(loss_slots)
    example_metrics = [jnp.zeros_like(v) for v in metrics_vars] if loss_slots else metrics_vars

    def per_example(params, xi, yi, swi, index):
        xi, yi, swi = jax.tree.map(lambda a: a[None], (xi, yi, swi))
        nt = list(non_trainable)
        for i in seed_slots:  # each example its own dropout randomness
            offset = jnp.asarray([(index + 1) * _GOLDEN, 0]).astype(nt[i].dtype)
            nt[i] = nt[i] + offset
        loss, (y_pred, _, after) = model_loss(model, params, nt, example_metrics, xi, yi, swi)
        y_pred = metrics.one_row(y_pred)  # (the row, its Keras masks)
        kept = y_pred if keep_predictions else None
        if not fold_metrics:
            return loss, kept
        return loss, (kept, (y_pred if fold_compiled else None, [after[i] for i in loss_slots]))

    def fold(values, chunk_rows, chunk_folded, chunk_mask):
        chunk_y, chunk_sw, (chunk_pred, changes), real = units.for_metrics(
            chunk_rows, chunk_folded, chunk_mask
        )
        values = metrics.add_rows(values, loss_slots, changes, real)
        if not fold_compiled:
            return values
        return metrics.update_compiled(model, values, chunk_y, chunk_pred, real, chunk_sw)

    # A row is one privacy unit: an example, or a user's block (packed "dp_inner").
    rows = (x, y, sample_weight) + ((packed["dp_inner"],) if "dp_inner" in packed else ())
    clip_slot = model._dp_clip_slot()
    clip_norm = config.l2_clip_norm if clip_slot is None else non_trainable[clip_slot]
    shards, shard_axis = distribute.batch_shards()
    per_shard = mask.shape[0] // shards
    unit = units.unit_fn(per_example, config.user_block)
    example_fn, ghost_spec, plan = ghost.clipping(model, config, unit, trainable, rows)
    size = chunk_size(config, shards, model)
    if ghost_cost.one_pass(plan, config, per_shard):
        size = per_shard
    chunk = step_chunk(per_shard, size)
    grad_sum, losses, aux, nonfinite, clipped = clipping.clipped_sum(
        example_fn,
        trainable,
        rows,
        mask,
        clip_norm,
        chunk,
        shards,
        shard_axis,
        fold=fold if fold_metrics else None,
        fold_init=list(metrics_vars) if fold_metrics else None,
        mesh=distribute.batch_mesh() if shards > 1 else None,
        ghost=ghost_spec,
    )
    y_pred, metrics_vars = aux if fold_metrics else (aux, metrics_vars)
    # The noise key is an input (never a constant of the compiled program): the
    # secret seed folded with the ledger's count of this update (on the host,
    # noise.step_key_data), unique along the weights' history; a new seed is drawn
    # whenever loaded weights go back.
    key = noise.wrap_step_key(key_rows[0])
    if clip_slot is not None:  # adaptive clipping: the count's noise, its own stream
        key, count_key = jax.random.split(key)
    multiplier = noise_multiplier(config, packed)
    noise_slots = noise_state.slots(model)
    if noise_slots is None:
        grads = noise.privatize(grad_sum, key, multiplier, clip_norm, config.batch_size)
    else:  # correlated noise (BandMF): the noise history is part of the state
        strategy_slot, history_slots = noise_slots
        grads, history = noise.privatize_correlated(
            grad_sum,
            key,
            multiplier,
            clip_norm,
            config.batch_size,
            non_trainable[strategy_slot],
            [non_trainable[i] for i in history_slots],
        )
        non_trainable = list(non_trainable)
        for i, h in zip(history_slots, history):
            non_trainable[i] = h
    # The optimizer divides by its loss scale (LossScaleOptimizer under mixed_float16,
    # loss_scale_factor); the DP loss was never scaled, so scale the gradient to match.
    scale = loss_scale(model.optimizer, optimizer_vars)
    grads = [(g * scale).astype(v.dtype) for g, v in zip(grads, trainable)]
    trainable, optimizer_vars = model.optimizer.stateless_apply(optimizer_vars, grads, trainable)

    non_trainable = next_state(
        model, state[0], non_trainable, seed_slots, metrics_vars, units.first_example(rows)
    )
    # The logs cover the rows that trained: a row whose gradient was not finite
    # contributed nothing (its loss is NaN here; nonfinite_examples counts it), so it
    # does not turn the loss to NaN (TerminateOnNaN) nor count in the metrics. The
    # counts and the loss' total are one reduction over the rows: XLA compiles each
    # reduction as a loop of its own (about 7 ms of compile each on a CPU).
    trained = jnp.logical_and(mask, jnp.isfinite(losses))
    per_row = jnp.stack([mask, trained, jnp.where(trained, losses, 0.0)], axis=1)
    totals = jnp.sum(per_row.astype(jnp.float32), axis=0)  # counts exact below 2^24 rows
    num_real, num_trained = totals[0].astype(jnp.int32), totals[1].astype(jnp.int32)
    loss = totals[2] / jnp.maximum(num_trained, 1)
    if clip_slot is not None:  # adaptive clipping: C for the next update, privatised
        fraction = adaptive.unclipped_fraction(
            num_real - nonfinite - clipped,
            num_real,
            count_key,
            config.count_noise,
            config.batch_size,
        )
        non_trainable[clip_slot] = adaptive.next_clip_norm(
            clip_norm, fraction, config.clip_quantile, config.clip_learning_rate
        )
    y, sample_weight, y_pred, real = units.for_metrics(rows, y_pred, trained)
    logs, metrics_vars = metrics.update(
        model,
        metrics_vars,
        (loss, num_trained),
        num_real,
        y,
        y_pred,
        real,
        sample_weight,
        nonfinite,
        clipped,
    )
    # One transfer to read them all on the host (step_logs: Keras reads each value).
    logs = step_logs.StepLogs.of(logs)
    return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)


def next_state(model, params, non_trainable, seed_slots, metrics_vars, rows):
    """The non-trainable state after the step: every seed state advanced as one
    forward pass advances it, whatever the batch holds (an empty Poisson draw
    included), so the saved state reveals nothing of the draws.

    The advance comes from one more forward pass on row 0 whose only used outputs
    are the seed states; they do not depend on the data, so XLA keeps nothing else
    of it. Other non-trainable state that a layer assigns in ``call`` would need
    one value per example; it is not kept, and a warning names it.
    """
    if not non_trainable:
        return []
    _, (_, after, _) = model_loss(model, params, list(non_trainable), metrics_vars, *rows)
    variables = model.non_trainable_variables
    changed = [
        variables[i].path
        for i, (a, b) in enumerate(zip(non_trainable, after))
        if i not in seed_slots and a is not b
    ]
    if changed:
        logger.warning(
            "Non-trainable state assigned in call() is not kept by DP training (it "
            "would mix examples): %s. Compute it outside the DP step, or make it "
            "trainable=False weights that call() does not assign.",
            ", ".join(changed),
        )
    state = list(non_trainable)
    for i in seed_slots:
        state[i] = after[i]
    return state


def model_loss(model, params, non_trainable, metrics_vars, x, y, sample_weight):
    """The model's training loss on (x, y) (Keras' compiled loss plus the losses its
    layers add, ``training=True``), and (y_pred, the non-trainable state after the call,
    the metrics' variables after ``compute_loss`` updated its per-output trackers)."""
    kwargs = {"training": True} if _keras.call_has_training_arg(model) else {}
    y_pred, non_trainable, losses = model.stateless_call(
        params, non_trainable, x, return_losses=True, **kwargs
    )
    with _keras.losses_override(model, losses):
        loss, (_, _, metrics_vars) = model.stateless_compute_loss(
            params,
            non_trainable,
            metrics_vars,
            x=x,
            y=y,
            y_pred=y_pred,
            sample_weight=sample_weight,
            training=True,
        )
    return loss, (y_pred, non_trainable, metrics_vars)


def loss_scale(optimizer, optimizer_vars) -> jax.Array:
    """What ``optimizer.stateless_apply`` divides the gradients by (1.0 for most)."""
    inner = getattr(optimizer, "inner_optimizer", None)
    mapping = list(zip(optimizer.variables, optimizer_vars))
    with keras.StatelessScope(state_mapping=mapping):
        scale = optimizer.scale_loss(jnp.float32(1.0))
        if inner is not None:
            scale = scale * inner.scale_loss(jnp.float32(1.0))
    return jnp.asarray(scale, jnp.float32)


def step_chunk(per_shard: int, chunk_size: int) -> int:
    """The chunk a step of ``per_shard`` rows per shard runs: ``chunk_size``, or one
    chunk of the whole shard when it is smaller. A shard that is not whole chunks (the
    usual-size batches of :func:`usual_rows`, meant for one pass, in a step that
    ``clipping="auto"`` sends to per-example gradients) ends with a chunk that starts
    earlier and counts only its new rows (:func:`keras_dp.clipping.clipped_sum`):
    never a row dropped or summed twice. Measured on a CNN on 16×16×3 images (88
    rows, 2 CPU cores): chunks of 16, 3.8 ms a step; one chunk of 88, 4.6–5.4 ms."""
    return min(per_shard, chunk_size)


def chunk_size(config: DPConfig, num_shards: int, model: keras.Model) -> int:
    """``microbatch_size``, or one chosen for the platform (per device).

    On several devices ``microbatch_size`` is per device: each device computes
    that many per-example gradients at a time.

    CPU: a quarter of each device's expected batch (≤ 128). Chunks holding only
    padding are skipped, so small chunks keep the rows computed close to the real
    rows of a Poisson draw; on a 4-layer Gemma3 (batch 16, CPU) B/4 and B/8
    measured alike, B/2 and B slower. The train step runs a small model with ghost
    norms in one pass instead (:func:`keras_dp.ghost_cost.one_pass`).

    GPU/TPU: as many rows as keep one chunk's per-example gradients (float32) within
    ``_CHUNK_GRADIENT_BYTES`` (with ghost clipping, only the variables that layer
    types say will need them: often none, and then the whole batch); usually the
    device's whole physical batch, computed in one vectorised pass, padding included.
    A loop over chunks reads its condition back to the host at every iteration,
    which on an H200 cost more than computing the padding rows (Gemma3 batch 16:
    6.3 ms a step with B/4 chunks, against 2.0 ms for plain Keras).
    """
    if config.microbatch_size is not None:
        return config.microbatch_size
    per_device = math.ceil(config.batch_size / num_shards)
    if _backend.on_cpu():
        return max(1, min(128, math.ceil(per_device / 4)))
    if config.ghost_clipping:
        params = ghost.likely_per_example_size(model)  # ghost: most need none
    else:
        params = sum(math.prod(v.shape) for v in model.trainable_variables)
    return max(1, _CHUNK_GRADIENT_BYTES // (4 * max(params, 1)))


def usual_rows(model, config: DPConfig, example) -> int | None:
    """Real rows that most updates' draws fit in, B + 3·√B, when a smaller batch saves
    work: on a CPU, with ghost norms and ``microbatch_size`` unset, for a model whose
    step is one vectorised pass (:func:`keras_dp.ghost_cost.one_pass`, judged from the
    forward FLOPs of ``example``), whose padding rows are all computed. None otherwise
    (chunked steps skip padding chunks anyway), and for a model not yet built.

    :class:`keras_dp.data.DPBatches` then feeds this many rows when a draw fits (a
    Poisson draw exceeds it about once in 550–700 updates, rarer for small B) and
    the truncation bound's otherwise; that larger shape is compiled only when a draw
    first needs it. The sampler, the accounting and the sums are unchanged: padding
    rows count for nothing.
    """
    if config.user_block is not None or config.sampling != "poisson":
        return None
    if not ghost_cost.likely_one_pass(model, config, example):
        return None
    return 8 * math.ceil((config.batch_size + 3 * math.sqrt(config.batch_size)) / 8)


# Per-example gradient memory of one chunk, on accelerators, by default.
_CHUNK_GRADIENT_BYTES = 2**30
