"""A DP step's logs, read from the device in one transfer.

Keras converts every value of every step's logs to a Python float (``pythonify_logs``,
on its callback thread), one device-to-host transfer per value. On a GPU such a
transfer costs far more than a small model's step: on the H200 machine converting the
MLP's logs took 0.29 ms for plain Keras' one value and 0.75 ms for the DP step's three
(``loss``, ``clipped_fraction``, ``nonfinite_examples``) while its whole compiled step
took 0.16 ms (``benchmarks/results/gpu-h200-ghost/``). :class:`StepLogs` is the step's
logs as a ``dict`` whose float32 scalars travel stacked in one array: the first value
converted fetches them all, the others are read from that copy.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np

_TRACER = getattr(jax.core, "Tracer", ())  # a traced array is a jax.Array too


class _Fetched:
    """The stacked float32 scalars of one step, fetched once when first read."""

    def __init__(self, stacked):
        self.stacked = stacked
        self._host = None
        self._lock = threading.Lock()

    def host(self) -> np.ndarray:
        with self._lock:
            if self._host is None:
                self._host = np.asarray(self.stacked)
            return self._host


class LogValue:
    """One float32 scalar of a step's logs; ``float()`` and ``np.asarray()`` read it."""

    __slots__ = ("_fetched", "_index")

    def __init__(self, fetched: _Fetched, index: int):
        self._fetched, self._index = fetched, index

    def numpy(self) -> np.ndarray:
        return self._fetched.host()[self._index]

    def __float__(self) -> float:
        return float(self.numpy())

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.numpy(), dtype=dtype)

    def __repr__(self) -> str:
        return repr(float(self))


class StepLogs(dict):
    """The logs of a DP step: a ``dict`` of the same keys and values, whose float32
    scalars are stacked into one array when it crosses a ``jax.jit`` boundary
    (a pytree whose leaves are that array and the other values).

    On the host (the jitted step's result) its stacked values are :class:`LogValue`
    objects: converting the first one (Keras' ``pythonify_logs``) copies all of them
    from the device in one transfer. Under tracing they are the traced scalars, and a
    value set anew (a subclass's ``train_step`` changing ``logs["loss"]``) or added
    travels as it was set.
    """

    def __init__(self, values: dict, stacked=None, positions: tuple = ()):
        super().__init__(values)
        # (key, index in ``stacked``) of the values that ``stacked`` holds, and those
        # values as they were: a key set anew afterwards travels as its own leaf.
        self._stacked, self._positions = stacked, positions
        self._as_stacked = {k: values[k] for k, _ in positions}

    @classmethod
    def of(cls, logs: dict) -> StepLogs:
        """``logs`` (inside the step) with their float32 scalars stacked."""
        keys = [k for k, v in logs.items() if _float32_scalar(v)]
        stacked = jnp.stack([jnp.asarray(logs[k]) for k in keys]) if keys else None
        return cls(dict(logs), stacked, tuple((k, i) for i, k in enumerate(keys)))

    def _flatten(self):
        same = self._as_stacked
        positions = tuple((k, i) for k, i in self._positions if k in self and self[k] is same[k])
        held = {k for k, _ in positions}
        others = tuple(k for k in self if k not in held)
        children = (self._stacked if positions else None, tuple(self[k] for k in others))
        return children, (tuple(self), positions, others)

    @classmethod
    def _unflatten(cls, aux, children) -> StepLogs:
        order, positions, others = aux
        stacked, other_values = children
        values = dict(zip(others, other_values))
        if positions:
            if isinstance(stacked, jax.Array) and not isinstance(stacked, _TRACER):
                fetched = _Fetched(stacked)
                values.update((k, LogValue(fetched, i)) for k, i in positions)
            else:  # traced, or a tree operation's placeholder leaves
                values.update((k, _item(stacked, i)) for k, i in positions)
        return cls({k: values[k] for k in order}, stacked, positions)


def _float32_scalar(value) -> bool:
    return getattr(value, "shape", None) == () and getattr(value, "dtype", None) == jnp.float32


def _item(stacked, index: int):
    try:
        return stacked[index]
    except (TypeError, IndexError):  # a placeholder (None, object()) in a tree operation
        return stacked


jax.tree_util.register_pytree_node(StepLogs, StepLogs._flatten, StepLogs._unflatten)
