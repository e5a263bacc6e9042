"""Step time and memory of correlated noise (BandMF) against DP-SGD, in one run.

    python benchmarks/bandmf_step.py [--models mlp gemma-lora gemma-full] [--bands 4 8]
                                     [--repeats 3] [--out benchmarks/results/bandmf_step.md]

The same models, data, batch and plan as ``benchmarks/run.py`` (Adam, ε = 8); fits
alternate (DP-SGD, BandMF b₁, BandMF b₂, DP-SGD, ...) with the same sampler seed per
repeat, and a step's time is the median over repeats of the per-update time of the
epochs after the first (compiling) one. Memory: the noise state that BandMF keeps,
(b − 1) float32 copies of the trainable variables, against the trainable variables.
Not a test: nothing here asserts a time.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402

from run import DELTA, EPSILON, LOSS, EpochTimer  # noqa: E402
from step_time import MODELS  # noqa: E402

import keras_dp  # noqa: E402


def fit_time(name: str, x, y, bands: int, seed: int) -> tuple[float, int]:
    """Median seconds per update after the first epoch, and the noise-state floats."""
    model_fn, _, batch, epochs = MODELS[name]
    config = keras_dp.DPConfig(
        target_epsilon=EPSILON,
        target_delta=DELTA,
        batch_size=batch,
        epochs=epochs,
        seed=seed,  # the same draws for every side of a repeat (a benchmark, not a release)
        noise="bandmf" if bands > 1 else "independent",
        bands=bands,
    )
    model = keras_dp.make_private(model_fn(), config)
    model.compile(optimizer="adam", loss=LOSS)
    timer = EpochTimer()
    with contextlib.redirect_stdout(io.StringIO()):
        model.fit(x, y, verbose=0, callbacks=[timer])
    trainable = sum(math.prod(v.shape) for v in model.trainable_variables)
    return statistics.median(timer.per_step), trainable * (bands - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "gemma-lora", "gemma-full"])
    parser.add_argument("--bands", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines = [
        "| model | trainable | DP-SGD step | "
        + " | ".join(f"BandMF b={b} step (ratio) | state (× trainable)" for b in args.bands)
        + " |",
        "|---|---|---|" + "---|---|" * len(args.bands),
    ]
    for name in args.models:
        _, data_fn, _, _ = MODELS[name]
        x, y = data_fn()
        times = {b: [] for b in [1, *args.bands]}
        state = {}
        for repeat in range(args.repeats):
            for bands in times:
                seconds, floats = fit_time(name, x, y, bands, seed=repeat)
                times[bands].append(seconds)
                state[bands] = floats
        base = statistics.median(times[1])
        trainable = state[args.bands[0]] // (args.bands[0] - 1)
        cells = []
        for b in args.bands:
            t = statistics.median(times[b])
            cells.append(f"{t * 1e3:.2f} ms ({t / base:.3f}×) | {state[b] / trainable:.0f}×")
        lines.append(
            f"| {name} | {trainable:,} | {base * 1e3:.2f} ms | " + " | ".join(cells) + " |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
