"""What ``fit`` feeds the train step: the user's examples, sampled as the plan says.

Per-example data is kept host-side (numpy) and drawn by
:mod:`keras_dp.sampling` one update at a time; a keras-hub task's preprocessor
is applied once, example by example, before any sampling (preprocessing one
example never looks at another, so it does not change the neighbouring relation).
"""

from __future__ import annotations

import logging

import keras
import numpy as np

from keras_dp import _backend, accounting, distribute, noise, sampling
from keras_dp._keras import BatchesAdapter
from keras_dp.config import DPConfig
from keras_dp.rows import leaf_rows, pack_rows
from keras_dp.user_data import UserSource

logger = logging.getLogger(__name__)


def preprocess(preprocessor, source: sampling.ExampleSource, chunk: int = 1024):
    """``source`` run through a keras-hub preprocessor, as a new in-memory source.

    The preprocessor maps raw inputs (e.g. ``{"prompts", "responses"}`` strings)
    to model inputs, labels and sample weights, ``chunk`` examples at a time.
    """
    parts = []
    for start in range(0, source.size, chunk):
        stop = min(start + chunk, source.size)
        x, y, sw = source.gather(np.arange(start, stop))
        out = keras.utils.unpack_x_y_sample_weight(preprocessor(x, y, sw))
        out = [None if a is None else keras.tree.map_structure(np.asarray, a) for a in out]
        rows = {int(np.shape(a)[0]) for a in keras.tree.flatten(out) if a is not None}
        if rows != {stop - start}:
            raise ValueError(
                f"The preprocessor turned {stop - start} examples into {sorted(rows)} rows. "
                "DP training needs exactly one row per example (the privacy unit): an "
                "example split into several rows would be sampled and clipped as several. "
                "Use a preprocessor that maps each example to one row (e.g. truncate "
                "instead of splitting long texts). Nothing was trained."
            )
        parts.append(out)
    joined = [
        None if part is None else keras.tree.map_structure(lambda *a: np.concatenate(a), *column)
        for part, column in zip(parts[0], zip(*parts))
    ]
    return sampling.ExampleSource(*joined)


def preprocess_all(preprocessor, validation_data):
    """``validation_data`` (raw, or a ``(x, y[, sample_weight])`` tuple) preprocessed."""
    if isinstance(validation_data, tuple):
        source = sampling.ExampleSource(*validation_data)
    else:
        source = sampling.ExampleSource(validation_data)
    processed = preprocess(preprocessor, source)
    x, y, sw = processed.gather(np.arange(processed.size))
    return tuple(a for a in (x, y, sw) if a is not None)


