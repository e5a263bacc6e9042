"""A batch's rows as the DP step takes them: as leaves, or as one uint32 matrix.

:class:`keras_dp.data.DPBatches` lays each batch out with :func:`leaf_rows` on one CPU
and with :func:`pack_rows` where Keras puts each leaf of a batch on the devices itself;
the step reads either (:func:`unpack_rows`). Nothing here changes a value: the matrix
holds each array's bits.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np


def split_mask_key(mask_key):
    """(the rows' bool mask, the rows' key data) of a ``dp_mask_key`` leaf (numpy or
    traced)."""
    return mask_key[:, 0].astype(bool), mask_key[:, 1:]


def leaf_rows(x, y, sw, mask: np.ndarray, key_data: np.ndarray, **leaves) -> tuple:
    """A batch as fit feeds the step on one CPU: ``({"dp_x", "dp_mask_key", **leaves},
    y[, sw])``, the ``dp_mask_key`` rows holding each row's mask (1 real, 0 padding)
    then the update's noise key data (the same in every row, so it shards like the
    rows). There Keras hands the numpy arrays to the jitted step, which takes each
    leaf in a few µs (:func:`pack_rows` measured 0-8% slower through fit on the MLP)."""
    key_rows = np.broadcast_to(np.asarray(key_data, np.uint32), (len(mask), len(key_data)))
    mask_key = np.concatenate([np.asarray(mask, np.uint32)[:, None], key_rows], axis=1)
    return _tuple({"dp_x": x, "dp_mask_key": mask_key, **leaves}, y, sw)


# The key of a batch's one matrix of rows (:func:`pack_rows`).
ROWS = "dp_rows"
_NAME = re.compile(r"\w+")


def pack_rows(x, y, sw, mask: np.ndarray, key_data: np.ndarray, **leaves) -> tuple:
    """A batch as fit feeds the step: ``({ROWS: {layout: matrix}, ...},)``.

    One uint32 matrix [rows, columns] holds, side by side, every array of 32-bit
    numbers or booleans with one row per batch row (x, or each array of a dict x such
    as keras-hub's ``token_ids`` and ``padding_mask``; y; the sample weights), then
    the ``dp_mask_key`` rows (:func:`leaf_rows`). Keras' JAX loop on an accelerator,
    and under a ``keras.distribution``, puts each leaf of a batch on the devices in a
    call of its own (65-80 µs each on the H200 machine, whatever its size up to a
    batch); this is one. On 2 CPU devices (``DataParallel``) the MLP's batch took
    409 → 142 µs a step that way, and a step through fit 3.01 → 2.72 ms. Arrays are
    laid out with the dtype JAX would give them (float64 → float32, int64 → int32
    unless 64-bit mode is on); any other stays a leaf of its own (``dp_x``, ``dp_y``,
    ``dp_sw``), as do ``leaves``. The matrix's key (``layout``) names each array's
    columns, dtype and shape, so a step traced for one layout is never fed another.
    :func:`unpack_rows` undoes it, bit for bit."""
    if isinstance(x, dict) and all(isinstance(k, str) and _NAME.fullmatch(k) for k in x):
        items = [(f"x/{k}", v) for k, v in x.items()]
    else:
        items = [("x", x)]
    items += [("y", y), ("sw", sw)]
    rows = len(mask)
    signature = tuple((name, *_kind(value, rows)) for name, value in items)
    layout, columns, width = _plan(signature, len(key_data))
    matrix = np.empty((rows, width), np.uint32)
    out = dict(leaves)
    for (name, value), where in zip(items, columns):
        if where is None:
            if value is not None and not name.startswith("x/"):
                out[_KEPT[name]] = value
            continue
        value = value.reshape(rows, -1)
        if value.dtype.kind == "f":  # its bits (32-bit floats: JAX's float64 → float32)
            value = np.ascontiguousarray(value, np.float32).view(np.uint32)
        matrix[:, where] = value  # integers and booleans: their bits modulo 2³²
    kept_x = {n[2:]: v for (n, v), w in zip(items, columns) if n.startswith("x/") and w is None}
    if kept_x:
        out["dp_x"] = kept_x
    matrix[:, width - 1 - len(key_data)] = mask
    matrix[:, width - len(key_data) :] = np.asarray(key_data, np.uint32)
    out[ROWS] = {layout: matrix}
    return (out,)


_KEPT = {"x": "dp_x", "y": "dp_y", "sw": "dp_sw"}


def _kind(value, rows: int) -> tuple:
    """(dtype the step sees, trailing shape) of an array that packs, else (None, None)."""
    if not isinstance(value, np.ndarray) or value.ndim < 1 or value.shape[0] != rows:
        return None, None
    dtype = _canonical(value.dtype)
    if dtype.kind == "b" or (dtype.itemsize == 4 and dtype.kind in "fiu"):
        return dtype, value.shape[1:]
    return None, None


@functools.cache
def _canonical(dtype: np.dtype) -> np.dtype:
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


@functools.lru_cache(maxsize=64)
def _plan(signature: tuple, key_words: int) -> tuple:
    """(layout, each item's columns or None, width) for :func:`pack_rows`' items."""
    layout, columns, start = [], [], 0
    for name, dtype, shape in signature:
        if dtype is None:
            columns.append(None)
            continue
        width = math.prod(shape)
        layout.append(f"{name}:{dtype.name}:{'x'.join(str(d) for d in shape)}:{start}")
        columns.append(slice(start, start + width))
        start += width
    layout.append(f"mk:uint32:{1 + key_words}:{start}")
    return ";".join(layout), tuple(columns), start + 1 + key_words


def unpack_rows(data):
    """The batch that :func:`pack_rows` packed (numpy or traced), as it was before;
    any other ``data`` as it is. Keys added to the packed x since (``dp_noise``) stay
    in x."""
    outer = data[0] if isinstance(data, tuple) and len(data) == 1 else data
    if not isinstance(outer, dict) or ROWS not in outer:
        return data
    ((layout, matrix),) = outer[ROWS].items()
    found = {}
    for entry in filter(None, layout.split(";")):
        name, dtype, shape, start = entry.split(":")
        shape = tuple(int(d) for d in shape.split("x")) if shape else ()
        columns = matrix[:, int(start) : int(start) + math.prod(shape)]
        if dtype == "bool":
            value = columns != 0
        elif isinstance(columns, np.ndarray):
            value = np.ascontiguousarray(columns).view(dtype)
        else:
            value = jax.lax.bitcast_convert_type(columns, jnp.dtype(dtype))
        found[name] = value.reshape(matrix.shape[0], *shape)
    x = found.get("x", outer.get("dp_x"))
    if any(name.startswith("x/") for name in found):
        x = {**(x or {}), **{n[2:]: v for n, v in found.items() if n.startswith("x/")}}
    packed = {k: v for k, v in outer.items() if k not in (ROWS, "dp_y", "dp_sw")}
    packed["dp_x"], packed["dp_mask_key"] = x, found["mk"]
    y, sw = found.get("y", outer.get("dp_y")), found.get("sw", outer.get("dp_sw"))
    return _tuple(packed, y, sw)


def _tuple(x, y, sw) -> tuple:
    """(x, y, sw) without its trailing Nones: a batch as Keras' loop passes it."""
    if sw is not None:
        return x, y, sw
    return (x, y) if y is not None else (x,)
