"""Callbacks that report and enforce the privacy budget, and DP fit's progress bar."""

from __future__ import annotations

import math
import time

import keras

from keras_dp import _keras


class PrivacyBudget(keras.callbacks.Callback):
    """Reports ε spent after every epoch and stops training at a budget.

    Puts ``epsilon`` (spent so far, all ``fit`` calls together) into the epoch
    logs, so it shows in the progress bar, ``History.history["epsilon"]`` and
    TensorBoard. Stops training *before* an update would take ε above
    ``stop_at_epsilon``.

    Each epoch's ε is dp_accounting's PLD of the updates so far, computed on the host
    when the epoch ends: on a 2-core CPU, 0.06-0.1 s an epoch for a plan of a few
    hundred updates, which an epoch of a small model (the README's MLP: 0.03 s) waits
    for. Computed ahead in a thread during training, it slowed that MLP's steps by
    more than it saved. The first epoch's (which also builds the step's PLD on a finer
    grid, 0.25-0.3 s) is computed before training, right after ``fit`` calibrates σ,
    while the step may still be compiling: that MLP's first epoch took 1.48 s instead
    of 1.66 s where the compile outlasted the search, and the same where it did not.
    So is the last update within ``stop_at_epsilon`` below the plan's target (about
    five PLD queries, by secants in log-log: 0.56 s for that MLP at half its ε).

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

    def limit(self, config) -> tuple[float, float]:
        """``(ε, δ)``: the ε this callback stops at, and the δ it is measured at, for
        ``config``'s plan (its target ε and δ where this callback sets none)."""
        limit = config.target_epsilon if self.stop_at_epsilon is None else self.stop_at_epsilon
        return limit, config.delta if self.delta is None else self.delta

    def max_steps(self, model) -> int:
        """The most updates of ``model``'s plan whose ε stays within the limit."""
        return model.dp_config.max_steps_within(*self.limit(model.dp_config))

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

    A step's logs are read from the device only when the bar redraws: Keras' bar
    redraws at most once per ``interval`` (0.05 s) and shows the latest values, so it
    reads the step that ends a pause and counts the others without reading them.
    Between redraws nothing waits for the device, and the host keeps dispatching
    steps ahead of it (:class:`FitCallbacks`). The epoch's line is Keras' own.
    """

    reads_logs_when_shown = True  # FitCallbacks hands it a step's logs unread

    def __init__(self):
        super().__init__()
        self._shown = -math.inf

    def on_epoch_begin(self, epoch, logs=None):
        self._shown = -math.inf  # a new bar: it shows the epoch's first step
        super().on_epoch_begin(epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self.seen = batch + 1
        interval = getattr(self.progbar, "interval", 0.05)
        if self.verbose != 1 or time.monotonic() - self._shown < interval:
            return  # the bar would not redraw: the values are not read
        # Reading the count would show it on every step: the per-step bar leaves it
        # out; the epoch's line and History show it when it is not 0.
        logs = _keras.pythonify_logs(logs or {})
        logs = {k: v for k, v in logs.items() if k != "nonfinite_examples"}
        super().on_train_batch_end(batch, logs)
        self._shown = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        # The plan's last epoch may stop early (its remaining updates): show what ran,
        # e.g. 11/11, not 11 updates as 12/12.
        seen, target = getattr(self, "seen", 0), getattr(self, "target", None)
        if seen and target is not None and seen < target:
            self.target = seen
            if getattr(self, "progbar", None) is not None:
                self.progbar.target = seen
        super().on_epoch_end(epoch, _without_zero_nonfinite(logs))


class FitCallbacks(keras.callbacks.CallbackList):
    """DP fit's callbacks: a step's logs are read from the device only by a callback
    that reads them.

    Keras converts every step's logs to floats for the batch-end hooks, whether or
    not any callback has one: one transfer from the device a step, which on a GPU
    also waits for the step (0.29 ms a step on the H200 machine). Here the end of a
    step goes only to the callbacks that have a batch-end hook: with none (``verbose=0``
    and epoch-level callbacks, such as ``PrivacyBudget``, ``EarlyStopping`` or
    ``History``) nothing is read; with only the progress bar, it gets the logs unread
    (:class:`DPProgbarLogger` reads them when it redraws); with any other, Keras' own
    dispatch runs as it would (floats to every hook, on Keras' callback thread when
    all are safe there).
    """

    _hooked, _unread = (), False  # until on_train_begin: Keras' own dispatch

    def on_train_begin(self, logs=None):
        self._hooked = [c for c in self.callbacks if _has_batch_end_hook(c)]
        self._unread = all(getattr(c, "reads_logs_when_shown", False) for c in self._hooked)
        super().on_train_begin(logs)

    def on_train_batch_end(self, batch, logs=None):
        if not self._unread:
            super().on_train_batch_end(batch, logs)
            return
        for callback in self._hooked:
            callback.on_train_batch_end(batch, logs)


def _has_batch_end_hook(callback) -> bool:
    """Whether ``callback`` does anything at a training step's end: it (its class or
    the instance, as ``LambdaCallback`` sets them) overrides ``on_train_batch_end`` or
    ``on_batch_end``, which Keras' default ``on_train_batch_end`` calls."""
    for name in ("on_train_batch_end", "on_batch_end"):
        method = getattr(callback, name)
        if getattr(method, "__func__", method) is not getattr(keras.callbacks.Callback, name):
            return True
    return False


def _without_zero_nonfinite(logs):
    if not logs or "nonfinite_examples" not in logs:
        return logs
    if float(logs["nonfinite_examples"]) != 0:
        return logs
    return {k: v for k, v in logs.items() if k != "nonfinite_examples"}
