"""Samplers that run exactly as the accountant assumes, and per-example data access.

A sampler turns (seed, step) into the indices of one update's batch, so a run
never replays a draw and a resumed run continues the same sequence. Batches have
a fixed physical size: real rows first, then padding rows that the mask marks.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import math

import numpy as np


def physical_batch_size(max_batch_size: int, chunk_size: int, num_shards: int = 1) -> int:
    """Rows fed per update: ``num_shards`` equal shards, each a whole number of chunks,
    together holding ``max_batch_size`` real rows dealt round-robin."""
    per_shard = math.ceil(max_batch_size / num_shards)
    return math.ceil(per_shard / chunk_size) * chunk_size * num_shards


_STREAM = 0x5A3  # the sampler's half of the Philox key (the seed's 64 bits are the other)


def _key(seed: int) -> np.ndarray:
    return np.asarray([int(seed) % 2**64, _STREAM], np.uint64)


def _counter(step: int) -> np.ndarray:
    return np.asarray([0, int(step) % 2**64, 0, 0], np.uint64)


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The sampler's generator for update ``step``: Philox-4x64 keyed by the secret
    seed, its counter starting at (0, step, 0, 0). Each update's stream is its own
    (a draw uses far fewer than the 2^64 blocks that would reach the next update's),
    and a function of (seed, step) alone, so a resumed run draws what an uninterrupted
    one would."""
    return np.random.Generator(np.random.Philox(key=_key(seed), counter=_counter(step)))


class StepStreams:
    """:func:`step_rng`'s streams of one seed from one generator, reset for each update:
    the same numbers without making a generator per update (~27 µs of a ~46 µs draw)."""

    def __init__(self, seed: int):
        self.seed = seed
        self._bits = np.random.Philox(key=_key(seed))
        self._rng = np.random.Generator(self._bits)
        self._state = self._bits.state  # a fresh generator's: nothing buffered

    def at(self, step: int) -> np.random.Generator:
        """Update ``step``'s generator, valid until the next call."""
        self._state["state"]["counter"] = _counter(step)
        self._bits.state = self._state
        return self._rng


def poisson_indices(
    rng: np.random.Generator, dataset_size: int, probability: float, truncate_to: int | None
) -> np.ndarray:
    """Each index independently with ``probability``; at most ``truncate_to`` kept.

    A draw larger than ``truncate_to`` keeps a uniformly random subset of that size
    (as ``TruncatedSubsampledGaussianDpEvent`` assumes).
    """
    count = rng.binomial(dataset_size, probability)
    indices = rng.choice(dataset_size, size=count, replace=False)  # a uniform subset
    if truncate_to is not None:
        indices = indices[:truncate_to]
    return np.sort(indices)


@functools.lru_cache(maxsize=4)
def cyclic_groups(partition_seed: int, dataset_size: int, bands: int) -> tuple[np.ndarray, ...]:
    """The examples of each of ``bands`` groups: every example joins one group,
    independently and uniformly at random (jax-privacy's ``PartitionType.INDEPENDENT``,
    the partition that the add-or-remove-one analysis of Amplified BandMF assumes).

    A function of the partition seed alone, so a resumed run keeps its groups; the
    seed is secret (the groups are part of the sampling randomness).
    """
    rng = np.random.default_rng([partition_seed, dataset_size, bands, 0xBA4D])
    group = rng.integers(0, bands, size=dataset_size)
    return tuple(np.flatnonzero(group == g) for g in range(bands))


def cyclic_poisson_indices(
    rng: np.random.Generator, groups: tuple[np.ndarray, ...], step: int, probability: float
) -> np.ndarray:
    """Cyclic Poisson: each example of group ``step mod len(groups)`` independently with
    ``probability`` (never truncated); no other example."""
    members = groups[step % len(groups)]
    count = rng.binomial(len(members), min(probability, 1.0))
    return np.sort(rng.choice(members, size=count, replace=False))


def fixed_indices(rng: np.random.Generator, dataset_size: int, batch_size: int) -> np.ndarray:
    """A uniformly random subset of exactly ``batch_size`` indices."""
    return np.sort(rng.choice(dataset_size, size=batch_size, replace=False))


def shard_positions(count: int, physical: int, num_shards: int = 1) -> np.ndarray | slice:
    """Where :func:`shard_layout` puts the k-th of ``count`` real rows (an index: on
    one shard the real rows are the first ``count``)."""
    per_shard = physical // num_shards
    if physical % num_shards or count > per_shard * num_shards:
        raise ValueError(f"{count} rows do not fit {num_shards} shards of {per_shard}.")
    if num_shards == 1:
        return slice(0, count)
    rank = np.arange(count)
    return (rank % num_shards) * per_shard + rank // num_shards


