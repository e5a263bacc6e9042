"""DP training under ``keras.distribution``: one guarantee on 1 or N devices.

The physical batch is sharded over the mesh's batch axis. Each device clips and
sums the rows it holds (see :func:`keras_dp.clipping.clipped_sum`); the per-device
sums are reduced, and the noise is drawn ONCE for the global sum, from a key that
is the same on every device (JAX's random numbers do not depend on how an array
is sharded). The sample, the noise and hence ε are those of a single-device run.

Several processes (``jax.distributed.initialize``) share one secret seed, so each
draws the same global sample and feeds only the rows its devices hold.
"""

from __future__ import annotations

import hashlib

import jax
import keras
import numpy as np


def batch_shards() -> tuple[int, str | None]:
    """(devices along the batch axis, that axis' name) of the current distribution."""
    distribution = keras.distribution.distribution()
    mesh = getattr(distribution, "device_mesh", None)
    name = getattr(distribution, "batch_dim_name", None)
    if mesh is None or name is None:
        return 1, None
    size = int(mesh.shape[list(mesh.axis_names).index(name)])
    return size, (name if size > 1 else None)


def batch_mesh():
    """The ``jax.sharding.Mesh`` of the current distribution, or None."""
    distribution = keras.distribution.distribution()
    mesh = getattr(distribution, "device_mesh", None)
    return None if mesh is None else mesh.backend_mesh


def local_rows(physical: int) -> slice:
    """The rows of a ``physical``-row global batch that this process feeds."""
    distribution = keras.distribution.distribution()
    if distribution is None or jax.process_count() == 1:
        return slice(0, physical)
    sharding = distribution.get_data_layout((physical,)).backend_layout
    spans = sorted(
        {
            (index[0].start or 0, physical if index[0].stop is None else index[0].stop)
            for index in sharding.addressable_devices_indices_map((physical,)).values()
        }
    )
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        if stop != start:
            raise ValueError(
                "This process's devices hold non-contiguous parts of the batch; order the "
                "DeviceMesh's devices by process (keras.distribution.list_devices() does)."
            )
    return slice(spans[0][0], spans[-1][1])


def shared_seed(seed: int) -> int:
    """``seed`` as process 0 has it, in every process (itself in a single process)."""
    if jax.process_count() == 1:
        return seed
    from jax.experimental import multihost_utils

    words = np.asarray([seed >> 32, seed & 0xFFFFFFFF], dtype=np.uint32)
    high, low = (int(w) for w in np.asarray(multihost_utils.broadcast_one_to_all(words)))
    return (high << 32) | low


def check_processes_agree(dataset_size: int, first_draw) -> None:
    """Refuses to train when processes disagree on N or on the first sampled batch.

    Every process draws the global sample itself; a different dataset size, data
    order or random stream would duplicate or drop rows across shards and account
    under the wrong N. ``first_draw`` is a callable returning the examples (arrays)
    of the first update's draw; their digest and N are broadcast from process 0 and
    compared before any noise.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    hasher = hashlib.sha256()
    for leaf in keras.tree.flatten(first_draw()):
        if leaf is not None:
            hasher.update(np.ascontiguousarray(leaf).tobytes())
    digest = np.frombuffer(hasher.digest()[:8], np.uint32)
    mine = np.concatenate([[dataset_size % 2**32], digest]).astype(np.uint32)
    theirs = np.asarray(multihost_utils.broadcast_one_to_all(mine))
    if not np.array_equal(mine, theirs):
        what = "dataset size" if mine[0] != theirs[0] else "first sampled batch"
        raise ValueError(
            f"Process {jax.process_index()} disagrees with process 0 on the {what} "
            f"(N={dataset_size} here, {int(theirs[0])} on process 0). Every process must "
            "pass the same full dataset, in the same order, with the same DPConfig; each "
            "feeds only its own devices' rows. Nothing was trained."
        )
