"""Checks that run before any noise is spent: each names what is wrong and the fix.

``fit`` calls them in order (arguments, examples, model, labels) once the data is
preprocessed and before the first update; none of them changes the model.
"""

from __future__ import annotations

import functools

import jax
import keras
import numpy as np

from keras_dp import _keras, accounting, ghost, sampling, step


def _mixes_examples(layer) -> bool:
    """A layer that sets ``dp_mixes_examples``, or a trainable BatchNormalization (batch
    statistics). A frozen one (``trainable=False``, Keras' own ``call``) normalises with
    its moving statistics, one example at a time, as in Keras' transfer-learning recipe."""
    if getattr(layer, "dp_mixes_examples", False):
        return True
    if isinstance(layer, keras.layers.BatchNormalization):
        keras_call = type(layer).call is keras.layers.BatchNormalization.call
        return layer.trainable or not keras_call
    return False


def check_own_train_step(model, dp_class) -> None:
    """Refuses a DPModel subclass whose ``train_step`` never calls keras_dp's (it would
    bypass DP). An override that calls ``super().train_step(...)`` (e.g. to instrument
    it) names ``train_step`` in its code and is kept."""
    owner = next(c for c in type(model).__mro__ if "train_step" in vars(c))
    code = getattr(vars(owner)["train_step"], "__code__", None)
    if owner is not dp_class and (code is None or "train_step" not in code.co_names):
        raise ValueError(
            f"{owner.__name__} overrides train_step, which replaces keras_dp's DP step "
            "(per-example clipping and noise), so its updates would not be private. Remove "
            "the override: customise the loss with compute_loss(...) or the model's call(), "
            "which keras_dp's step runs for each example."
        )


def check_fit_args(model, config, batch_size, shuffle, validation_split, steps_per_epoch) -> None:
    """Refuses ``fit`` arguments and compilations that contradict the plan."""
    if batch_size is not None and batch_size != config.batch_size:
        raise ValueError(
            f"fit(batch_size={batch_size}) contradicts DPConfig.batch_size="
            f"{config.batch_size}; the config sets the batch: drop batch_size from fit."
        )
    if not shuffle:
        raise ValueError(
            "fit(shuffle=False) contradicts DP sampling: keras_dp samples each batch at "
            "random as the accountant assumes. Drop shuffle=False."
        )
    if validation_split and config.privacy_unit == "user":
        raise ValueError(
            "fit(validation_split=...) would split rows, not users: a user's examples "
            "could land on both sides. Split by user yourself and pass "
            "validation_data=(x_val, y_val)."
        )
    if steps_per_epoch is not None:
        raise ValueError(
            "fit(steps_per_epoch=...) contradicts the plan; set DPConfig(steps=...) "
            "or epochs= instead."
        )
    if getattr(model, "optimizer", None) is None:
        raise ValueError("Compile the model (model.compile(optimizer=..., loss=...)) first.")
    if getattr(model.optimizer, "gradient_accumulation_steps", None):
        raise ValueError(
            "An optimizer with gradient_accumulation_steps would take one update over "
            "several accounted steps. Drop gradient_accumulation_steps and set "
            "DPConfig(microbatch_size=...) to process a large batch in chunks."
        )
    per_call = getattr(model, "steps_per_execution", 1)
    if per_call != 1:
        raise ValueError(
            f"compile(steps_per_execution={per_call}) would run several updates in one "
            "call, each on a batch that keras_dp's sampler must draw and the ledger "
            "count one by one. Compile with steps_per_execution=1 (the default)."
        )


def check_model(model) -> None:
    """Refuses layers that mix examples, and models with nothing to train."""
    for layer in _keras.sublayers(model):
        if _mixes_examples(layer):
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) mixes examples within a "
                "batch, so one example's gradient depends on others and per-example "
                "clipping bounds nothing. Replace it with LayerNormalization or "
                "GroupNormalization, or freeze it (layer.trainable = False: Keras then "
                "normalises with its moving statistics, one example at a time)."
            )
    if not model.trainable_variables:
        raise ValueError(
            "The model has no trainable variables; nothing to train. Unfreeze the "
            "layers to train (layer.trainable = True), or enable LoRA on a keras-hub "
            "backbone (backbone.enable_lora(rank=4)), then compile again."
        )


def check_loss_reads_weights(model, first) -> None:
    """Refuses a model whose training loss does not read its trainable variables
    (compiled without a loss, and adding none): each update would be the noise alone,
    spending the budget on it. Traced on one example of ``first`` (``(x, y,
    sample_weight)``) only when there is no compiled loss (one reads the predictions):
    the loss may still come from ``add_loss`` or a ``compute_loss`` override."""
    if _keras.has_compiled_loss(model):
        return
    x, y, sample_weight = (
        None if a is None else keras.tree.map_structure(lambda b: np.asarray(b)[:1], a)
        for a in first
    )
    non_trainable = [v.value for v in model.non_trainable_variables]
    metrics = [v.value for v in model.metrics_variables]

    def loss(params):
        return step.model_loss(model, params, non_trainable, metrics, x, y, sample_weight)[0]

    traced = jax.make_jaxpr(loss)([v.value for v in model.trainable_variables])
    if not ghost.live_inputs(traced.jaxpr):
        raise ValueError(
            "The model's training loss does not depend on its trainable variables: it "
            "was compiled without a loss and adds none (add_loss in call, or a "
            "compute_loss override). Every DP update would be noise alone and still "
            "spend the privacy budget. Pass model.compile(optimizer=..., loss=...). "
            "Nothing was trained."
        )


