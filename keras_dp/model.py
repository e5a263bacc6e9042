"""The DPModel mixin: DP-SGD in the JAX trainer's train_step, and make_private.

Formal guarantee: one call of ``train_step`` is one optimizer update and one
accounted step. Each real example's gradient over the *trainable* variables is
clipped to L2 norm C; the clipped gradients are summed, N(0, (σ·C)²) noise is
added once to the sum, and the result is divided by the expected batch size B.
With ``noise="bandmf"`` the noise of update t is σC·(C⁻¹z)_t instead, correlated over
the last b updates (:mod:`keras_dp.bandmf`; its state is a non-trainable variable).
With the sampler in ``fit`` running as the config says, the whole run is
(ε, δ)-DP for the config's neighbouring relation (see :mod:`keras_dp.accounting`).

The update itself is :mod:`keras_dp.step`; what ``fit`` checks and feeds it is
:mod:`keras_dp.fitting`.
"""

from __future__ import annotations

import secrets

import keras

from keras_dp import (
    _keras,
    checks,
    distribute,
    fitting,
    ledger,
    metrics,
    noise_state,
    saving,
    step,
)
from keras_dp.config import DPConfig
from keras_dp.ledger import PrivacySpent

ADAPTIVE_CLIP_NORM = "dp_adaptive_clip_norm"


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
        self._dp_noise_input = None  # σ, the jitted step's input (set by fit)
        self._dp_jitted_step = None
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
        self._dp_jitted_step = self._dp_noise_input = None
        if config is not None and config.clip_quantile is not None:
            if getattr(self, "_dp_clip_norm", None) is None:  # adaptive C: saved with weights
                variable = keras.Variable(  # float32, not weak: as the step returns it
                    float(config.l2_clip_norm),
                    dtype="float32",
                    trainable=False,
                    name=ADAPTIVE_CLIP_NORM,
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

    def save(self, filepath, overwrite=True, zipped=None, **kwargs):
        """Keras' ``save`` to a ``.keras`` file (plan and ledger included); the legacy
        HDF5 format (``.h5``) is refused: its loader cannot find a DP model's class."""
        if str(filepath).endswith((".h5", ".hdf5")):
            raise ValueError(
                f"model.save({str(filepath)!r}): a DP model is saved as a .keras file "
                "(its plan and privacy ledger travel with it); the legacy HDF5 format "
                "cannot load it back. Pass a path ending in '.keras', or use "
                "save_weights('....weights.h5') for the weights and their ledger."
            )
        return super().save(filepath, overwrite=overwrite, zipped=zipped, **kwargs)

    def __reduce__(self):
        """``pickle`` and ``copy.deepcopy`` as Keras does them: a ``.keras`` archive in
        memory (plan and ledger included, never the secret seed). Keras' own loader is
        a method of the model's class, which pickle would look up by name; a class made
        by ``make_private`` has none, so a module-level loader is used."""
        _, archive = super().__reduce__()
        return (_keras.unpickle_model, archive)

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

        ``validation_split`` holds out the last rows of the arrays, as Keras does, before
        anything is sampled: the plan (its N, q and ε) covers the rows that remain.

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
        return fitting.fit(
            self,
            config,
            x=x,
            y=y,
            batch_size=batch_size,
            epochs=epochs,
            verbose=verbose,
            callbacks=callbacks,
            validation_split=validation_split,
            validation_data=validation_data,
            shuffle=shuffle,
            class_weight=class_weight,
            sample_weight=sample_weight,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            validation_steps=validation_steps,
            validation_batch_size=validation_batch_size,
            validation_freq=validation_freq,
            user_ids=user_ids,
        )

    # The train step ---------------------------------------------------------------

    def make_train_function(self, force=False):
        """Keras' train function, its jitted step taking σ as an input (fit compiles it
        while σ is calibrated), its first call run with the garbage collector paused
        (:func:`keras_dp.step.paused_gc_on_first_call`)."""
        if self.train_function is not None and not force:
            return
        built = _keras.dp_train_function(self, self._dp_noised_train_step)
        if built is None:  # run eagerly, or not jitted: the step reads the plan's σ
            super().make_train_function(force)
            self._dp_jitted_step = None
        else:
            self.train_function, self._dp_jitted_step = built
        self.train_function = step.paused_gc_on_first_call(self.train_function)

    def _dp_noised_train_step(self, state, data, noise_multiplier):
        """``train_step`` on ``data`` with the noise multiplier as an input of the batch
        (:func:`keras_dp.step.with_noise`): what fit's train function jits."""
        return self.train_step(state, step.with_noise(data, noise_multiplier))

    def train_step(self, state, data):
        """One DP-SGD update (see :mod:`keras_dp.step`)."""
        return step.train_step(self, state, data)

    def test_step(self, state, data):
        """Keras' own evaluation; the DP training counters are not part of its logs."""
        logs, state = super().test_step(state, data)
        return {k: v for k, v in logs.items() if k not in metrics.DP_COUNTERS}, state


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
