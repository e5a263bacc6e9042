"""What ``DPModel.fit`` does before Keras' own ``fit`` runs: check, calibrate, sample.

σ's calibration runs in a thread while XLA compiles the DP step (:class:`Calibration`).
Everything that can be refused is refused here, before any noise is spent. Keras'
``fit`` then runs on :class:`keras_dp.data.DPBatches` (batches drawn by the config's
sampler, so the accountant's assumption holds) with the ledger's callback first.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import threading

import jax
import keras
import numpy as np

from keras_dp import (
    _keras,
    bandmf,
    calibration,
    checks,
    data,
    distribute,
    ledger,
    metrics,
    noise,
    noise_state,
    sampling,
    step,
    user_data,
)
from keras_dp.callbacks import DPProgbarLogger, FitCallbacks, PrivacyBudget
from keras_dp.config import DPConfig

logger = logging.getLogger(__name__)


def fit(
    model,
    config: DPConfig,
    *,
    x,
    y,
    batch_size,
    epochs,
    verbose,
    callbacks,
    validation_split,
    validation_data,
    shuffle,
    class_weight,
    sample_weight,
    initial_epoch,
    steps_per_epoch,
    validation_steps,
    validation_batch_size,
    validation_freq,
    user_ids,
):
    """``DPModel.fit``: checks everything, then runs Keras' own ``fit`` on batches drawn
    by the config's sampler, with the ledger's callback first."""
    checks.check_fit_args(model, config, batch_size, shuffle, validation_split, steps_per_epoch)
    sampling.refuse_streams(x)
    if validation_split and validation_data is None:  # Keras' split: the last rows
        (x, y, sample_weight), validation_data = _keras.train_validation_split(
            (x, y, sample_weight), validation_split
        )
    if class_weight is not None:  # a per-example weight: the guarantee holds as it is
        sample_weight = data.class_weights_as_sample_weight(class_weight, y, sample_weight)
    source = sampling.ExampleSource(x, y, sample_weight)
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is not None:  # a keras-hub task: raw inputs, preprocessed once
        source = data.preprocess(preprocessor, source)
        if validation_data is not None:
            validation_data = data.preprocess_all(preprocessor, validation_data)
    if source.size == 0:
        raise ValueError(
            "fit got no training examples (x is empty); pass at least one example "
            "(after validation_split, if any, has held out its rows)."
        )
    users = user_data.users_of(config, user_ids, source.size)
    held_out = " after validation_split held out the last rows" if validation_split else ""
    size = user_data.unit_count(config, users, source.size)
    calibration = Calibration(model, config, size, held_out)
    config = calibration.plan  # σ, if still being calibrated, is not read until then
    model._dp_ledger.check_plan()
    first = source.gather(np.arange(min(2, source.size)))
    checks.check_examples(first, labels_needed=_keras.has_compiled_loss(model))
    _keras.symbolic_build(model, first)
    noise_state.make(model)
    if config.correlated:
        bandmf.check_strategy(np.asarray(model._dp_noise_strategy.value), config.bands)
    checks.check_model(model)
    checks.check_loss_reads_weights(model, first)
    checks.check_class_labels(model, source, first)
    if isinstance(callbacks, keras.callbacks.CallbackList):  # its callbacks, in DP fit's list
        callbacks = callbacks.callbacks
    callbacks = list(callbacks or [])
    # With BackupAndRestore, Keras resumes the epochs of the whole plan after it has
    # restored a checkpoint (and its ledger): epochs count from the plan's start.
    restartable = any(isinstance(c, keras.callbacks.BackupAndRestore) for c in callbacks)
    per_epoch, epochs_to_run = plan_epochs(model, config, epochs, initial_epoch, restartable)
    if model._dp_seed is None:
        seed = config.seed if config.seed is not None else secrets.randbits(63)
        model._dp_seed = distribute.shared_seed(seed)
    model._dp_ledger.start_run()
    if config.correlated and model._dp_ledger.partition_seed is None:
        if model._dp_ledger.steps:
            raise ValueError(
                f"These weights took {model._dp_ledger.steps} updates of a BandMF plan, "
                "but the run's secret state (its partition of the examples and its "
                "noise history) did not come with them: continuing would not be the "
                "analysed mechanism. Resume from a checkpoint that keras_dp wrote "
                "during this run (model.save, save_weights, BackupAndRestore), or "
                "start from new weights. Nothing was trained."
            )
        partition = config.seed if config.seed is not None else secrets.randbits(63)
        model._dp_ledger.partition_seed = distribute.shared_seed(partition)
    if config.seed is not None:
        model._dp_ledger.public_seed = True
        logger.warning(
            "DPConfig(seed=%d) is fixed: anyone who knows it can regenerate the noise, "
            "so this run is NOT differentially private (for tests only). Pass "
            "seed=None for a secret seed.",
            config.seed,
        )
    source = user_data.unit_source(config, source, users, model._dp_seed)
    distribute.check_processes_agree(
        source.size,
        lambda: source.gather(
            data.draw_indices(
                config, model._dp_seed, model._dp_ledger.steps, model._dp_ledger.partition_seed
            )
        ),
    )
    shards, _ = distribute.batch_shards()
    chunk = step.chunk_size(config, shards, model)
    usual = None
    if not isinstance(source, user_data.UserSource) and source.size:
        example = source.gather(np.arange(1))[0]
        usual = step.usual_rows(model, config, example)
    batches = data.DPBatches(model, source, config, chunk, per_epoch, usual)
    metrics.add_counters(model)
    budgets = [c for c in callbacks if isinstance(c, PrivacyBudget)]
    budget = budgets[0] if budgets else None
    config = calibration.result(model, batches, _budgets_ahead(model, budgets, per_epoch))
    checks.check_plan_within_target(config)
    stop_at = model._dp_steps + batches.steps_this_fit(epochs_to_run)
    if restartable:
        stop_at = config.steps
    for callback in callbacks:
        if isinstance(callback, PrivacyBudget):
            if callback.delta is not None:
                checks.check_delta("PrivacyBudget(delta=...)", callback.delta, config)
            callback._max_steps = callback.max_steps(model)
            if callback._max_steps <= model._dp_steps:
                checks.refuse_next_update(model, callback)
            stop_at = min(stop_at, callback._max_steps)
    if stop_at <= model._dp_steps:  # the plan's end is refused earlier, with its reason
        raise ValueError(
            f"fit has no update left to run: {model._dp_steps} taken, and this fit stops "
            f"at {stop_at}. Nothing was trained."
        )
    model._dp_noise_input = jax.device_put(noise.multiplier_input(config.gradient_noise_multiplier))
    counting = ledger.PerStepLedgerCallback if budget and budget.per_step else ledger.LedgerCallback
    callbacks = [counting(stop_at, per_epoch, batches, budget), *callbacks]
    if verbose != 0 and not any(isinstance(c, keras.callbacks.ProgbarLogger) for c in callbacks):
        callbacks.append(DPProgbarLogger())
    # The list Keras' fit would make, except that a step's logs are read only by the
    # callbacks that read them (FitCallbacks: none at verbose=0).
    callbacks = FitCallbacks(
        callbacks,
        add_history=True,
        add_progbar=verbose != 0,
        verbose=verbose,
        epochs=initial_epoch + epochs_to_run,
        steps=batches.num_batches,
        model=model,
    )
    return keras.Model.fit(
        model,
        data.adapter(batches),
        epochs=initial_epoch + epochs_to_run,
        initial_epoch=initial_epoch,
        verbose=verbose,
        callbacks=callbacks,
        validation_data=validation_data,
        validation_steps=validation_steps,
        validation_batch_size=validation_batch_size,
        validation_freq=validation_freq,
    )


class Calibration:
    """The plan calibrated for ``size`` units (σ from the target ε), the search run in a
    thread while XLA compiles the DP step.

    dp_accounting's search (0.5 s for the README's MLP, 0.8 s for Gemma3 LoRA) and
    XLA's compile of the step (which releases the GIL) then overlap: fit's step takes
    σ as an input (:func:`keras_dp.step.with_noise`), so its program does not depend
    on it. The search starts once the step is traced and lowered: both are Python, and
    a search beside them only took turns with them for the GIL (first fits, alternated
    versions: the text classifier's 2.07–2.08× plain Keras' → 1.93–1.96×). Where fit
    does not compile ahead (a ``keras.distribution``, a step run eagerly), it starts at
    once, beside fit's checks. Where σ is known (given, or calibrated for this plan
    before in this process), or the search fails at once on the plan's fields, nothing
    runs in a thread. Until :meth:`result` returns, the model's plan is ``plan``: the
    config for ``size`` units without σ. Nothing is trained before it returns and fit
    has checked the calibrated plan (:func:`keras_dp.checks.check_plan_within_target`);
    a search that fails raises there, before any noise is spent.
    """

    def __init__(self, model, config: DPConfig, size: int, held_out: str = ""):
        _check_size(model, config, size, held_out)
        sized = config if config.dataset_size == size else config._replace(dataset_size=size)
        self._thread, self._calibrated, self._error, self._then = None, None, None, None
        if sized.noise_multiplier is not None or _remembered(sized):
            self.plan = calibrate(model, config, size, held_out)
            return
        self.plan = sized
        model._dp_set_plan(sized)
        self._thread = threading.Thread(
            target=self._search, args=(sized,), name="keras_dp-calibration", daemon=True
        )
        if not _compiles_ahead(model):
            self._thread.start()

    def _search(self, config: DPConfig) -> None:
        try:
            self._calibrated = config.calibrate()
        except BaseException as err:  # raised in fit's thread, by result()
            self._error = err
            return
        if self._then is not None:
            try:
                self._then(self._calibrated)
            except Exception:  # only a warm-up: the callback's own call raises in fit
                logger.debug("The budgets' ε was not computed ahead", exc_info=True)

    def result(self, model, batches: data.DPBatches, then=None) -> DPConfig:
        """The calibrated plan, once the search is done; the model keeps it. Fit's train
        function is first traced and lowered for ``batches``' usual shape, then the search
        starts and runs while XLA compiles it (without a ``keras.distribution``: with
        one, Keras shards the batch itself, and the search started with fit's checks).
        ``then(calibrated)``, if given, runs in the search's thread after it (its errors
        are ignored): :func:`_budgets_ahead`."""
        if self._thread is None:
            return self.plan
        self._then = then
        if _compiles_ahead(model):
            model.make_train_function()
            with step.paused_gc():
                _keras.compile_ahead(
                    model,
                    model._dp_jitted_step,
                    batches.padding_batch(),
                    jax.device_put(noise.multiplier_input(1.0)),
                    lowered=self._thread.start,
                )
        self._thread.join()
        if self._error is not None:
            raise self._error
        calibrated = self._calibrated
        logger.info(
            "Calibrated noise_multiplier=%.4f for %s", calibrated.noise_multiplier, calibrated
        )
        _set_calibrated(model, calibrated)
        return calibrated


def _budgets_ahead(model, budgets: list, per_epoch: int):
    """What the :class:`PrivacyBudget` callbacks will ask, to be computed beside the
    compile (:meth:`Calibration.result`), or None without one: each budget's last
    update (:meth:`PrivacyBudget.max_steps`), then ε at the first epoch's end (or at
    the update a budget stops it) at the first budget's δ. accounting.epsilon keeps
    the values, so the callbacks' own calls find them.

    Without this, the MLP's first epoch ended with 0.25-0.3 s of accounting (the
    step's PLD on the finer grid that the first epoch's smaller ε needs), and a budget
    below the target (``stop_at_epsilon=4`` on its ε = 8 plan) searched its last
    update for 1.2 s before the first step, after the compile, where nothing else
    runs."""
    if not budgets:
        return None
    steps = model._dp_steps + per_epoch

    def ahead(config: DPConfig) -> None:
        last = min(config.max_steps_within(*budget.limit(config)) for budget in budgets)
        config.epsilon(min(steps, last), budgets[0].delta)  # last <= the plan's steps

    return ahead


def _compiles_ahead(model) -> bool:
    """Whether fit compiles its jitted step before Keras' loop (:meth:`Calibration.result`):
    not under a ``keras.distribution`` (Keras shards the batch itself), nor where Keras'
    own train function is kept."""
    return keras.distribution.distribution() is None and _keras.jits_its_step(model)


def _set_calibrated(model, config: DPConfig) -> None:
    """The model's plan becomes ``config``, its current one with σ calibrated. Its train
    function is kept (the step takes σ as an input); any other change makes a new one."""
    current = model._dp_config
    names = [f.name for f in dataclasses.fields(DPConfig) if f.compare]
    if current is None or any(
        getattr(config, n) != getattr(current, n) for n in names if n != "noise_multiplier"
    ):
        model._dp_set_plan(config)
    else:
        model._dp_config = config


def _remembered(config: DPConfig) -> bool:
    """Whether σ is known for ``config``'s plan in this process, or its fields are
    refused before any search (the search then runs where fit can raise at once)."""
    try:
        config._require("calibrate")
        return calibration.remembered(config._plan_key()) is not None
    except ValueError:
        return True


def _check_size(model, config: DPConfig, size: int, held_out: str) -> None:
    """Refuses data of another size than the plan's."""
    if config.dataset_size is not None and config.dataset_size != size:
        if config._calibrated_for is not None and model._dp_steps:
            raise ValueError(
                f"fit got {size} examples, but this model's plan was calibrated for the "
                f"{config.dataset_size} examples of its earlier fit, and its guarantee is "
                "for that dataset. Pass the same training set to every fit (the sampler "
                "draws the batches), or train a new model with a new DPConfig."
            )
        raise ValueError(
            f"fit got {size} examples{held_out} but DPConfig.dataset_size="
            f"{config.dataset_size}; pass the data the plan was made for, or "
            "dataset_size=None."
        )


