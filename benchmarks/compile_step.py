"""What XLA compiles for a train step: its loops and its compile time, plain Keras
against keras_dp.

    python benchmarks/compile_step.py [--models mlp tabular cnn text] [--repeats 5]
                                      [--variant NAME=JSON ...]
                                      [--out benchmarks/results/compile-step]

For each model (``clipping.py``'s, at its batch B), after one epoch of fit has built
everything (``step_parts.fitted``), plain Keras' step on B rows and keras_dp's
(``clipping="auto"``) on its usual physical batch are traced, lowered and compiled
``--repeats`` times each, alternated, as ``fit`` compiles them (``run.jit_step``).
Printed per step: the medians of the trace-and-lower time and of XLA's compile time,
and what the compiled program holds:

- ``loops``: fused loops that XLA's CPU compiler generates code for, one by one
  (fusions of kind kLoop, kInput or kOutput; each costs compile time, ~5-7 ms even
  for a tiny one on a 2-core CPU);
- ``library calls``: fusions handed to a library (kind kCustom: YNNPACK's products
  and reductions in plain Keras' step; in keras_dp's, from jaxlib 0.10, its reductions
  only, ``_backend.compiler_options``), cheap to compile;
- ``other products``: ``dot`` instructions outside any fusion (keras_dp's products
  since jaxlib 0.10); XLA's CPU compiler calls Eigen for some and generates a loop of
  its own for others (it did for the
  products of a vector by a matrix that keras_dp's bias sums once were).

Counted over the whole module (a conditional's branches included). Beside each
compile's wall time, its CPU time (the process' user and system seconds: XLA compiles
on more than one thread, and in ``fit`` σ's search shares the cores with it). The
first epoch of ``fit`` waits for this compile (``clipping.py`` times it whole, with
σ's search beside it).

``--variant NAME=JSON`` also compiles keras_dp's step with its shipped XLA options
(``_backend.compiler_options()``) updated by the JSON object (a key set to null
dropped), in the same alternation: e.g. ``--variant
'legacy={"xla_cpu_use_fusion_emitters": false}'``. Only the compile is measured here;
``compiler_options.py`` times the steps such options produce, through ``fit``.
Not a test: nothing here asserts a time.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from clipping import MODELS  # noqa: E402
from compiler_options import options_of  # noqa: E402
from gpu_probe import rows_of  # noqa: E402
from run import jit_step, log, train_state  # noqa: E402
from step_parts import _header, fitted  # noqa: E402


def counts(text: str) -> dict:
    """Loops, library calls and other products in an optimized HLO module's text."""
    kinds = re.findall(r"= \S+ fusion\(.*?kind=(k\w+)", text)
    entry = text[text.index("\nENTRY ") :]
    return {
        "loops": sum(k in ("kLoop", "kInput", "kOutput") for k in kinds),
        "library calls": kinds.count("kCustom"),
        "other products": len(re.findall(r"= \S+ dot\(", entry)),
    }


def cpu_seconds() -> float:
    """This process' CPU time so far (user and system, all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def compile_once(model, batch, changes: dict | None = None) -> tuple:
    """(trace-and-lower seconds, compile seconds, compile CPU seconds, compiled),
    traced and compiled anew; a keras_dp step with its XLA options updated by
    ``changes`` (:func:`compiler_options.options_of`)."""
    kwargs = {}
    if changes is not None:
        kwargs["compiler_options"] = options_of(changes)
    start = time.perf_counter()
    lowered = jit_step(model, fresh=True, **kwargs).lower(train_state(model), batch)
    lowered_at, cpu_at = time.perf_counter(), cpu_seconds()
    compiled = lowered.compile()
    wall, cpu = time.perf_counter() - lowered_at, cpu_seconds() - cpu_at
    return lowered_at - start, wall, cpu, compiled


def steps(name: str, repeats: int, variants: dict | None = None) -> dict:
    x, y, b, plain, dp, batch = fitted(name)
    plain_rows, dp_rows = jax.device_put(rows_of(x, y, b)), jax.device_put(batch)
    kinds = {"plain": (plain, plain_rows, None), "keras_dp": (dp, dp_rows, None)}
    for variant, changes in (variants or {}).items():
        kinds[f"keras_dp {variant}"] = (dp, dp_rows, changes)
    runs, found = {kind: [] for kind in kinds}, {}
    for _ in range(repeats):
        for kind, (model, rows, changes) in kinds.items():
            lower, seconds, cpu, compiled = compile_once(model, rows, changes)
            runs[kind].append((lower, seconds, cpu))
            found[kind] = counts(compiled.as_text())
    out = {}
    for kind, (_, rows, _) in kinds.items():
        out[kind] = {
            "rows": len(rows[1]),
            "lower_s": statistics.median(r[0] for r in runs[kind]),
            "compile_s": statistics.median(r[1] for r in runs[kind]),
            "compile_cpu_s": statistics.median(r[2] for r in runs[kind]),
            "runs": runs[kind],
            **found[kind],
        }
        log(f"{name} {kind}: {out[kind]}")
    return out


def markdown(results: dict, command: str) -> str:
    lines = [
        _header(command),
        "Median seconds over the alternated compiles; counts of the compiled program:\n",
        "| model | step (rows) | trace + lower s | compile s | compile CPU s | loops "
        "| library calls | other products |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, kinds in results.items():
        for kind, r in kinds.items():
            lines.append(
                f"| {name} | {kind} ({r['rows']}) | {r['lower_s']:.3f} | {r['compile_s']:.3f} "
                f"| {r['compile_cpu_s']:.3f} | {r['loops']} | {r['library calls']} "
                f"| {r['other products']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "tabular", "cnn", "text"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON")
    parser.add_argument("--out", default="benchmarks/results/compile-step")
    args = parser.parse_args()
    unknown = set(args.models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; pick from {sorted(MODELS)}")
    variants = {}
    for spec in args.variant:
        variant, _, changes = spec.partition("=")
        variants[variant] = json.loads(changes)
    command = (
        f"python benchmarks/compile_step.py --models {' '.join(args.models)} "
        f"--repeats {args.repeats}" + "".join(f" --variant '{v}'" for v in args.variant)
    )
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for name in args.models:  # written after each model: a run cut off keeps the rest
        results[name] = steps(name, args.repeats, variants)
        with open(os.path.join(args.out, "compile_step.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, "compile_step.md"), "w") as f:
            f.write(markdown(results, command))
    log(markdown(results, command))


if __name__ == "__main__":
    main()
