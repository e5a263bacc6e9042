"""Host work per update: a fit step whose compiled step is negligible, DP vs plain.

    python benchmarks/host.py [--repeats 3] [--out benchmarks/results]

A logistic regression on digits (Dense 64→10, 650 parameters, batch 64) compiles to a
step of a few tens of µs, so a fit step here is the host's work: drawing and gathering
the batch, handing it to the step, dispatching it, Keras' loop. A small model's step on
a GPU is like this one (benchmarks/README.md, H200). Fits alternate:

- ``plain``: Keras' own fit;
- ``keras_dp``: DP fit as shipped;
- ``keras_dp, Keras' adapter``: the batches through Keras' ``PyDatasetAdapter`` (which
  passes every leaf through a converter) instead of keras_dp's;
- ``keras_dp, one cached batch``: the sampler's work taken out (every update fed the
  first batch again): what is left is dispatch and Keras' loop.
- ``keras_dp, made ahead on a thread``: the batches made in order on one worker thread,
  two ahead (a candidate for a GPU host; slower on this 2-core CPU: 1.76-2.27x plain
  against 1.41-1.68x for keras_dp as shipped, three alternated pairs).
- ``keras_dp, leaves``: each batch as its leaves (``keras_dp.rows.leaf_rows``: x, the
  mask-key rows, y), where keras_dp feeds one matrix (``pack_rows``): on an accelerator
  or under a ``keras.distribution``, where Keras' JAX loop puts each leaf on the devices
  in a call of its own (65-80 us a leaf on the H200 machine). On one CPU keras_dp
  feeds leaves itself, so this kind is ``keras_dp`` again.
- ``plain, verbose=1`` and ``keras_dp, verbose=1``: the two fits with the progress bar
  (written to a buffer), as a notebook runs them; the others are ``verbose=0``.

A step's time is (epoch wall time / updates) for every epoch after the first, median
over epochs and repeats. Also timed alone (best of 5 × 2,000 calls): the sampler's draw
(``keras_dp.data.draw_indices``) and a whole batch (``DPBatches.__getitem__``). Writes
``host.md`` and ``host.json`` to --out. Not a test: nothing here asserts a time.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import collections  # noqa: E402
import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
from clipping import EpochTimer  # noqa: E402
from run import LOSS, log  # noqa: E402
from step_time import digits_data  # noqa: E402

import keras_dp  # noqa: E402
from keras_dp import _keras  # noqa: E402
from keras_dp import data as dp_data  # noqa: E402
from keras_dp import rows as batch_rows  # noqa: E402

logging.getLogger("keras_dp").setLevel(logging.ERROR)
BATCH, EPOCHS = 64, 8
KINDS = (
    "plain",
    "keras_dp",
    "keras_dp, Keras' adapter",
    "keras_dp, one cached batch",
    "keras_dp, made ahead on a thread",
    "keras_dp, leaves",
    "plain, verbose=1",
    "keras_dp, verbose=1",
)


def logistic():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])


def build(kind: str) -> keras.Model:
    model = logistic()
    if kind != "plain":
        config = keras_dp.DPConfig(target_epsilon=8.0, batch_size=BATCH, epochs=EPOCHS)
        model = keras_dp.make_private(model, config)
    model.compile(optimizer="adam", loss=LOSS)
    return model


class _AheadAdapter(_keras.BatchesAdapter):
    """keras_dp's adapter whose batches are made in order on one worker thread, up to
    two before they are taken (a candidate for overlapping the draw and gather with
    the host's other work; not what keras_dp ships)."""

    def get_jax_iterator(self):
        batches = self.py_dataset
        pool = concurrent.futures.ThreadPoolExecutor(1)
        pending = collections.deque()
        count = batches.num_batches
        try:
            for i in range(count):
                while len(pending) < 2 and i + len(pending) < count:
                    pending.append(pool.submit(batches.__getitem__, i + len(pending)))
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


class _Swapped:
    """Within the block, ``kind``'s change to keras_dp's data path."""

    def __init__(self, kind: str):
        self.kind = kind

    def __enter__(self):
        self.saved = dp_data.adapter, dp_data.DPBatches.__getitem__, dp_data.pack_rows
        if self.kind == "keras_dp, made ahead on a thread":
            dp_data.adapter = lambda b: _AheadAdapter(b, shuffle=False)
        if self.kind == "keras_dp, leaves":
            dp_data.pack_rows = dp_data.leaf_rows
        if self.kind == "keras_dp, Keras' adapter":
            dp_data.adapter = lambda b: _keras.PyDatasetAdapter(b, shuffle=False)
        if self.kind == "keras_dp, one cached batch":
            getitem, first = self.saved[1], {}

            def cached(batches, index):
                if "batch" not in first:
                    first["batch"] = getitem(batches, index)
                else:
                    batches._next_step += 1
                return first["batch"]

            dp_data.DPBatches.__getitem__ = cached

    def __exit__(self, *exc):
        dp_data.adapter, dp_data.DPBatches.__getitem__, dp_data.pack_rows = self.saved


def one_fit(kind: str, x, y) -> list:
    base, _, shown = kind.partition(", verbose=")
    model = build("plain" if base == "plain" else kind)
    timer = EpochTimer()
    kwargs = {"batch_size": BATCH, "epochs": EPOCHS} if base == "plain" else {}
    with _Swapped(kind), contextlib.redirect_stdout(io.StringIO()):
        model.fit(x, y, verbose=int(shown or 0), callbacks=[timer], **kwargs)
    return [s / k for s, k in zip(timer.seconds[1:], timer.steps[1:])]


def best_us(fn, calls: int = 2000) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for i in range(calls):
            fn(i)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def fitted_batches(model, x, y) -> dp_data.DPBatches:
    """The ``DPBatches`` that one epoch of ``model``'s DP fit drew from."""
    made = []
    init = dp_data.DPBatches.__init__

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    dp_data.DPBatches.__init__ = keep
    try:
        model.fit(x, y, verbose=0, epochs=1)
    finally:
        dp_data.DPBatches.__init__ = init
    return made[0]


def alone(x, y) -> dict:
    """The sampler's draw and one whole batch, timed alone."""
    model = build("keras_dp")
    batches, config, seed = fitted_batches(model, x, y), model.dp_config, model._dp_seed
    return {
        "draw_us": best_us(lambda i: dp_data.draw_indices(config, seed, i)),
        "batch_us": best_us(lambda i: batches[i]),
        "rows": len(batch_rows.unpack_rows(batches[0])[0]["dp_mask_key"]),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    x, y = digits_data()
    n = len(y) - len(y) % BATCH
    x, y = x[:n], y[:n]
    one_fit("plain", x, y)  # warm the process
    runs = {kind: [] for kind in KINDS}
    for _ in range(args.repeats):
        for kind in KINDS:
            runs[kind].extend(one_fit(kind, x, y))
            log(f"{kind}: {statistics.median(runs[kind]) * 1e3:.3f} ms/step")
    ms = {kind: 1e3 * statistics.median(r) for kind, r in runs.items()}
    parts = alone(x, y)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {jax.default_backend()}"
    lines = [
        f"Machine: {machine}; jax {jax.__version__}, keras {keras.__version__}",
        "",
        f"    python benchmarks/host.py --repeats {args.repeats}",
        "",
        "Logistic regression on digits (Dense 64→10), batch 64: ms per update through fit "
        "(epochs after the first, median), alternated fits.",
        "",
        "| fit | ms/update | / plain |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} | {v / ms['plain']:.2f}× |" for k, v in ms.items()]
    lines += [
        "",
        f"Alone (best of 5 × 2,000 calls): the sampler's draw {parts['draw_us']:.0f} µs; "
        f"a whole batch of {parts['rows']} rows (draw, layout, gather) "
        f"{parts['batch_us']:.0f} µs.",
    ]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "host.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "host.json"), "w") as f:
        json.dump({"ms_per_update": ms, "alone": parts, "machine": machine}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
