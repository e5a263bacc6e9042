"""The privacy ledger: how many accounted updates a model's weights have taken.

The ledger travels with the weights. It is a saveable part of the model, so
``model.save`` (``.keras``) and weights-only checkpoints (``save_weights``,
``BackupAndRestore``, ``ModelCheckpoint(save_weights_only=True)``) all store the
update count and the plan it was spent under; loading weights restores the count
those weights were trained with. Updates whose weights were thrown away (an
interrupted epoch that a checkpoint rolls back) are not part of the released
model and are not counted.
"""

from __future__ import annotations

import json
import weakref

import keras
import numpy as np
from keras.src.saving.keras_saveable import KerasSaveable

from keras_dp import saving
from keras_dp.config import DPConfig

SEED_STATE = "seed_generator_state"  # in the path of every Keras seed-generator state


class Ledger(KerasSaveable):
    """Accounted updates taken (``steps``) under the model's plan; saved with the weights.

    Attributes:
      model: The model whose plan and seed states are saved with the ledger (a weak
        reference).
      steps: DP updates that produced the current weights.
      checkpoint_plan: The plan a loaded checkpoint was trained under, checked
        against the model's plan before training continues.
    """

    def __init__(self, model=None, steps: int = 0):
        self._model = weakref.ref(model) if model is not None else lambda: None
        self.steps = steps
        self.checkpoint_plan: DPConfig | None = None

    def _obj_type(self):
        # Keras' saving walks a saveable's attributes with the skip list of a kind it
        # knows; the ledger has no saveable children, so any plain kind will do.
        return "Operation"

    def save_own_variables(self, store):
        store["steps"] = np.asarray([self.steps], np.int64)
        model = self._model()
        plan = model.dp_config if model is not None else None
        if plan is not None and plan.is_calibrated:
            text = json.dumps(saving.config_to_dict(plan))
            store["plan"] = np.frombuffer(text.encode(), np.uint8)
        for path, variable in self._seed_states().items():
            store[path] = np.asarray(variable.value)

    def load_own_variables(self, store):
        keys = list(store.keys())
        if "steps" not in keys:  # written before the ledger was saved with the weights
            return
        self.steps = int(np.asarray(store["steps"])[0])
        if "plan" in keys:
            text = bytes(np.asarray(store["plan"], np.uint8)).decode()
            self.checkpoint_plan = saving.config_from_dict(json.loads(text))
        for path, variable in self._seed_states().items():
            if path in keys:
                variable.assign(np.asarray(store[path]))

    def _seed_states(self) -> dict:
        """The model's seed-generator states, by variable path (``/`` as ``|``)."""
        model = self._model()
        if model is None:
            return {}
        return {
            "seed|" + v.path.replace("/", "|"): v
            for v in model.non_trainable_variables
            if SEED_STATE in v.path
        }

    def check_plan(self, plan: DPConfig) -> None:
        """Refuses to continue loaded weights under a plan other than theirs."""
        old = self.checkpoint_plan
        if old is None or not plan.is_calibrated:
            return
        if not saving.same_plan(plan, old):
            raise ValueError(
                f"These weights were trained ({self.steps} DP updates) under another plan "
                f"({old}); continuing them under {plan} would hide that spend. Resume with "
                "the checkpoint's plan (clip norm, batch, epochs/steps, dataset size, σ, δ), "
                "or start from new weights."
            )


def check_covers(steps: int, epoch: int, per_epoch: int) -> None:
    """Refuses to start at ``epoch`` when the ledger holds fewer updates than that implies.

    Checkpoints written without a ledger (by a plain Keras model, or by an earlier
    keras_dp) would otherwise resume with a fresh ledger and under-report ε.
    """
    if epoch * per_epoch > steps:
        raise ValueError(
            f"Training would resume at epoch {epoch}, i.e. after {epoch * per_epoch} DP "
            f"updates, but this model's privacy ledger holds {steps}: its weights come "
            "from a checkpoint that does not carry the ledger, so ε would be "
            "under-reported. Resume from a checkpoint written by this DP model "
            "(model.save, save_weights, BackupAndRestore or ModelCheckpoint). Nothing was "
            "trained."
        )


class LedgerCallback(keras.callbacks.Callback):
    """Counts the updates taken and stops exactly at ``stop_at`` (an absolute count).

    It has no batch-end hook, so Keras keeps dispatching steps asynchronously.

    Its first ``on_epoch_begin`` runs after any checkpoint was restored (Keras'
    ``BackupAndRestore`` restores in ``on_train_begin``): there it checks the
    restored ledger against the plan, and moves the sampler to the restored
    count, so no draw is replayed.
    """

    def __init__(self, stop_at: int, per_epoch: int, batches):
        super().__init__()
        self._stop_at, self._per_epoch, self._batches = stop_at, per_epoch, batches
        self._first = True

    def on_epoch_begin(self, epoch, logs=None):
        if not self._first:
            return
        self._first = False
        ledger = self.model._dp_ledger
        ledger.check_plan(self.model.dp_config)
        check_covers(ledger.steps, epoch, self._per_epoch)
        if ledger.steps >= self._stop_at:
            raise ValueError(
                f"The privacy budget of this plan is spent: the restored weights took "
                f"{ledger.steps} DP updates. Nothing was trained."
            )
        self._batches.resume_at(ledger.steps)

    def on_train_batch_begin(self, batch, logs=None):
        # Counted as the update is dispatched: a batch-*end* hook would make Keras wait
        # for every step (no asynchronous dispatch). An update that then fails is
        # counted anyway, which errs on the safe side.
        # self._model, not self.model: Keras' property syncs the model's variables from
        # the trainer's state on every access (0.4 ms a step on an MLP).
        ledger = self._model._dp_ledger  # a plain object: no attribute tracking per step
        ledger.steps += 1
        if ledger.steps >= self._stop_at:
            self._model.stop_training = True  # Keras stops after this update