def check_examples(first, labels_needed: bool) -> None:
    """Refuses examples the train step cannot use, before any noise is spent.

    ``first`` is ``(x, y, sample_weight)`` for the first rows (after any
    preprocessing): every array must hold numbers, and labels must be given when
    the compiled loss needs them.
    """
    x, y, sample_weight = first
    if x is None:
        raise ValueError("fit got no inputs: pass x (arrays, a dict of arrays, or a sequence).")
    if y is None and labels_needed:
        raise ValueError(
            "fit got no labels: the compiled loss needs y. Pass fit(x, y), or items "
            "(x, y) when x is a sequence of examples."
        )
    for name, part in (("x", x), ("y", y), ("sample_weight", sample_weight)):
        for leaf in keras.tree.flatten(part):
            if leaf is None:
                continue
            dtype = np.asarray(leaf).dtype
            if dtype.kind not in "biuf":
                raise ValueError(
                    f"fit got {name} of dtype {dtype}: without a preprocessor the model "
                    "needs numbers. Encode strings first (e.g. keras.layers.StringLookup for "
                    "labels, a tokenizer for text), or attach the keras-hub task's "
                    "preprocessor."
                )


def check_class_labels(model, source: sampling.ExampleSource, first) -> None:
    """For a sparse categorical loss, every label must be a class index the model outputs.

    Out-of-range indices would not fail: the loss silently reads 0 for them. All
    labels of in-memory data are checked (one pass over ``y``).
    """
    loss = getattr(model, "loss", None)
    name = loss if isinstance(loss, str) else type(loss).__name__
    if name not in ("sparse_categorical_crossentropy", "SparseCategoricalCrossentropy"):
        return
    y = source.labels()
    if y is None or not isinstance(y, np.ndarray):
        return
    specs = keras.tree.map_structure(
        lambda a: keras.KerasTensor(np.shape(a), dtype=np.asarray(a).dtype.name), first[0]
    )
    outputs = keras.tree.flatten(model.compute_output_spec(specs))
    if len(outputs) != 1 or outputs[0].shape[-1] is None:
        return  # several outputs: which labels go with which is the loss' business
    classes = outputs[0].shape[-1]
    ignore = getattr(loss, "ignore_class", None)
    labels = y if ignore is None else y[y != ignore]
    bad = (labels < 0) | (labels >= classes) | (labels != np.round(labels))
    if np.any(bad):
        raise ValueError(
            f"{int(np.sum(bad))} labels are not class indices in [0, {classes}) (e.g. "
            f"{labels[bad].flat[0].item()!r}); the model outputs {classes} classes. Fix the "
            "labels, or use CategoricalCrossentropy for one-hot/soft labels."
        )


@functools.lru_cache(maxsize=64)
def check_plan_within_target(config) -> float:
    """Refuses a plan whose ε over all its steps exceeds its target; returns that ε.

    Run by ``fit`` before the first update, however the plan was built (calibrated,
    a user-given σ, loaded from a file): the accountant is asked again.
    """
    _ = config.gradient_noise_multiplier  # adaptive clipping: refuses too small a count noise
    spent = config.epsilon()
    if not spent <= config.target_epsilon:
        raise ValueError(
            f"This plan spends ε={spent:.4g} over its {config.steps} updates, more than "
            f"DPConfig.target_epsilon={config.target_epsilon} (δ={config.delta:.3g}). Pass "
            "noise_multiplier=None to calibrate σ for the target, or fewer steps/epochs, "
            "or a larger target_epsilon. Nothing was trained."
        )
    return spent


def refuse_next_update(model, budget) -> None:
    """The error for a fit whose ``PrivacyBudget`` allows not one more update, with the
    ε that update would reach."""
    config = model.dp_config
    limit, delta = budget.limit(config)
    taken = model._dp_steps
    after = config.epsilon(taken + 1, delta)
    raise ValueError(
        f"PrivacyBudget allows no further update: {taken} taken, and update {taken + 1} "
        f"would spend ε={after:.4g} at δ={delta:.3g}, over its stop_at_epsilon={limit:g}. "
        "Nothing was trained; raise stop_at_epsilon to at least that ε, or stop here."
    )


def check_delta(where: str, delta, config) -> None:
    """Refuses a δ outside (0, 1/N): a δ of 1/N or more allows releasing an example."""
    n = None if config is None else config.dataset_size
    if not isinstance(delta, (int, float)) or not accounting.MIN_TARGET_DELTA <= delta < 1:
        raise ValueError(
            f"{where}: δ={delta!r} must be in [{accounting.MIN_TARGET_DELTA:g}, 1), e.g. 1e-5."
        )
    if n is not None and delta >= 1 / n:
        raise ValueError(
            f"{where}: δ={delta:.3g} is not below 1/dataset_size = {1 / n:.3g} (a δ that "
            f"large allows releasing whole examples); pass δ <= {0.1 / n:.2g}."
        )
