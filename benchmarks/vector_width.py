"""keras_dp's step compiled for 512-bit vectors against XLA's default 256, through fit.

    python benchmarks/vector_width.py [--models mlp text] [--repeats 4]
                                      [--out benchmarks/results/vector-width]

On a CPU keras_dp compiles its own train step with ``xla_cpu_prefer_vector_width=512``
(``keras_dp._backend.CPU_COMPILER_OPTIONS``); XLA's default asks LLVM for 256-bit
vectors. This times, for each of ``clipping.py``'s models, plain Keras' fit, keras_dp's
with its options emptied (XLA's defaults, as before) and keras_dp's as shipped, in
ABBA order (every other repeat in reverse); a repeat's DP fits share one seed, so they
draw the same batches. Step times are ``clipping.py``'s (ms an update after the first
epoch, median over epochs and repeats), first epochs from the ``fit`` call. Only a CPU
with 512-bit vectors (AVX-512) should differ: on others LLVM has none to use. The
noise's values are the same bit for bit (``tests/test_noise.py``).

Writes ``vector_width.md`` and ``vector_width.json`` to --out. Not a test: nothing
here asserts a time.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402

import jax  # noqa: E402
from clipping import MODELS, SEED, build, timed_fit  # noqa: E402
from run import log  # noqa: E402

from keras_dp import _backend  # noqa: E402

KINDS = ("plain", "256", "512")
SHIPPED = dict(_backend.CPU_COMPILER_OPTIONS)


def one_fit(kind: str, name: str, x, y, repeat: int) -> tuple[float, float]:
    """(median seconds an update after the first epoch, first epoch from the call)."""
    _backend.CPU_COMPILER_OPTIONS.clear()
    if kind == "512":
        _backend.CPU_COMPILER_OPTIONS.update(SHIPPED)
    try:
        _, _, batch, epochs = MODELS[name]
        dp = kind != "plain"
        model = build("auto" if dp else "plain", name, len(y), SEED + repeat if dp else None)
        timer = timed_fit(model, x, y, batch, epochs)
    finally:
        _backend.CPU_COMPILER_OPTIONS.update(SHIPPED)
    return statistics.median(timer.per_step()), timer.first_fit_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "text"], choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/vector-width")
    args = parser.parse_args()
    times = {n: {k: {"step": [], "first": []} for k in KINDS} for n in args.models}
    for name in args.models:
        x, y = MODELS[name][1]()
        for repeat in range(args.repeats):
            for kind in KINDS if repeat % 2 == 0 else reversed(KINDS):
                step, first = one_fit(kind, name, x, y, repeat)
                times[name][kind]["step"].append(step)
                times[name][kind]["first"].append(first)
    cores = len(os.sched_getaffinity(0))
    lines = [
        f"Machine: {platform.machine()}, {cores} cores usable, {jax.default_backend()}; "
        f"jax {jax.__version__}",
        "",
        "    python benchmarks/vector_width.py --models "
        + " ".join(args.models)
        + f" --repeats {args.repeats}",
        "",
        "| model | plain ms/step | DP, 256-bit | DP, 512-bit (shipped) | 512 / 256 a step "
        "| first epoch, plain / 256 / 512 s |",
        "|---|---|---|---|---|---|",
    ]
    for name, kinds in times.items():
        step = {k: statistics.median(v["step"]) * 1e3 for k, v in kinds.items()}
        first = {k: statistics.median(v["first"]) for k, v in kinds.items()}
        pairs = [a / b for a, b in zip(kinds["512"]["step"], kinds["256"]["step"])]
        lines.append(
            f"| {name} | {step['plain']:.3f} "
            f"| {step['256']:.3f} ({step['256'] / step['plain']:.2f}×) "
            f"| {step['512']:.3f} ({step['512'] / step['plain']:.2f}×) "
            f"| {step['512'] / step['256']:.3f} (per repeat {min(pairs):.2f}–{max(pairs):.2f}) "
            f"| {first['plain']:.2f} / {first['256']:.2f} / {first['512']:.2f} |"
        )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vector_width.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "vector_width.json"), "w") as f:
        json.dump({"models": times, "options": SHIPPED}, f, indent=1)
    log("\n".join(lines))


if __name__ == "__main__":
    main()