def calibrate(model, config: DPConfig, size: int, held_out: str = "") -> DPConfig:
    """The plan calibrated for ``size`` units (σ from the target ε); the model keeps it.
    ``held_out`` says, in the errors, why ``size`` is smaller than the data passed."""
    _check_size(model, config, size, held_out)
    calibrated = config.calibrate(size)  # a given σ is checked against the target
    if calibrated is not config:
        if config.noise_multiplier is None:
            logger.info(
                "Calibrated noise_multiplier=%.4f for %s",
                calibrated.noise_multiplier,
                calibrated,
            )
        model._dp_set_plan(calibrated)
    return calibrated


def plan_epochs(
    model, config: DPConfig, epochs, initial_epoch: int, restartable: bool = False
) -> tuple[int, int]:
    """(updates per epoch, epochs this fit runs), checked against what is left of the plan."""
    planned_epochs = config.epochs or config.steps * config.batch_size / config.dataset_size
    per_epoch = math.ceil(config.steps / max(1, math.ceil(planned_epochs)))
    remaining = config.steps - model._dp_steps
    if restartable:  # the ledger is known once the backup is restored
        remaining = config.steps - min(model._dp_steps, initial_epoch * per_epoch)
    if remaining <= 0:
        raise ValueError(
            f"The privacy budget of this plan is spent: {model._dp_steps} of "
            f"{config.steps} updates taken (ε={model.privacy_spent().epsilon:.4g}). "
            "Training more would exceed target_epsilon; make a new plan on a new model."
        )
    epochs_left = math.ceil(remaining / per_epoch)
    to_run = epochs_left if epochs is None else epochs - initial_epoch
    if to_run < 1:
        raise ValueError(
            f"fit(epochs={epochs}, initial_epoch={initial_epoch}) runs no epoch; pass "
            "epochs > initial_epoch (epochs is the index of the last epoch, as in Keras), "
            "or leave epochs out to train what is left of the plan."
        )
    if to_run > epochs_left:
        raise ValueError(
            f"fit would run {to_run} epochs but only {epochs_left} are left of the plan "
            f"({remaining} of {config.steps} updates); pass "
            f"epochs<={initial_epoch + epochs_left} or plan more epochs in a new DPConfig "
            "(and a new model)."
        )
    return per_epoch, to_run
