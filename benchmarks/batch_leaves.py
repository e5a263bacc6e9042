"""A batch as one matrix or as its leaves, where Keras puts each leaf on the devices.

    python benchmarks/batch_leaves.py [--devices 2] [--repeats 6] [--out DIR]

On an accelerator, and under a ``keras.distribution``, Keras' JAX loop puts each leaf of
a batch on the devices in a call of its own (``jax.device_put``, or
``jax.make_array_from_process_local_data`` for a sharded batch). There keras_dp feeds
each batch as one uint32 matrix (``keras_dp.rows.pack_rows``) instead of its leaves
(``leaf_rows``: x, the mask-key rows, y and the weights). Measured here on ``--devices``
simulated CPU devices under ``DataParallel``, which takes that path:

- Keras' transfer of one batch (its ``_distribute_data``, as its loop calls it each
  step), µs, best of 5 × 2,000 calls: plain Keras' batch (x, y), keras_dp's as leaves,
  and as one matrix;
- ms per update through ``fit`` (epochs after the first, median over epochs and
  repeats), alternated in ABBA order: plain Keras, keras_dp with leaves, keras_dp as
  shipped (one matrix); host.py's logistic regression (a step of a few µs: the host's
  work) and the MLP 64-256-256-10, batch 64, digits (1,792 examples: plain Keras'
  sharded batches must divide the devices).

Writes ``batch_leaves.md`` and ``batch_leaves.json`` to --out. Not a test: nothing
here asserts a time. On one CPU without a distribution Keras hands the step numpy
arrays, and keras_dp keeps the leaves (``DPBatches``).
"""

import os
import sys

if __name__ == "__main__":
    devices = sys.argv[sys.argv.index("--devices") + 1] if "--devices" in sys.argv else "2"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import host  # noqa: E402
import jax  # noqa: E402
import keras  # noqa: E402
from keras.src.backend.jax import trainer as keras_trainer  # noqa: E402
from run import log  # noqa: E402
from step_time import digits_data, mlp  # noqa: E402

from keras_dp import data as dp_data  # noqa: E402
from keras_dp import rows as batch_rows  # noqa: E402

MODELS = {"logistic": host.logistic, "mlp": mlp}
KINDS = ("plain", "keras_dp, leaves", "keras_dp, one matrix")


def transfer_us(batch, calls: int = 2000) -> float:
    """Keras' per-step transfer of ``batch`` under the current distribution, µs."""
    distribution = keras.distribution.distribution()
    layouts = jax.tree.map(lambda a: distribution.get_data_layout(a.shape).backend_layout, batch)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            out = keras_trainer._distribute_data(batch, layouts)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def fit_ms(name: str, x, y, repeats: int) -> dict:
    """ms per update of each kind through fit, alternated."""
    host.logistic = MODELS[name]  # host.build builds it
    packed = dp_data.pack_rows
    times = {kind: [] for kind in KINDS}
    try:
        for r in range(repeats):
            for kind in KINDS if r % 2 == 0 else KINDS[::-1]:
                dp_data.pack_rows = dp_data.leaf_rows if kind.endswith("leaves") else packed
                times[kind] += host.one_fit(kind.split(",")[0], x, y)
    finally:
        dp_data.pack_rows = packed
    return {kind: statistics.median(t) * 1e3 for kind, t in times.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--out", default="benchmarks/results/batch-leaves")
    args = parser.parse_args()
    x, y = digits_data()
    x, y = x[:1792], y[:1792]
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices()[: args.devices])
    )
    model = host.build("keras_dp")
    batch = host.fitted_batches(model, x, y)[0]
    leaves = batch_rows.unpack_rows(batch)
    transfers = {
        "plain": transfer_us((x[:64], y[:64])),
        "keras_dp, leaves": transfer_us(leaves),
        "keras_dp, one matrix": transfer_us(batch),
    }
    log(f"transfers: {transfers}")
    fits = {}
    for name in MODELS:
        fits[name] = fit_ms(name, x, y, args.repeats)
        log(f"{name}: {fits[name]}")
    rows = len(leaves[1])
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {args.devices} simulated "
        f"CPU devices (DataParallel); jax {jax.__version__}, keras {keras.__version__}",
        "",
        "    python benchmarks/batch_leaves.py " + " ".join(sys.argv[1:]),
        "",
        f"Keras' transfer of one batch, µs (keras_dp's: {rows} rows, the Poisson batch's):",
        "",
        "| batch | µs |",
        "|---|---|",
        *(f"| {kind} | {us:.0f} |" for kind, us in transfers.items()),
        "",
        "ms per update through fit (epochs after the first, median), alternated:",
        "",
        "| model | plain | keras_dp, leaves | keras_dp, one matrix | one matrix / leaves "
        "| leaves / plain | one matrix / plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, ms in fits.items():
        plain, leaf, one = (ms[kind] for kind in KINDS)
        lines.append(
            f"| {name} | {plain:.3f} | {leaf:.3f} | {one:.3f} | **{one / leaf:.2f}×** "
            f"| {leaf / plain:.2f}× | **{one / plain:.2f}×** |"
        )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "batch_leaves.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "batch_leaves.json"), "w") as f:
        json.dump({"transfers_us": transfers, "fit_ms": fits, "rows": rows}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
