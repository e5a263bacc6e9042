"""The DPModel mixin: DP-SGD in the JAX trainer's train_step, and make_private.

Formal guarantee: one call of ``train_step`` is one optimizer update and one
accounted step. Each real example's gradient over the *trainable* variables is
clipped to L2 norm C; the clipped gradients are summed, N(0, (σ·C)²) noise is
added once to the sum, and the result is divided by the expected batch size B.
With ``noise="bandmf"`` the noise of update t is σC·(C⁻¹z)_t instead, correlated over
the last b updates (:mod:`keras_dp.bandmf`; its state is a non-trainable variable).
With the sampler in ``fit`` running as the config says, the whole run is
(ε, δ)-DP for the config's neighbouring relation (see :mod:`keras_dp.accounting`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_dp import (
    _keras,
    adaptive,
    bandmf,
    checks,
    clipping,
    data,
    distribute,
    ghost,
    ledger,
    metrics,
    noise,
    noise_state,
    sampling,
    saving,
    units,
)
from keras_dp.callbacks import DPProgbarLogger, PrivacyBudget
from keras_dp.config import DPConfig

logger = logging.getLogger(__name__)

_GOLDEN = np.uint32(0x9E3779B1)
ADAPTIVE_CLIP_NORM = "dp_adaptive_clip_norm"


@dataclasses.dataclass(frozen=True)
class PrivacySpent:
    """What a model's training has spent so far: ε at δ after ``steps`` updates.

    Attributes:
      epsilon: ε of ``steps`` updates of the plan, at ``delta``.
      delta: The δ of the guarantee.
      steps: Accounted updates: those in the weights' lineage, plus any computed
        after them in this process and thrown away (see :mod:`keras_dp.ledger`).
      private: False when the noise came from a user-fixed ``DPConfig.seed``: the
        noise can then be regenerated and removed, so ``epsilon`` holds only for
        someone who does not know the seed, i.e. the weights are NOT private.
    """

    epsilon: float
    delta: float | None
    steps: int
    private: bool = True


class DPModel:
    """Mixin that trains a Keras model with DP-SGD (JAX backend).

    Use ``class MyModel(keras_dp.DPModel, keras.Model)`` with ``dp_config=`` given
    at construction (or ``model.set_dp_config(config)``), or
    :func:`make_private` on an existing model. ``fit`` samples the data itself as
    the config says; ``predict``, ``evaluate`` and ``generate`` are unchanged.
    """

    def __init__(self, *args, dp_config: DPConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._dp_init(dp_config)

    def _dp_init(self, config: DPConfig | None) -> None:
        self._dp_config = None
        self._dp_ledger = ledger.Ledger(self)
        self._dp_seed = None
        if config is not None:
            self.set_dp_config(config)

    # Public API -------------------------------------------------------------------

    @property
    def dp_config(self) -> DPConfig | None:
        """The DP plan (calibrated once ``fit`` has seen the data)."""
        return self._dp_config

    def set_dp_config(self, config: DPConfig, prior_updates: int = 0) -> None:
        """Sets the plan. Refused once training has spent part of another plan.

        Args:
          config: The plan.
          prior_updates: DP updates of this same plan that the current weights
            already took where this model's ledger could not see them (weights set
            with ``set_weights``, loaded by a plain Keras model, or cloned). They are
            counted as spent. Loading a keras_dp checkpoint *after* ``make_private``
            restores the count by itself.
        """
        if not isinstance(config, DPConfig):
            raise TypeError(f"dp_config must be a keras_dp.DPConfig; got {type(config).__name__}.")
        if not isinstance(prior_updates, int) or prior_updates < 0:
            raise ValueError(
                f"prior_updates={prior_updates!r} is invalid: pass the number (>= 0) of DP "
                "updates of this plan that the weights already took."
            )
        if self._dp_steps and not self._dp_same_plan(config):
            raise ValueError(
                f"This model already took {self._dp_steps} DP steps under another plan "
                f"({self._dp_config}); a new plan would hide that spend. Resume with the "
                "same config (clip norm, batch, epochs/steps, dataset size, σ, δ), or "
                "start from a new model."
            )
        self._dp_set_plan(config)
        self._dp_ledger.conflict = None
        self._dp_ledger.declare(prior_updates)

    def _dp_set_plan(self, config: DPConfig | None) -> None:
        self._dp_config = config
        self.train_function = None  # the traced step reads the config
        if config is not None and config.clip_quantile is not None:
            if getattr(self, "_dp_clip_norm", None) is None:  # adaptive C: saved with weights
                variable = keras.Variable(
                    float(config.l2_clip_norm), trainable=False, name=ADAPTIVE_CLIP_NORM
                )
                _keras.track_after_build(self, "_dp_clip_norm", variable)

    def erase_dp_secrets(self) -> None:
        """Erases the secret state of a correlated-noise run (``noise="bandmf"``): the
        last b − 1 noise vectors and the partition's seed, kept with the weights so
        that a checkpoint resumes the analysed mechanism.

        Done by itself when the plan completes. Call it before releasing weights of a
        run you stop early (EarlyStopping, a PrivacyBudget); the run cannot be
        continued afterwards. Nothing to do for DP-SGD (its seed is never saved).
        """
        noise_state.erase(self)

    def load_own_variables(self, store):
        noise_state.make(self)  # a checkpoint of a BandMF run holds its noise state
        super().load_own_variables(store)

    def _dp_clip_slot(self) -> int | None:
        """Where the adaptive clip norm sits among the non-trainable variables."""
        variable = getattr(self, "_dp_clip_norm", None)
        if variable is None or self._dp_config.clip_quantile is None:
            return None
        return next(i for i, v in enumerate(self.non_trainable_variables) if v is variable)

    def _dp_same_plan(self, config: DPConfig) -> bool:
        old = self._dp_config
        return old is not None and saving.plans_agree(config, old)

    def _dp_new_seed(self) -> None:
        """Draws a new secret seed (unless the user fixed one) when weights go back.

        Called whenever weights are loaded: continuing from an earlier update with the
        same seed would redraw the same samples and noise, and two released models
        that share their noise reveal their difference without it.
        """
        config = self._dp_config
        if self._dp_seed is not None and (config is None or config.seed is None):
            self._dp_seed = distribute.shared_seed(secrets.randbits(63))

    # Saving: the plan and the ledger travel in the config; the noise key never does
    # (BandMF's noise history and partition seed do, until the plan completes).

    def get_config(self):
        config = super().get_config()
        ledger_ = self._dp_ledger
        config["dp_state"] = {
            "config": saving.config_to_dict(self._dp_config),
            "steps": ledger_.steps,
            "spent": ledger_.spent,
            "public_seed": ledger_.public_seed,
        }
        if type(self) in _DP_CLASSES.values():  # made by make_private
            config["dp_base_class"] = saving.base_reference(type(self).__bases__[1])
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        state = config.pop("dp_state", None) or {}
        reference = config.pop("dp_base_class", None)
        if reference is not None:
            base = saving.resolve_base(reference, custom_objects)
            model = saving.base_from_config(base, config, custom_objects)
            model.__class__ = _dp_class(type(model))
            model._dp_init(None)
        else:
            model = super().from_config(config)
        model._dp_set_plan(saving.config_from_dict(state.get("config")))
        model._dp_ledger.steps = int(state.get("steps", 0))
        model._dp_ledger.spent = int(state.get("spent", model._dp_ledger.steps))
        model._dp_ledger.public_seed = bool(state.get("public_seed", False))
        return model

    def load_weights(self, filepath, *args, **kwargs):
        """Keras' ``load_weights``; also restores the ledger those weights were trained with.

        The optimizer is built first (when compiled), so its state (e.g. Adam's moments)
        is restored too and a resumed run continues exactly where the checkpoint stopped.
        """
        if self.built and self.optimizer is not None and not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)
        return super().load_weights(filepath, *args, **kwargs)

    @property
    def _dp_steps(self) -> int:
        return self._dp_ledger.spent

    @property
    def dp_steps(self) -> int:
        """Accounted optimizer updates: those the weights took, and any computed after
        them in this process and thrown away (a rolled-back or unchosen checkpoint)."""
        return self._dp_steps

    def privacy_spent(self, delta: float | None = None) -> PrivacySpent:
        """ε spent by all ``fit`` calls so far (0 before any training).

        ``private`` is False when a user-fixed seed made the noise known.
        """
        config = self._dp_config
        if delta is not None:
            checks.check_delta("privacy_spent(delta=...)", delta, config)
        delta = delta if delta is not None else (config.delta if config else None)
        private = not self._dp_ledger.public_seed
        if not self._dp_steps:
            return PrivacySpent(0.0, delta, 0, private)
        return PrivacySpent(config.epsilon(self._dp_steps, delta), delta, self._dp_steps, private)

    def train_on_batch(self, *args, **kwargs):
        raise ValueError(
            "train_on_batch is not available on a DP model: an update on a batch that "
            "keras_dp's sampler did not draw is not covered by the accountant. Use "
            "model.fit(x, y) (the config sets the batch and the number of updates)."
        )

    # fit ------------------------------------------------------------------------

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=None,
        verbose="auto",
        callbacks=None,
        validation_split=0.0,
        validation_data=None,
        shuffle=True,
        class_weight=None,
        sample_weight=None,
        initial_epoch=0,
        steps_per_epoch=None,
        validation_steps=None,
        validation_batch_size=None,
        validation_freq=1,
        user_ids=None,
    ):
        """Trains with DP-SGD; the config is the plan (see :class:`DPConfig`).

        ``user_ids`` (one hashable id per example, for ``DPConfig(privacy_unit="user")``
        only) says which user owns each example.

        ``fit()`` without ``epochs`` trains what is left of the plan; ``fit(epochs=k)``
        trains k more epochs (Keras semantics with ``initial_epoch``). An epoch is
        ``ceil(steps / ceil(epochs))`` updates of the plan; the final epoch stops at
        exactly the planned number of updates. Everything is checked before any
        noise is spent.
        """
        config = self._dp_config
        if config is None:
            raise ValueError(
                "This DPModel has no DP plan: pass dp_config= or call "
                "model.set_dp_config(keras_dp.DPConfig(...)) before fit."
            )
        checks.check_own_train_step(self, DPModel)
        checks.check_fit_args(self, config, batch_size, shuffle, validation_split, steps_per_epoch)
        sampling.refuse_streams(x)
        if class_weight is not None:  # a per-example weight: the guarantee holds as it is
            sample_weight = data.class_weights_as_sample_weight(class_weight, y, sample_weight)
        source = sampling.ExampleSource(x, y, sample_weight)
        preprocessor = getattr(self, "preprocessor", None)
        if preprocessor is not None:  # a keras-hub task: raw inputs, preprocessed once
            source = data.preprocess(preprocessor, source)
            if validation_data is not None:
                validation_data = data.preprocess_all(preprocessor, validation_data)
        if source.size == 0:
            raise ValueError("fit got no training examples (x is empty).")
        users = data.users_of(config, user_ids, source.size)
        config = self._dp_calibrate(config, data.unit_count(config, users, source.size))
        checks.check_plan_within_target(config)
        self._dp_ledger.check_plan()
        first = source.gather(np.arange(min(2, source.size)))
        checks.check_examples(first, labels_needed=_keras.has_compiled_loss(self))
        _keras.symbolic_build(self, first)
        noise_state.make(self)
        if config.correlated:
            bandmf.check_strategy(np.asarray(self._dp_noise_strategy.value), config.bands)
        checks.check_model(self)
        checks.check_class_labels(self, source, first)
        callbacks = list(callbacks or [])
        # With BackupAndRestore, Keras resumes the epochs of the whole plan after it has
        # restored a checkpoint (and its ledger): epochs count from the plan's start.
        restartable = any(isinstance(c, keras.callbacks.BackupAndRestore) for c in callbacks)
        per_epoch, epochs_to_run = self._dp_epochs(config, epochs, initial_epoch, restartable)
        if self._dp_seed is None:
            seed = config.seed if config.seed is not None else secrets.randbits(63)
            self._dp_seed = distribute.shared_seed(seed)
        self._dp_ledger.start_run()
        if config.correlated and self._dp_ledger.partition_seed is None:
            if self._dp_ledger.steps:
                raise ValueError(
                    f"These weights took {self._dp_ledger.steps} updates of a BandMF plan, "
                    "but the run's secret state (its partition of the examples and its "
                    "noise history) did not come with them: continuing would not be the "
                    "analysed mechanism. Resume from a checkpoint that keras_dp wrote "
                    "during this run (model.save, save_weights, BackupAndRestore), or "
                    "start from new weights. Nothing was trained."
                )
            partition = config.seed if config.seed is not None else secrets.randbits(63)
            self._dp_ledger.partition_seed = distribute.shared_seed(partition)
        if config.seed is not None:
            self._dp_ledger.public_seed = True
            logger.warning(
                "DPConfig(seed=%d) is fixed: anyone who knows it can regenerate the noise, "
                "so this run is NOT differentially private (for tests only). Pass "
                "seed=None for a secret seed.",
                config.seed,
            )
        source = data.unit_source(config, source, users, self._dp_seed)
        distribute.check_processes_agree(
            source.size,
            lambda: source.gather(
                data.draw_indices(
                    config, self._dp_seed, self._dp_ledger.steps, self._dp_ledger.partition_seed
                )
            ),
        )
        shards, _ = distribute.batch_shards()
        chunk = _chunk_size(config, shards, self)
        batches = data.DPBatches(self, source, config, chunk, per_epoch)
        stop_at = self._dp_steps + batches.steps_this_fit(epochs_to_run)
        if restartable:
            stop_at = config.steps
        for callback in callbacks:
            if isinstance(callback, PrivacyBudget):
                if callback.delta is not None:
                    checks.check_delta("PrivacyBudget(delta=...)", callback.delta, config)
                callback._max_steps = callback.max_steps(self)
                stop_at = min(stop_at, callback._max_steps)
        if stop_at <= self._dp_steps:
            raise ValueError(
                f"PrivacyBudget allows no further update: {self._dp_steps} taken, ε would "
                "exceed its stop_at_epsilon. Nothing was trained; raise stop_at_epsilon or "
                "stop here."
            )
        metrics.add_counters(self)
        budget = next((c for c in callbacks if isinstance(c, PrivacyBudget)), None)
        counting = (
            ledger.PerStepLedgerCallback if budget and budget.per_step else ledger.LedgerCallback
        )
        callbacks = [counting(stop_at, per_epoch, batches, budget), *callbacks]
        if verbose != 0 and not any(
            isinstance(c, keras.callbacks.ProgbarLogger) for c in callbacks
        ):
            callbacks.append(DPProgbarLogger())
        return keras.Model.fit(
            self,
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

    def _dp_calibrate(self, config: DPConfig, size: int) -> DPConfig:
        if config.dataset_size is not None and config.dataset_size != size:
            if config._calibrated_for is not None and self._dp_steps:
                raise ValueError(
                    f"fit got {size} examples, but this model's plan was calibrated for the "
                    f"{config.dataset_size} examples of its earlier fit, and its guarantee is "
                    "for that dataset. Pass the same training set to every fit (the sampler "
                    "draws the batches), or train a new model with a new DPConfig."
                )
            raise ValueError(
                f"fit got {size} examples but DPConfig.dataset_size={config.dataset_size}; "
                "pass the data the plan was made for, or dataset_size=None."
            )
        calibrated = config.calibrate(size)  # a given σ is checked against the target
        if calibrated is not config:
            if config.noise_multiplier is None:
                logger.info(
                    "Calibrated noise_multiplier=%.4f for %s",
                    calibrated.noise_multiplier,
                    calibrated,
                )
            self._dp_set_plan(calibrated)
        return calibrated

    def _dp_epochs(
        self, config: DPConfig, epochs, initial_epoch: int, restartable: bool = False
    ) -> tuple[int, int]:
        planned_epochs = config.epochs or config.steps * config.batch_size / config.dataset_size
        per_epoch = math.ceil(config.steps / max(1, math.ceil(planned_epochs)))
        remaining = config.steps - self._dp_steps
        if restartable:  # the ledger is known once the backup is restored
            remaining = config.steps - min(self._dp_steps, initial_epoch * per_epoch)
        if remaining <= 0:
            raise ValueError(
                f"The privacy budget of this plan is spent: {self._dp_steps} of "
                f"{config.steps} updates taken (ε={self.privacy_spent().epsilon:.4g}). "
                "Training more would exceed target_epsilon; make a new plan on a new model."
            )
        epochs_left = math.ceil(remaining / per_epoch)
        to_run = epochs_left if epochs is None else epochs - initial_epoch
        if to_run < 1:
            raise ValueError(f"fit(epochs={epochs}, initial_epoch={initial_epoch}) runs no epoch.")
        if to_run > epochs_left:
            raise ValueError(
                f"fit would run {to_run} epochs but only {epochs_left} are left of the plan "
                f"({remaining} of {config.steps} updates); pass "
                f"epochs<={initial_epoch + epochs_left} or plan more epochs in a new DPConfig "
                "(and a new model)."
            )
        return per_epoch, to_run

    # The train step ---------------------------------------------------------------

    def train_step(self, state, data):
        config = self._dp_config
        trainable, non_trainable, optimizer_vars, metrics_vars = state
        packed, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x, mask = packed["dp_x"], packed["dp_mask"]
        seed_slots = [
            i for i, v in enumerate(self.non_trainable_variables) if ledger.SEED_STATE in v.path
        ]

        compiled = _keras.compiled_metrics(self)
        has_metrics = _keras.user_metrics_compiled(self)
        # Built metrics are updated chunk by chunk inside the loop, so no row's prediction
        # is kept for the whole batch and memory follows the chunk. (Unbuilt ones, which
        # fit's symbolic build normally prevents, see the whole batch once.)
        fold_metrics = has_metrics and compiled.built
        keep_predictions = has_metrics and not compiled.built

        def per_example(params, xi, yi, swi, index):
            xi, yi, swi = jax.tree.map(lambda a: a[None], (xi, yi, swi))
            nt = list(non_trainable)
            for i in seed_slots:  # each example its own dropout randomness
                offset = jnp.asarray([(index + 1) * _GOLDEN, 0]).astype(nt[i].dtype)
                nt[i] = nt[i] + offset
            loss, (y_pred, _) = self._dp_loss(params, nt, metrics_vars, xi, yi, swi)
            y_pred = jax.tree.map(lambda a: a[0], y_pred)
            kept = y_pred if keep_predictions else None
            return loss, ((kept, y_pred) if fold_metrics else kept)

        def fold(values, chunk_rows, chunk_pred, chunk_mask):
            chunk_y, chunk_sw, chunk_pred, real = units.for_metrics(
                chunk_rows, chunk_pred, chunk_mask
            )
            return metrics.update_compiled(self, values, chunk_y, chunk_pred, real, chunk_sw)

        # A row is one privacy unit: an example, or a user's block (packed "dp_inner").
        rows = (x, y, sample_weight) + ((packed["dp_inner"],) if "dp_inner" in packed else ())
        clip_slot = self._dp_clip_slot()
        clip_norm = config.l2_clip_norm if clip_slot is None else non_trainable[clip_slot]
        shards, shard_axis = distribute.batch_shards()
        per_shard = mask.shape[0] // shards
        unit = units.unit_fn(per_example, config.user_block)
        example_fn, ghost_spec, plan = ghost.clipping(self, config, unit, trainable, rows)
        chunk_size = _chunk_size(config, shards, self)
        if ghost.one_pass(plan, config, per_shard):
            chunk_size = per_shard
        chunk = step_chunk(per_shard, chunk_size)
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
        # The secret seed is an input (never a constant of the compiled program); the
        # ledger's count of this update keys its noise: unique along the weights'
        # history, and a new seed is drawn whenever loaded weights go back.
        key = noise.step_key(noise.root_key(packed["dp_seed"][0]), packed["dp_step"][0])
        if clip_slot is not None:  # adaptive clipping: the count's noise, its own stream
            key, count_key = jax.random.split(key)
        noise_slots = noise_state.slots(self)
        if noise_slots is None:
            grads = noise.privatize(
                grad_sum, key, config.gradient_noise_multiplier, clip_norm, config.batch_size
            )
        else:  # correlated noise (BandMF): the noise history is part of the state
            strategy_slot, history_slots = noise_slots
            grads, history = noise.privatize_correlated(
                grad_sum,
                key,
                config.noise_multiplier,
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
        scale = _loss_scale(self.optimizer, optimizer_vars)
        grads = [(g * scale).astype(v.dtype) for g, v in zip(grads, trainable)]
        trainable, optimizer_vars = self.optimizer.stateless_apply(optimizer_vars, grads, trainable)

        non_trainable = self._dp_next_state(
            state[0], non_trainable, seed_slots, metrics_vars, units.first_example(rows)
        )
        num_real = jnp.sum(mask)
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
        loss = jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(num_real, 1)
        y, sample_weight, y_pred, real = units.for_metrics(rows, y_pred, mask)
        logs, metrics_vars = metrics.update(
            self, metrics_vars, loss, num_real, y, y_pred, real, sample_weight, nonfinite, clipped
        )
        return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)

    def test_step(self, state, data):
        """Keras' own evaluation; the DP training counters are not part of its logs."""
        logs, state = super().test_step(state, data)
        return {k: v for k, v in logs.items() if k not in metrics.DP_COUNTERS}, state

    def _dp_next_state(self, params, non_trainable, seed_slots, metrics_vars, rows):
        """The non-trainable state after the step: every seed state advanced as one
        forward pass advances it, whatever the batch holds (an empty Poisson draw
        included), so the saved state reveals nothing of the draws.

        The advance comes from one more forward pass on row 0 whose only used outputs
        are the seed states; they do not depend on the data, so XLA keeps nothing else
        of it. Other non-trainable state that a layer assigns in ``call`` would need
        one value per example; it is not kept, and a warning names it.
        """
        _, (_, after) = self._dp_loss(params, list(non_trainable), metrics_vars, *rows)
        variables = self.non_trainable_variables
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

    def _dp_loss(self, params, non_trainable, metrics_vars, x, y, sample_weight):
        kwargs = {"training": True} if _keras.call_has_training_arg(self) else {}
        y_pred, non_trainable, losses = self.stateless_call(
            params, non_trainable, x, return_losses=True, **kwargs
        )
        with _keras.losses_override(self, losses):
            loss, _ = self.stateless_compute_loss(
                params,
                non_trainable,
                metrics_vars,
                x=x,
                y=y,
                y_pred=y_pred,
                sample_weight=sample_weight,
                training=True,
            )
        return loss, (y_pred, non_trainable)


def _loss_scale(optimizer, optimizer_vars) -> jax.Array:
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
    chunk of the whole shard when it is smaller. :class:`keras_dp.data.DPBatches`
    sizes every batch so that this divides ``per_shard``."""
    chunk = min(per_shard, chunk_size)
    if per_shard % chunk:
        raise ValueError(
            f"Internal: a shard of {per_shard} rows is not a whole number of chunks of "
            f"{chunk}; rows would be dropped. Please report this."
        )
    return chunk


def _chunk_size(config: DPConfig, num_shards: int, model: keras.Model) -> int:
    """``microbatch_size``, or one chosen for the platform (per device).

    On several devices ``microbatch_size`` is per device: each device computes
    that many per-example gradients at a time.

    CPU: a quarter of each device's expected batch (≤ 128). Chunks holding only
    padding are skipped, so small chunks keep the rows computed close to the real
    rows of a Poisson draw; on a 4-layer Gemma3 (batch 16, CPU) B/4 and B/8
    measured alike, B/2 and B slower. The train step runs a small model with ghost
    norms in one pass instead (:func:`keras_dp.ghost.one_pass`).

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
    if jax.default_backend() == "cpu":
        return max(1, min(128, math.ceil(per_device / 4)))
    if config.ghost_clipping:
        params = ghost.likely_per_example_size(model)  # ghost: most need none
    else:
        params = sum(math.prod(v.shape) for v in model.trainable_variables)
    return max(1, _CHUNK_GRADIENT_BYTES // (4 * max(params, 1)))


# Per-example gradient memory of one chunk, on accelerators, by default.
_CHUNK_GRADIENT_BYTES = 2**30


_DP_CLASSES: dict[type, type] = {}


def make_private(model: keras.Model, config: DPConfig, prior_updates: int = 0) -> keras.Model:
    """Gives ``model`` (any Keras or keras-hub model) DP training, in place.

    The instance's class becomes a subclass ``DP<Class>(DPModel, Class)``; no
    method is patched. ``isinstance(model, keras_dp.DPModel)`` holds afterwards
    and everything but ``fit``/``train_step`` behaves as before.

    The privacy ledger lives in the DP model and travels with its checkpoints. To
    continue DP-trained weights, call ``make_private`` first and *then* load them
    (``model.load_weights(path)``, or ``keras.models.load_model`` of a ``.keras``
    file): the ledger comes back with them. Weights that reach the model any other
    way (a plain model loaded them before ``make_private``, ``set_weights``,
    ``clone_model``) cannot be recognised: declare their updates with
    ``prior_updates``, or ε is under-reported.

    Args:
      model: A Keras 3 model (Sequential, functional, subclassed, keras-hub task).
      config: The DP plan.
      prior_updates: DP updates of this same plan that the model's current weights
        already took; they are counted as spent.

    Returns:
      The same object, now a DPModel.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"make_private needs a keras.Model; got {type(model).__name__}.")
    if isinstance(model, DPModel):
        model.set_dp_config(config, prior_updates)
        return model
    model.__class__ = _dp_class(type(model))
    model._dp_init(None)
    model.set_dp_config(config, prior_updates)
    return model


def _dp_class(cls: type) -> type:
    """``DP<Class>(DPModel, Class)``, made once per class.

    Every such class is registered under the one name ``keras_dp>PrivateModel``:
    loading dispatches on the saved base-class reference (see keras_dp.saving), so
    a fresh process needs only ``import keras_dp``.
    """
    if cls not in _DP_CLASSES:
        dp_cls = type(f"DP{cls.__name__}", (DPModel, cls), {"__module__": __name__})
        _DP_CLASSES[cls] = keras.saving.register_keras_serializable(
            package="keras_dp", name=saving.REGISTERED_NAME
        )(dp_cls)
    return _DP_CLASSES[cls]


_dp_class(keras.Sequential)  # so the registered name resolves before any make_private
