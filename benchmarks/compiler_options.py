"""keras_dp's step compiled with its shipped XLA options against other options, through fit.

    python benchmarks/compiler_options.py [--models mlp text] [--repeats 6]
                                          [--variant NAME=JSON ...]
                                          [--out benchmarks/results/compiler-options]

On a CPU keras_dp compiles its own train step with ``keras_dp._backend.compiler_options()``
(512-bit vectors; from jaxlib 0.10, matrix products in XLA's own kernels rather than
YNNPACK's); every other program keeps XLA's defaults. This times, for each of
``clipping.py``'s models, plain Keras' fit, keras_dp's with each variant's options and
keras_dp's as shipped, in ABBA order (every other repeat in reverse); a repeat's DP fits
share one seed, so they draw the same batches. A variant is the shipped options updated
by its JSON object, a key set to null being dropped (XLA's default). The default
variant, ``ynn-products``, drops the library-fusion option: YNNPACK then takes the
products too, as XLA does by default on jaxlib 0.10. ``--variant
256='{"xla_cpu_prefer_vector_width": null}'`` compares the vector width instead.
Step times are ``clipping.py``'s (ms an update after the first epoch, median over
epochs and repeats), first epochs from the ``fit`` call.

Writes ``compiler_options.md`` and ``compiler_options.json`` to --out. Not a test:
nothing here asserts a time.
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

SHIPPED = _backend.compiler_options
DEFAULT_VARIANTS = {"ynn-products": {"xla_cpu_experimental_ynn_fusion_type": None}}


def options_of(changes: dict | None) -> dict | None:
    """The shipped options with ``changes`` applied (None values dropped); None for the
    shipped options themselves."""
    shipped = SHIPPED()
    if changes is None or shipped is None:
        return shipped
    options = {**shipped, **changes}
    return {k: v for k, v in options.items() if v is not None}


def one_fit(kind: str, changes: dict | None, name: str, x, y, repeat: int) -> tuple:
    """(median seconds an update after the first epoch, first epoch from the call)."""
    options = options_of(changes)
    _backend.compiler_options = lambda: options
    try:
        _, _, batch, epochs = MODELS[name]
        dp = kind != "plain"
        model = build("auto" if dp else "plain", name, len(y), SEED + repeat if dp else None)
        timer = timed_fit(model, x, y, batch, epochs)
    finally:
        _backend.compiler_options = SHIPPED
    return statistics.median(timer.per_step()), timer.first_fit_epoch


def markdown(times: dict, variants: dict, command: str) -> str:
    names = list(variants)
    lines = [
        f"Machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores usable, "
        f"{jax.default_backend()}; jax {jax.__version__}",
        "",
        f"    {command}",
        "",
        f"Shipped options: `{json.dumps(SHIPPED())}`. Variants: "
        + "; ".join(f"{n} `{json.dumps(options_of(c))}`" for n, c in variants.items()),
        "",
        "ms an update (× plain Keras'); shipped / variant: the medians' ratio, and the range "
        "of each repeat's ratio; first epochs in s.",
        "",
        "| model | plain | "
        + " | ".join(names)
        + " | shipped | "
        + " | ".join(f"shipped / {n}" for n in names)
        + " | first epoch, plain / "
        + " / ".join(names)
        + " / shipped |",
        "|---" * (2 * len(names) + 4) + "|",
    ]
    for name, kinds in times.items():
        step = {k: statistics.median(v["step"]) * 1e3 for k, v in kinds.items()}
        first = {k: statistics.median(v["first"]) for k, v in kinds.items()}
        cells = [f"{step['plain']:.3f}"]
        cells += [f"{step[k]:.3f} ({step[k] / step['plain']:.2f}×)" for k in [*names, "shipped"]]
        for n in names:
            pairs = [a / b for a, b in zip(kinds["shipped"]["step"], kinds[n]["step"])]
            cells.append(f"{step['shipped'] / step[n]:.3f} ({min(pairs):.2f}–{max(pairs):.2f})")
        cells.append(" / ".join(f"{first[k]:.2f}" for k in ["plain", *names, "shipped"]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "text"], choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON")
    parser.add_argument("--out", default="benchmarks/results/compiler-options")
    args = parser.parse_args()
    variants = dict(DEFAULT_VARIANTS)
    if args.variant:
        variants = {}
        for spec in args.variant:
            name, _, changes = spec.partition("=")
            variants[name] = json.loads(changes)
    kinds = {"plain": None, **variants, "shipped": None}
    order = list(kinds)
    times = {n: {k: {"step": [], "first": []} for k in kinds} for n in args.models}
    for name in args.models:
        x, y = MODELS[name][1]()
        for repeat in range(args.repeats):
            for kind in order if repeat % 2 == 0 else reversed(order):
                step, first = one_fit(kind, kinds[kind], name, x, y, repeat)
                times[name][kind]["step"].append(step)
                times[name][kind]["first"].append(first)
                log(f"{name} {kind}: {step * 1e3:.3f} ms/step, first epoch {first:.2f} s")
    command = "python benchmarks/compiler_options.py --models " + " ".join(args.models)
    command += f" --repeats {args.repeats}"
    command += "".join(f" --variant '{v}'" for v in args.variant)
    text = markdown(times, variants, command)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compiler_options.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "compiler_options.json"), "w") as f:
        json.dump({"models": times, "shipped": SHIPPED(), "variants": variants}, f, indent=1)
    log(text)


if __name__ == "__main__":
    main()
