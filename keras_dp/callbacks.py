"""Callbacks that report and enforce the privacy budget."""

from __future__ import annotations

import keras


class PrivacyBudget(keras.callbacks.Callback):
    """Reports ε spent after every epoch and stops training at a budget.

    Puts ``epsilon`` (spent so far, all ``fit`` calls together) into the epoch
    logs, so it shows in the progress bar, ``History.history["epsilon"]`` and
    TensorBoard. Stops training *before* an update would take ε above
    ``stop_at_epsilon``.

    Args:
      delta: δ at which ε is reported. Default: the config's δ.
      stop_at_epsilon: Stop before ε would exceed this. Default: the config's
        ``target_epsilon``. Must be positive.
      per_step: Also put ε into every step's logs (the progress bar with
        ``verbose=1``, batch-level callbacks). Each step then asks the accountant
        (about 0.05-0.3 s on a CPU) and waits for the step to finish.

    Example:

    >>> callback = PrivacyBudget(stop_at_epsilon=2.0)
    >>> callback.stop_at_epsilon
    2.0
    """

    def __init__(
        self,
        delta: float | None = None,
        stop_at_epsilon: float | None = None,
        per_step: bool = False,
    ):
        super().__init__()
        if stop_at_epsilon is not None and not stop_at_epsilon > 0:
            raise ValueError(
                f"PrivacyBudget(stop_at_epsilon={stop_at_epsilon!r}) must be positive; pass "
                "a positive ε, or None for the config's target_epsilon."
            )
        if delta is not None and not 0 < delta < 1:
            raise ValueError(f"PrivacyBudget(delta={delta!r}) must be in (0, 1), or None.")
        self.delta = delta
        self.stop_at_epsilon = stop_at_epsilon
        self.per_step = bool(per_step)
        self._max_steps = None

    def max_steps(self, model) -> int:
        """The most updates of ``model``'s plan whose ε stays within the limit."""
        config = model.dp_config
        limit = config.target_epsilon if self.stop_at_epsilon is None else self.stop_at_epsilon
        delta = config.delta if self.delta is None else self.delta
        return config.max_steps_within(limit, delta)

    def on_train_begin(self, logs=None):
        if self._max_steps is None:
            self._max_steps = self.max_steps(self.model)

    def on_train_batch_begin(self, batch, logs=None):
        # The ledger already counts the update being dispatched; no batch-end hook, so
        # Keras keeps dispatching asynchronously.
        if self._model.dp_steps >= self._max_steps:  # _model: no variable sync per step
            self._model.stop_training = True

    def on_train_end(self, logs=None):
        self._max_steps = None

    def on_epoch_end(self, epoch, logs=None):
        # DP fit puts ε into the logs before any callback runs; this is for other loops.
        if logs is not None and "epsilon" not in logs:
            logs["epsilon"] = self.model.privacy_spent(self.delta).epsilon


class DPProgbarLogger(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, without ``nonfinite_examples`` while it is 0 (and on the
    per-step bar), and with the updates that ran in an epoch the plan ends early.

    DP ``fit`` puts it in place of the default one; ``History`` still records
    ``nonfinite_examples`` (the epoch's count of real examples whose gradient was not
    finite and so contributed nothing).
    """

    def on_train_batch_end(self, batch, logs=None):
        # Reading the count would make Keras wait for every step: the per-step bar
        # leaves it out; the epoch's line and History show it when it is not 0.
        logs = {k: v for k, v in (logs or {}).items() if k != "nonfinite_examples"}
        super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        # The plan's last epoch may stop early (its remaining updates): show what ran,
        # e.g. 11/11, not 11 updates as 12/12.
        seen, target = getattr(self, "seen", 0), getattr(self, "target", None)
        if seen and target is not None and seen < target:
            self.target = seen
            if getattr(self, "progbar", None) is not None:
                self.progbar.target = seen
        super().on_epoch_end(epoch, _without_zero_nonfinite(logs))


def _without_zero_nonfinite(logs):
    if not logs or "nonfinite_examples" not in logs:
        return logs
    if float(logs["nonfinite_examples"]) != 0:
        return logs
    return {k: v for k, v in logs.items() if k != "nonfinite_examples"}
