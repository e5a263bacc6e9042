"""The first (compiling) epoch with and without the collector paused during the trace.

    python benchmarks/first_epoch_gc.py [--model mlp] [--repeats 6] [--hub]

keras_dp runs the first call of Keras' train function (the DP step's trace and
compile) with Python's cyclic garbage collector paused
(``keras_dp.step.paused_gc_on_first_call``). In one process, after a first DP fit (as in
a notebook that builds a second model), fits of a fresh model alternate: the pause as
shipped, and the train function left as Keras makes it. Printed per fit: the first
epoch's wall time and the durations of the full (generation 2) collections that ran
inside it. ``--hub`` imports keras-hub (and so TensorFlow) first, whose objects make
a full collection longer. Not a test: nothing here asserts a time.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import clipping  # noqa: E402
from run import log  # noqa: E402

from keras_dp import step  # noqa: E402

FULL = []  # (start, seconds) of each generation-2 collection


def _timed(phase, info, start=[0.0]):  # noqa: B006 (the start of the running collection)
    if phase == "start":
        start[0] = time.perf_counter()
    elif info["generation"] == 2:
        FULL.append((start[0], time.perf_counter() - start[0]))


class FirstEpoch(clipping.EpochTimer):
    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        if epoch == 0:
            self.began = self._start


def first_epoch(name: str, x, y, pause: bool) -> tuple[float, list]:
    shipped = step.paused_gc_on_first_call
    if not pause:
        step.paused_gc_on_first_call = lambda fn: fn
    try:
        model = clipping.build("auto", name, len(y), clipping.SEED)
        timer = FirstEpoch()
        FULL.clear()
        model.fit(x, y, verbose=0, epochs=1, callbacks=[timer])
    finally:
        step.paused_gc_on_first_call = shipped
    begin, seconds = timer.began, timer.seconds[0]
    inside = [round(d, 3) for s, d in FULL if begin <= s <= begin + seconds]
    return seconds, inside


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn", "text"])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--hub", action="store_true", help="import keras_hub first")
    args = parser.parse_args()
    if args.hub:  # as a notebook fine-tuning Gemma does: TensorFlow's objects join the heap
        import keras_hub  # noqa: F401
    _, data_fn, batch, _ = clipping.MODELS[args.model]
    x, y = data_fn()
    n = len(y) - len(y) % batch
    x, y = x[:n], y[:n]
    gc.callbacks.append(_timed)
    first_epoch(args.model, x, y, True)  # σ's calibration, and a first fit in the process
    runs = {True: [], False: []}
    for _ in range(args.repeats):
        for pause in (True, False):
            seconds, inside = first_epoch(args.model, x, y, pause)
            runs[pause].append(seconds)
            label = "paused" if pause else "not paused"
            log(f"{args.model} {label}: first epoch {seconds:.2f} s, full collections {inside}")
    for pause in (True, False):
        label = "paused (as shipped)" if pause else "not paused"
        log(f"median first epoch, {label}: {statistics.median(runs[pause]):.2f} s")


if __name__ == "__main__":
    main()
