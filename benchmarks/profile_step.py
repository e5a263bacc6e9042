"""Where a train step's time goes: one compiled step of each library, outside ``fit``.

    python benchmarks/profile_step.py [--models gemma-full] [--repeats 7]
                                      [--rows 8 12 15 16 17 20 24]

For each model, plain Keras, keras_dp and jax-privacy (each at its default
``microbatch_size``) are built and trained for one epoch, then the train step each
installs is compiled for one batch of exactly B real rows (keras_dp's Poisson
layout: B real rows, then padding). Printed for each:

- XLA's memory analysis (peak temporary memory) and cost analysis (FLOPs and bytes
  accessed; a loop body is counted once, so keras_dp's chunk loop shows one chunk);
- the median time of the compiled step alone, the three alternated.

``--rows`` then times keras_dp's step at other real-row counts in the same physical
batch: the step's cost against the rows a Poisson draw holds (the padding after
them is not computed).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keras-hub imports TensorFlow

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from run import MODELS, build, jit_step, log, train_state  # noqa: E402

from keras_dp import data as dp_data  # noqa: E402
from keras_dp import noise, sampling  # noqa: E402
from keras_dp import rows as batch_rows  # noqa: E402
from keras_dp import step as dp_step  # noqa: E402

KINDS = ("plain", "keras_dp", "jax_privacy")


def trained(kind: str, name: str, x, y):
    """The model after one epoch (variables, optimizer and metrics all built)."""
    batch = MODELS[name][2]
    model = build(kind, name, len(y))
    kwargs = {} if kind == "keras_dp" else {"batch_size": batch}
    with contextlib.redirect_stdout(io.StringIO()):
        model.fit(x, y, epochs=1, verbose=0, **kwargs)
    return model


def dp_batch(model, x, y, real: int, physical: int | None = None):
    """keras_dp's physical batch (or ``physical`` rows) with the first ``real``
    examples as its real rows, as fit feeds it on one CPU (:func:`keras_dp.rows.leaf_rows`)."""
    config = model.dp_config
    source = sampling.ExampleSource(x, y)
    if physical is None:
        chunk = dp_step.chunk_size(config, 1, model)
        physical = dp_data.DPBatches(model, source, config, chunk, 1).physical
    padded, mask = sampling.shard_layout(np.arange(real), physical, 1)
    xs, ys, _ = source.gather(padded)
    key = noise.step_key_data(model._dp_seed, [0])[0]
    return batch_rows.leaf_rows(xs, ys, None, mask, key)


def compiled_step(model, batch):
    batch = jax.tree.map(jax.numpy.asarray, batch)
    state = train_state(model)
    return jit_step(model).lower(state, batch).compile(), state, batch


def seconds(step, state, batch) -> float:
    start = time.perf_counter()
    jax.block_until_ready(step(state, batch))
    return time.perf_counter() - start


def profile(name: str, repeats: int, rows: list) -> None:
    x, y = MODELS[name][1]()
    b = MODELS[name][2]
    n = len(y) - len(y) % b
    x, y = jax.tree.map(lambda a: a[:n], x), y[:n]
    first = (jax.tree.map(lambda a: a[:b], x), y[:b])
    models = {kind: trained(kind, name, x, y) for kind in KINDS}
    steps = {
        kind: compiled_step(model, dp_batch(model, x, y, b) if kind == "keras_dp" else first)
        for kind, model in models.items()
    }
    times = {kind: [] for kind in KINDS}
    for _ in range(repeats):  # alternated
        for kind in KINDS:
            times[kind].append(seconds(*steps[kind]))
    log(f"\n{name}, B={b}, one compiled train step with {b} real rows:\n")
    log("| | ms/step | temp memory | bytes accessed | GFLOP (loop body once) |")
    log("|---|---|---|---|---|")
    plain = statistics.median(times["plain"])
    for kind in KINDS:
        compiled = steps[kind][0]
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        t = statistics.median(times[kind])
        log(
            f"| {kind} | {t * 1e3:.1f} ({t / plain:.2f}× plain) | "
            f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:.0f} MiB | "
            f"{cost.get('bytes accessed', 0) / 2**30:.2f} GiB | {cost.get('flops', 0) / 1e9:.1f} |"
        )
    if rows:
        dp = models["keras_dp"]
        step = jit_step(dp)
        state = train_state(dp)
        batches = {r: dp_batch(dp, x, y, r) for r in rows}
        for r in rows:  # compiles once; each count's loop trip counts are traced values
            jax.block_until_ready(step(state, batches[r]))
        per = {
            r: statistics.median(seconds(step, state, batches[r]) for _ in range(repeats))
            for r in rows
        }
        slope, intercept = np.polyfit(list(per), list(per.values()), 1)
        log(f"\nkeras_dp step by real rows (physical batch {len(batches[rows[0]][1])}):\n")
        log("| real rows | " + " | ".join(str(r) for r in rows) + " |")
        log("|---" * (len(rows) + 1) + "|")
        log("| ms | " + " | ".join(f"{per[r] * 1e3:.0f}" for r in rows) + " |")
        log(f"\nLeast squares: {intercept * 1e3:.1f} ms + {slope * 1e3:.2f} ms per real row.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gemma-full"], choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", nargs="*", type=int, default=[8, 12, 15, 16, 17, 20, 24])
    args = parser.parse_args()
    for name in args.models:
        profile(name, args.repeats, args.rows)


if __name__ == "__main__":
    main()
