"""A convolution's three exact norm forms, timed, and the fit that picks among them.

    python benchmarks/conv_norm_forms.py [--rows 88] [--runs 2]
                                         [--out benchmarks/results/conv-norm-forms]

For each convolution below (1-D and 2-D, 1-128 channels, windows of 1-7, strides 1-2,
dilations 1-4), the per-example squared norms of its kernel gradient for ``--rows``
examples are compiled as keras_dp's step compiles them (``_backend.compiler_options``)
and timed alone, in each of the forms of :mod:`keras_dp.ghost_conv_norms`:

- ``outer``: each example's gradient formed from the unfolded patches, squared;
- ``gram``: the patches' Gram matrix times g's;
- ``shifted``: the patches' Gram matrix summed from the input's over the window
  offsets (skipped where the input's holds over 40,000 numbers: slow there).

Then each form's time is fitted by non-negative least squares (relative errors) to
its counts (``FEATURES``), the fit ``ghost_conv_norms.form_times`` holds, and the
table says which form the fit picks and what that costs against the fastest. Writes
``conv_norm_forms.md`` and ``conv_norm_forms.json``. Not a test: nothing here asserts a
time.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.optimize import nnls  # noqa: E402

from keras_dp import _backend  # noqa: E402
from keras_dp import ghost_conv as gc  # noqa: E402
from keras_dp import ghost_conv_norms as gcn  # noqa: E402
from keras_dp import ghost_norms as gn  # noqa: E402

FORMS = ("outer", "gram", "shifted")


def conv1(k, d=1, padding="VALID"):
    return gc.Conv((k,), (1,), padding, (d,))


def conv2(k, s=1, padding="VALID"):
    return gc.Conv((k, k), (s, s), padding, (1, 1))


# (name, spec, input shape of one example (spatial, channels), filters)
CASES = [
    ("Keras' text CNN: 64×32 → 32, width 5", conv1(5), (64, 32), 32),
    ("TCN: 64×8 → 32, 3 taps, causal", conv1(3, 1, ((2, 0),)), (64, 8), 32),
    ("TCN: 64×32 → 32, dilation 2", conv1(3, 2, ((4, 0),)), (64, 32), 32),
    ("TCN: 64×32 → 32, dilation 4", conv1(3, 4, ((8, 0),)), (64, 32), 32),
    ("1-D 128×64 → 64, width 3", conv1(3), (128, 64), 64),
    ("1-D 32×16 → 16, width 3", conv1(3), (32, 16), 16),
    ("1-D 64×16 → 64, width 3", conv1(3), (64, 16), 64),
    ("1-D 64×64 → 16, width 3", conv1(3), (64, 64), 16),
    ("1-D 48×32 → 32, width 7", conv1(7), (48, 32), 32),
    ("1-D 100×32 → 32, width 5", conv1(5), (100, 32), 32),
    ("1-D 96×64 → 64, width 5, same", conv1(5, 1, "SAME"), (96, 64), 64),
    ("1-D 64×128 → 128, width 3", conv1(3), (64, 128), 128),
    ("1-D 30×64 → 64, width 3", conv1(3), (30, 64), 64),
    ("digits 8×8×1 → 16", conv2(3), (8, 8, 1), 16),
    ("digits 6×6×16 → 32", conv2(3), (6, 6, 16), 32),
    ("16×16×1 → 16", conv2(3), (16, 16, 1), 16),
    ("14×14×16 → 32, stride 2", conv2(3, 2), (14, 14, 16), 32),
    ("16×16×3 → 32, same", conv2(3, 1, "SAME"), (16, 16, 3), 32),
    ("16×16×16 → 16, same", conv2(3, 1, "SAME"), (16, 16, 16), 16),
    ("30×30×32 → 32, stride 2", conv2(3, 2), (30, 30, 32), 32),
    ("14×14×32 → 64", conv2(3), (14, 14, 32), 64),
    ("12×12×64 → 64, stride 2", conv2(3, 2), (12, 12, 64), 64),
    ("1×1, 13×13×16 → 32", conv2(1), (13, 13, 16), 32),
    ("10×10×8 → 16", conv2(3), (10, 10, 8), 16),
    ("8×8×32 → 32, same", conv2(3, 1, "SAME"), (8, 8, 32), 32),
    ("11×11×16 → 32", conv2(3), (11, 11, 16), 32),
    ("6×6×64 → 64", conv2(3), (6, 6, 64), 64),
    ("9×9×32 → 64, stride 2", conv2(3, 2), (9, 9, 32), 64),
]
SHIFTED_TIMED = 40_000  # numbers of the input's Gram matrix an example


def sizes(spec, shape, filters) -> dict:
    """S, taps, C, F, the window's numbers W and the reach N of one example."""
    *spatial, channels = shape
    out = gc._out_spatial(
        spec, [n + lo + hi for n, (lo, hi) in zip(spatial, gc._pads(spec, spatial))]
    )
    return {
        "S": math.prod(out),
        "taps": math.prod(spec.window),
        "C": channels,
        "F": filters,
        "W": math.prod(spec.window) * channels,
        "N": math.prod(gcn.reach(spec, out)),
        "out": out,
    }