def shard_layout(
    indices: np.ndarray, physical: int, num_shards: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Indices padded to ``physical`` rows, and the mask of real rows.

    The real rows are dealt round-robin over ``num_shards`` equal shards (one per
    device), each shard real rows first; padding repeats row 0 and is masked out.
    The k-th sampled index lands in shard ``k % num_shards`` at ``k // num_shards``.
    """
    positions = shard_positions(len(indices), physical, num_shards)
    padded = np.zeros(physical, dtype=np.int64)
    padded[positions] = indices
    mask = np.zeros(physical, dtype=bool)
    mask[positions] = True
    return padded, mask


class ExampleSource:
    """Random access to one example at a time over the user's training data.

    Accepts numpy-like arrays and nested tuples/lists/dicts of them (sharing the
    leading axis), or any object with ``__len__`` and ``__getitem__(i)`` returning
    ONE example (a tfds random-access data source, a Python list of examples).
    Items that are tuples are ``(x, y[, sample_weight])``; a tfds source whose
    dataset declares ``supervised_keys`` gives ``(item[x_key], item[y_key])``;
    any other item is ``x`` alone.
    """

    def __init__(self, x, y=None, sample_weight=None):
        self._per_item = _is_sequence_of_examples(x)
        if self._per_item:
            if y is not None or sample_weight is not None:
                raise ValueError(
                    "When x is a sequence of examples, each item must hold its own label: "
                    "return (x, y) or (x, y, sample_weight) from __getitem__ and pass y=None."
                )
            self._data = x
            self.size = len(x)
            info = getattr(x, "dataset_info", None)
            self._keys = getattr(info, "supervised_keys", None)
            first = self._items([0])[0] if self.size else None
            self.structure = "tuple" if isinstance(first, tuple) else "x"
            return
        data = (x, y, sample_weight)
        arrays = [np.asarray(a) if not hasattr(a, "shape") else a for a in _leaves(data)]
        sizes = {int(a.shape[0]) if np.ndim(a) else -1 for a in arrays}
        if -1 in sizes:
            raise ValueError(
                "Every input array needs a leading example axis; got a scalar. Pass "
                "arrays shaped (N, ...), one row per example."
            )
        if len(sizes) != 1:
            raise ValueError(
                f"x, y and sample_weight must have the same number of examples; got sizes "
                f"{sorted(sizes)}. Pass arrays of equal length along axis 0."
            )
        self._data = _map(np.asarray, data)
        self.size = sizes.pop()

    @property
    def in_memory(self) -> bool:
        """Whether the examples are arrays (then :meth:`gather` gives one row per index
        whatever the indices), not items read one at a time."""
        return not self._per_item

    def gather(self, indices: np.ndarray):
        """(x, y, sample_weight) for ``indices``, batched along axis 0."""
        if not self._per_item:
            return _map(lambda a: a[indices], self._data)
        items = self._items(indices)
        if self.structure == "x":
            items = [(item,) for item in items]
        stacked = [_stack([item[k] for item in items]) for k in range(len(items[0]))]
        return tuple(stacked) + (None,) * (3 - len(stacked))

    def labels(self):
        """All labels ``y`` when they are held in memory (not per item), else None."""
        return None if self._per_item else self._data[1]

    def _items(self, indices) -> list:
        indices = [int(i) for i in indices]
        if hasattr(self._data, "__getitems__"):  # tfds sources read a batch at once
            items = list(self._data.__getitems__(indices))
        else:
            items = [self._data[i] for i in indices]
        if self._keys:
            items = [tuple(item[k] for k in self._keys) for item in items]
        return items


def _stream_kind(x) -> str | None:
    mro = [c.__name__ for c in type(x).__mro__]
    module = type(x).__module__ or ""
    if "PyDataset" in mro:
        return "keras.utils.PyDataset (its items are batches)"
    if module.startswith("tensorflow") and any("Dataset" in n for n in mro):
        return "tf.data.Dataset (a stream of batches)"
    if "DataLoader" in mro:
        return "torch DataLoader (a stream of batches)"
    if isinstance(x, collections.abc.Iterator):
        return "generator or iterator (a stream)"
    return None


def refuse_streams(x) -> None:
    """Data that cannot be sampled per example is refused before anything runs."""
    if inspect.isgeneratorfunction(x) or (callable(x) and not hasattr(x, "__getitem__")):
        raise ValueError(
            f"fit got a function ({getattr(x, '__name__', type(x).__name__)}), not data. "
            "DP fit samples examples itself, so it needs random access: pass numpy arrays "
            "(or a dict of arrays), or an object with __len__ and __getitem__(i) returning "
            "one example, not a generator or a function that makes one."
        )
    kind = _stream_kind(x)
    if kind is not None:
        raise ValueError(
            f"DP fit cannot sample a {kind}: the privacy guarantee needs each example to "
            "be drawn at random by keras_dp's sampler, with per-example random-access data. "
            "Pass numpy arrays (or a dict of arrays) as x and y, a tfds random-access source "
            "(tfds.data_source(...)), or any object with __len__ and __getitem__(i) "
            "returning ONE example."
        )


def _is_sequence_of_examples(x) -> bool:
    """Keras semantics first: arrays, dicts, tuples and lists of arrays are batched
    inputs; a list of tuples/dicts, or any other indexable, holds one example per item."""
    if isinstance(x, list):
        return len(x) > 0 and isinstance(x[0], (tuple, dict))
    if isinstance(x, (np.ndarray, dict, tuple)) or hasattr(x, "shape"):
        return False
    return hasattr(x, "__len__") and hasattr(x, "__getitem__")


def _is_column(tree) -> bool:
    """A list of strings or numbers is one column of values (as tf.data reads it)."""
    return isinstance(tree, list) and bool(tree) and isinstance(tree[0], (str, bytes, int, float))


def _leaves(tree):
    if tree is None:
        return []
    if _is_column(tree):
        return [tree]
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    if isinstance(tree, (tuple, list)):
        return [leaf for v in tree for leaf in _leaves(v)]
    return [tree]


def _map(fn, tree):
    if tree is None:
        return None
    if type(tree) is np.ndarray:  # the usual leaf, first: batches are gathered every update
        return fn(tree)
    if _is_column(tree):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map(fn, v) for v in tree)
    return fn(tree)


def _stack(items):
    first = items[0]
    if first is None:
        return None
    if isinstance(first, dict):
        return {k: _stack([it[k] for it in items]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([it[k] for it in items]) for k in range(len(first)))
    try:
        return np.stack([np.asarray(it) for it in items])
    except ValueError as err:
        raise ValueError(
            "Examples have different shapes (ragged input); pad them to one shape "
            "before fit (e.g. with the tokenizer's sequence_length)."
        ) from err