class DPBatches(keras.utils.PyDataset):
    """Batches drawn by the config's sampler: (({"dp_x", "dp_mask_key"}, y, w))
    (:func:`leaf_rows`), or, where Keras puts each leaf of a batch on the devices
    itself (an accelerator, a ``keras.distribution``), the same in one matrix
    (:func:`pack_rows`; the step reads either, :func:`keras_dp.rows.unpack_rows`).

    ``dp_mask_key`` holds each row's mask and the data of the
    update's noise key (:func:`keras_dp.noise.step_key_data` of the secret seed and the
    update's number in the ledger), which keys the update's noise.

    Every batch has ``physical`` rows (the truncation bound's, padded), or, with
    ``usual`` (:func:`keras_dp.step.usual_rows`), ``usual_physical`` rows whenever
    the draw holds at most ``usual`` examples.
    """

    def __init__(
        self,
        model,
        source,
        config: DPConfig,
        chunk: int,
        per_epoch: int,
        usual: int | None = None,
    ):
        super().__init__()
        self._model, self._source, self._config, self._per_epoch = model, source, config, per_epoch
        b_max = config.max_batch_size or _untruncated_bound(config)
        self._shards, _ = distribute.batch_shards()
        self._chunk = chunk
        self.physical = self._physical(b_max)
        self.usual = None
        if usual is not None:
            rows = sampling.physical_batch_size(usual, 1, self._shards)
            if rows < self.physical:
                self.usual, self.usual_physical = usual, rows
        self._usual_exceeded = False
        # One leaf a batch where Keras puts each on the devices itself (pack_rows).
        self._packs = not _backend.on_cpu() or keras.distribution.distribution() is not None
        self._next_step = model._dp_ledger.steps
        self._keys = (None, 0, np.zeros((0, 2), np.uint32))  # (seed, first step, data)
        self._streams = None

    def _physical(self, rows: int) -> int:
        """Rows fed for a draw of up to ``rows``: shards of whole chunks of the size
        the train step will use (:func:`keras_dp.step.step_chunk`), so no row is left out."""
        per_shard = -(-rows // self._shards)
        return sampling.physical_batch_size(rows, min(self._chunk, per_shard), self._shards)

    def padding_batch(self):
        """A batch of the usual shape (the bound's without ``usual``) holding padding
        rows only, and a zero noise key: what fit compiles its step for ahead of Keras'
        loop. Nothing is drawn: only its shapes and dtypes are read."""
        step = self._next_step
        key_data = np.zeros_like(self._key_data(self._model._dp_seed, step))
        return self._batch(step, np.zeros(0, np.int64), key_data)

    def resume_at(self, step: int) -> None:
        """Draws the next batch for update ``step`` (after a checkpoint was restored)."""
        self._next_step = step

    def steps_this_fit(self, epochs: int) -> int:
        return min(epochs * self._per_epoch, self._config.steps - self._model._dp_ledger.spent)

    @property
    def num_batches(self) -> int:
        return self._per_epoch

    def __len__(self) -> int:
        return self._per_epoch

    def __getitem__(self, index):
        step = self._next_step
        self._next_step += 1
        seed = self._model._dp_seed
        if self._streams is None or self._streams.seed != seed:
            self._streams = sampling.StepStreams(seed)
        partition = self._model._dp_ledger.partition_seed
        indices = draw_indices(self._config, seed, step, partition, self._streams.at(step))
        return self._batch(step, indices, self._key_data(seed, step))

    def _batch(self, step: int, indices: np.ndarray, key_data: np.ndarray):
        """Update ``step``'s batch of the examples ``indices``, keyed by ``key_data``."""
        seed = self._model._dp_seed
        physical = self._rows_for(len(indices), step)
        padded, mask = sampling.shard_layout(indices, physical, self._shards)
        mine = distribute.local_rows(physical)  # all rows, unless several processes
        mask = mask[mine]
        inner = None
        if isinstance(self._source, UserSource):  # a row is a user's block of examples
            rng = np.random.default_rng([seed, step, 0x05E2])
            (x, y, sw), inner = self._source.gather(indices, rng, physical, self._shards)
            x, y, sw, inner = (
                None if a is None else keras.tree.map_structure(lambda b: b[mine], a)
                for a in (x, y, sw, inner)
            )
        else:
            x, y, sw = self._source.gather(padded[mine])
        rows = len(mask)
        if not getattr(self._source, "in_memory", False):  # items read one at a time
            _check_rows((x, y, sw), rows)
        extra = {} if inner is None else {"dp_inner": inner}
        return (pack_rows if self._packs else leaf_rows)(x, y, sw, mask, key_data, **extra)

    def _rows_for(self, count: int, step: int) -> int:
        """Rows fed for a draw of ``count`` examples: the usual size when it holds them,
        else the bound's (a larger step, compiled once), else (untruncated Poisson
        beyond the bound) enough for the draw."""
        physical = self.physical
        if self.usual is not None:
            if count <= self.usual:
                return self.usual_physical
            if not self._usual_exceeded:
                self._usual_exceeded = True
                logger.info(
                    "Update %d draws %d examples, more than the usual %d: the step is "
                    "compiled (once) for %d rows.",
                    step,
                    count,
                    self.usual,
                    physical,
                )
        if count > physical:
            logger.warning(
                "Poisson draw of %d rows exceeds %d; compiling a larger step.", count, physical
            )
            physical = self._physical(count)
        return physical

    def _key_data(self, seed: int, step: int) -> np.ndarray:
        """The noise key's data of update ``step``, hashed for 256 updates at a time."""
        cached, first, data = self._keys
        if cached != seed or not first <= step < first + len(data):
            data = noise.step_key_data(seed, np.arange(step, step + _KEYS_AT_ONCE))
            self._keys = (seed, step, data)
            first = step
        return data[step - first]


_KEYS_AT_ONCE = 256  # NumPy's hash of 256 counters costs what one does


def _check_rows(batch, rows: int) -> None:
    got = {int(np.shape(a)[0]) for a in keras.tree.flatten(batch) if a is not None}
    if got != {rows}:
        raise ValueError(
            f"The data source returned {sorted(got)} rows for {rows} requested indices "
            "(repeated indices included: padding repeats example 0). Its "
            "__getitems__/__getitem__ must return one item per index, in order."
        )


def draw_indices(
    config: DPConfig, seed: int, step: int, partition_seed: int | None = None, rng=None
) -> np.ndarray:
    """The examples of update ``step``, drawn as the config's sampler says from ``rng``
    (default :func:`keras_dp.sampling.step_rng` of ``seed`` and ``step``; the same
    stream from :class:`keras_dp.sampling.StepStreams`).

    Correlated noise (``bands > 1``) samples cyclically from groups drawn with
    ``partition_seed`` (the ledger's, fixed for the weights' lineage).
    """
    if rng is None:
        rng = sampling.step_rng(seed, step)
    if config.correlated:
        if partition_seed is None:
            raise ValueError("Internal: cyclic Poisson sampling needs the partition seed.")
        groups = sampling.cyclic_groups(partition_seed, config.dataset_size, config.bands)
        return sampling.cyclic_poisson_indices(rng, groups, step, config.group_probability)
    if config.sampling == "fixed":
        return sampling.fixed_indices(rng, config.dataset_size, config.batch_size)
    return sampling.poisson_indices(
        rng, config.dataset_size, config.sampling_probability, config.max_batch_size
    )


def adapter(batches: DPBatches) -> BatchesAdapter:
    """``batches`` as Keras' adapter for a PyDataset, in order (no shuffling).

    Passing the adapter tells Keras the batches are already this process's share
    (its multi-process check would otherwise ask for a tf.data.Dataset).
    """
    return BatchesAdapter(batches, shuffle=False)


def _untruncated_bound(config: DPConfig) -> int:
    """Physical rows for untruncated Poisson: exceeded with chance ≤ 1e-6·δ per run."""
    return accounting.truncated_batch_size(
        config.dataset_size, config.sampling_probability, config.steps, 1e-4 * config.delta
    )


def class_weights_as_sample_weight(class_weight: dict, y, sample_weight=None) -> np.ndarray:
    """``fit(class_weight=...)`` as one weight per example (times any ``sample_weight``).

    A weight that is a fixed function of the example's own label does not change the
    neighbouring relation, and each weighted gradient is still clipped to C.
    """
    if y is None or isinstance(y, dict) or not hasattr(np.asarray(y), "shape"):
        raise ValueError(
            "fit(class_weight=...) needs the labels y as one array; pass sample_weight= "
            "per example instead."
        )
    labels = np.asarray(y)
    if labels.ndim > 1 and labels.shape[-1] > 1:  # one-hot
        labels = labels.argmax(-1)
    labels = labels.reshape(len(labels), -1)[:, 0]
    missing = sorted({int(c) for c in np.unique(labels)} - {int(c) for c in class_weight})
    if missing:
        raise ValueError(
            f"fit(class_weight=...) has no weight for classes {missing[:10]}; give every "
            "class a weight."
        )
    weights = np.asarray([class_weight[int(c)] for c in labels], np.float32)
    return weights if sample_weight is None else weights * np.asarray(sample_weight, np.float32)