def FEATURES(form: str, z: dict) -> list:  # noqa: N802 - a table, as form_times reads it
    s, w, n, c, f, k = z["S"], z["W"], z["N"], z["C"], z["F"], z["taps"]
    if form == "outer":
        return [s * w * f, w * f, s * w, 1]
    if form == "gram":
        return [s * s * (w + f), s * w, s * s, 1]
    return [n * n * c + s * s * f, k * s * s, n * n + s * s, 1]


def form_fn(form: str, spec, kernel_shape):
    if form == "outer":

        def fn(x, g):
            per = gcn.input_grads(spec, x, g, kernel_shape)
            return jnp.sum(jnp.square(per.reshape(per.shape[0], -1)), axis=1)

    elif form == "gram":

        def fn(x, g):
            xr = gc.conv_patches(spec, x)[:, :, None].astype(jnp.float32)
            return gn.grouped_sq_norms(xr, g.reshape(g.shape[0], -1, 1, g.shape[-1]), False)

    else:

        def fn(x, g):
            return gcn.shifted_sq_norms(spec, x, g)

    return fn


def timed(fn, *args, calls: int | None = 30, repeats: int = 7) -> float:
    """Median ms of one call, compiled with keras_dp's step options; ``calls`` calls a
    repeat, or None: as many as fill about 20 ms (3 to 30)."""
    compiled = jax.jit(fn).lower(*args).compile(compiler_options=_backend.compiler_options())
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    if calls is None:
        calls = max(3, min(30, int(0.02 / max(time.perf_counter() - start, 1e-5))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = compiled(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def measure(rows: int, runs: int) -> list:
    rng = np.random.default_rng(0)
    results = []
    for name, spec, shape, filters in CASES:
        z = sizes(spec, shape, filters)
        x = jnp.asarray(rng.normal(size=(rows, 1, *shape)), jnp.float32)
        g = jnp.asarray(rng.normal(size=(rows, 1, *z["out"], filters)), jnp.float32)
        ms = {}
        for form in FORMS:
            if form == "shifted" and z["N"] ** 2 > SHIFTED_TIMED:
                continue
            fn = form_fn(form, spec, (*spec.window, shape[-1], filters))
            ms[form] = statistics.median(timed(fn, x, g) for _ in range(runs))
        results.append({"name": name, **{k: v for k, v in z.items() if k != "out"}, "ms": ms})
        print(name, {k: round(v, 3) for k, v in ms.items()}, flush=True)
    return results


def fit(results: list, rows: int) -> dict:
    """Per form, non-negative coefficients (picoseconds an example) of FEATURES."""
    return {
        form: relative_fit(
            [(FEATURES(form, r), r["ms"][form] / rows * 1e9) for r in results if form in r["ms"]]
        )
        for form in FORMS
    }


def relative_fit(samples: list) -> list:
    """Non-negative coefficients c of the counts that fit each sample's time t (a list
    of (counts, t)) with the least squared relative errors: Σ (c·counts / t - 1)²."""
    a = np.array([[v / t for v in counts] for counts, t in samples], float)
    return nnls(a, np.ones(len(a)))[0].tolist()


def save(out: str, stem: str, rows: int, results: list, coefficients: dict, text: str) -> None:
    """``text`` as ``stem.md`` and the runs and the fit as ``stem.json`` in ``out``."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(
        json.dumps({"rows": rows, "results": results, "fit": coefficients}, indent=1)
    )
    print(text)


def markdown(results, coefficients, rows, command) -> str:
    lines = [
        "# A convolution's norm forms, timed alone",
        "",
        f"`{command}` on {platform.machine()} ({os.cpu_count()} cores), jax {jax.__version__},"
        f" {rows} examples, ms a call (median), compiled with keras_dp's step options.",
        "",
        "| convolution | S | N | outer | Gram | shifted | fastest | the fit's | shipped | cost |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ms = r["ms"]
        fastest = min(ms, key=ms.get)
        predicted = {f: float(np.dot(coefficients[f], FEATURES(f, r))) for f in ms}
        picked = min(predicted, key=predicted.get)
        n = r["N"] if "shifted" in ms else None
        shipped = gcn.form_times(r["S"], r["taps"], r["C"], r["F"], n)
        shipped = min(shipped, key=shipped.get)
        cells = " | ".join(f"{ms[f]:.3f}" if f in ms else "–" for f in FORMS)
        lines.append(
            f"| {r['name']} | {r['S']} | {r['N']} | {cells} | {fastest} | {picked} | {shipped}"
            f" | {ms[shipped] / ms[fastest]:.2f}× |"
        )
    lines += ["", "The fit (picoseconds an example, per count of FEATURES):", ""]
    lines += [f"- {f}: " + ", ".join(f"{c:.3g}" for c in coefficients[f]) for f in FORMS]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=88)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/conv-norm-forms")
    args = parser.parse_args()
    measure_and_save("conv_norm_forms", args, measure, fit, markdown)


def measure_and_save(script: str, args, measure, fit, markdown) -> None:
    """A norm-form script's run: its forms timed (``measure``), fitted, written as
    ``markdown`` and saved under ``args.out`` (``--rows``, ``--runs``, ``--out``)."""
    results = measure(args.rows, args.runs)
    coefficients = fit(results, args.rows)
    command = f"python benchmarks/{script}.py " + " ".join(
        f"--{k} {v}" for k, v in (("rows", args.rows), ("runs", args.runs), ("out", args.out))
    )
    text = markdown(results, coefficients, args.rows, command)
    save(args.out, script, args.rows, results, coefficients, text)


if __name__ == "__main__":
    main()
