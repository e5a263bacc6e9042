"""The privacy ledger: how many accounted updates a model's weights have taken.

The ledger travels with the weights. It is a saveable part of the model, so
``model.save`` (``.keras``) and weights-only checkpoints (``save_weights``,
``BackupAndRestore``, ``ModelCheckpoint(save_weights_only=True)``) all store the
update count, the plan it was spent under, a public run id and whether a
user-fixed (public) seed was used. Loading weights:

* restores the count and adopts the plan the weights were trained under (ε is
  reported under it; ``fit`` refuses a different plan the user set);
* accounts, in the same process, every update of that run computed so far (a
  high-water count): a checkpoint chosen after seeing later updates depends on
  them. A new process cannot know about updates computed elsewhere; crash recovery
  assumes the updates thrown away by the crash were never released;
* draws a new secret seed, so a rolled-back run never reuses a (seed, update)
  pair: two released models sharing their noise would reveal their difference.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import weakref

import keras
import numpy as np

from keras_dp import saving
from keras_dp._keras import KerasSaveable
from keras_dp.config import DPConfig

logger = logging.getLogger(__name__)

SEED_STATE = "seed_generator_state"  # in the path of every Keras seed-generator state


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


# Per run (one id per secret seed's lineage), the most updates any model of that run
# has computed in this process. Weights of the run loaded after later updates were
# computed are accounted at this count: choosing a checkpoint by looking at what came
# after it (ModelCheckpoint(save_best_only=True), a rollback) makes the chosen weights
# a function of every update computed. A new process cannot know this count.
_HIGH_WATER: dict[int, int] = {}


class Ledger(KerasSaveable):
    """What a model's weights have spent; saved with the weights.

    Attributes:
      model: The model whose plan and seed states are saved with the ledger (a weak
        reference).
      steps: DP updates in the lineage of the current weights: the sampler and the
        noise continue from this update number.
      spent: Updates accounted (``>= steps``): also those computed in this process
        after the loaded weights and thrown away, and updates declared with
        ``prior_updates``. ε is reported for ``spent`` updates of the plan.
      run: A random, public id of the training run (not the secret seed).
      public_seed: True once any update ran with a user-fixed ``DPConfig.seed``:
        anyone who knows the seed can regenerate the noise, so the weights are NOT
        differentially private. Sticky: saved and loaded with the weights.
      conflict: A plan the user set that differs from the plan the loaded weights
        were trained under; ``fit`` refuses to continue until it is resolved.
      partition_seed: Correlated noise only (``DPConfig.bands > 1``): the SECRET seed
        of the run's partition of the examples into groups. It is saved with the
        weights, like the noise history, so that a resumed run continues the
        analysed mechanism; such a checkpoint is as sensitive as the data until the
        plan is complete (both are then erased).
    """

    def __init__(self, model=None, steps: int = 0):
        self._model = weakref.ref(model) if model is not None else lambda: None
        self.steps = steps
        self.spent = steps
        self.run: int | None = None
        self.public_seed = False
        self.conflict: DPConfig | None = None
        self.partition_seed: int | None = None

    def _obj_type(self):
        # Keras' saving walks a saveable's attributes with the skip list of a kind it
        # knows; the ledger has no saveable children, so any plain kind will do.
        return "Operation"

    # Counting --------------------------------------------------------------------

    def start_run(self) -> None:
        """Gives the lineage a run id if it has none (at the first fit)."""
        if self.run is None:
            self.run = secrets.randbits(63)

    def count_update(self) -> None:
        """One more update dispatched (lineage and accounted)."""
        self.steps += 1
        self.spent += 1
        if _HIGH_WATER.get(self.run, 0) < self.spent:
            _HIGH_WATER[self.run] = self.spent

    def declare(self, prior_updates: int) -> None:
        """Counts updates the current weights took before this ledger knew of them."""
        if prior_updates > self.steps:
            self.spent += prior_updates - self.steps
            self.steps = prior_updates

    # Saving ----------------------------------------------------------------------

    def save_own_variables(self, store):
        store["steps"] = np.asarray([self.steps], np.int64)
        store["spent"] = np.asarray([self.spent], np.int64)
        store["run"] = np.asarray([-1 if self.run is None else self.run], np.int64)
        store["public_seed"] = np.asarray([int(self.public_seed)], np.int64)
        if self.partition_seed is not None:  # secret: see the class docstring
            store["partition_seed"] = np.asarray([self.partition_seed], np.int64)
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
        read = lambda key, default: int(np.asarray(store[key])[0]) if key in keys else default  # noqa: E731
        self.steps = read("steps", 0)
        run = read("run", -1)
        self.run = None if run < 0 else run
        self.spent = max(read("spent", self.steps), _HIGH_WATER.get(self.run, 0))
        self.public_seed = self.public_seed or bool(read("public_seed", 0))
        partition = read("partition_seed", -1)
        self.partition_seed = None if partition < 0 else partition
        for path, variable in self._seed_states().items():
            if path in keys:
                variable.assign(np.asarray(store[path]))
        model = self._model()
        if model is None:
            return
        if "plan" in keys and self.steps:
            text = bytes(np.asarray(store["plan"], np.uint8)).decode()
            self._adopt(model, saving.config_from_dict(json.loads(text)))
        model._dp_new_seed()  # never continue with (seed, step) pairs already used

    def _adopt(self, model, trained_under: DPConfig) -> None:
        """Reports (and saves) loaded weights under the plan they were trained with."""
        plan = model.dp_config
        keep = {"microbatch_size": plan.microbatch_size, "seed": plan.seed} if plan else {}
        if plan is not None and model._dp_same_plan(trained_under):
            # The same plan (now calibrated): the compiled step stays valid, which
            # matters when BackupAndRestore loads in the middle of fit.
            model._dp_config = trained_under._replace(**keep)
            return
        if plan is not None:
            logger.warning(
                "These weights were trained (%d DP updates) under another plan (%s) than "
                "the model's (%s): ε is now reported under theirs, and fit refuses to "
                "continue until you choose.",
                self.steps,
                trained_under,
                plan,
            )
            self.conflict = plan
        model._dp_set_plan(trained_under._replace(**keep))

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

    def check_plan(self) -> None:
        """Refuses to continue loaded weights under a plan other than theirs."""
        if self.conflict is not None:
            model = self._model()
            raise ValueError(
                f"These weights were trained ({self.steps} DP updates) under another plan "
                f"({model.dp_config if model else '?'}) than the one you set "
                f"({self.conflict}); continuing them under yours would hide that spend. "
                "Continue under theirs with model.set_dp_config(model.dp_config), or start "
                "from new weights. Nothing was trained."
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
    """Counts the updates taken and stops exactly at ``stop_at`` (accounted updates).

    It has no batch-end hook, so Keras keeps dispatching steps asynchronously.

    Its first ``on_epoch_begin`` runs after any checkpoint was restored (Keras'
    ``BackupAndRestore`` restores in ``on_train_begin``): there it checks the
    restored ledger against the plan, and moves the sampler to the restored
    count, so no draw is replayed.
    """

    def __init__(self, stop_at: int, per_epoch: int, batches, budget=None):
        super().__init__()
        self._stop_at, self._per_epoch, self._batches = stop_at, per_epoch, batches
        self._budget = budget  # a PrivacyBudget: its ε goes into the logs from here
        self._first = True

    def on_epoch_begin(self, epoch, logs=None):
        if not self._first:
            return
        self._first = False
        ledger = self.model._dp_ledger
        ledger.check_plan()
        check_covers(ledger.steps, epoch, self._per_epoch)
        if ledger.spent >= self._stop_at:
            raise ValueError(
                f"The privacy budget of this plan is spent: the restored weights account "
                f"for {ledger.spent} DP updates. Nothing was trained. To train more, make "
                "a new plan (a DPConfig with more epochs) on a new model: training these "
                "weights under a second plan would spend both plans' ε."
            )
        self._batches.resume_at(ledger.steps)

    def on_epoch_end(self, epoch, logs=None):
        # First in the callback list, so CSVLogger, TensorBoard and History see ε whatever
        # the order the user gave.
        if self._budget is not None and logs is not None:
            logs["epsilon"] = self.model.privacy_spent(self._budget.delta).epsilon

    def on_train_end(self, logs=None):
        model = self.model
        config = model.dp_config
        if config.correlated and model._dp_ledger.steps >= config.steps:
            model.erase_dp_secrets()  # the plan is complete: nothing secret is kept
            logger.info("BandMF plan complete: the secret noise state was erased.")

    def on_train_batch_begin(self, batch, logs=None):
        # Counted as the update is dispatched: a batch-*end* hook would make Keras wait
        # for every step (no asynchronous dispatch). An update that then fails is
        # counted anyway, which errs on the safe side.
        # self._model, not self.model: Keras' property syncs the model's variables from
        # the trainer's state on every access (0.4 ms a step on an MLP).
        ledger = self._model._dp_ledger  # a plain object: no attribute tracking per step
        ledger.count_update()
        if ledger.spent >= self._stop_at:
            self._model.stop_training = True  # Keras stops after this update


class PerStepLedgerCallback(LedgerCallback):
    """:class:`LedgerCallback` that also puts ε into every step's logs
    (``PrivacyBudget(per_step=True)``). Its batch-end hook makes Keras wait for each
    step, so it is used only when asked for."""

    def on_train_batch_end(self, batch, logs=None):
        if logs is not None:
            logs["epsilon"] = self.model.privacy_spent(self._budget.delta).epsilon
