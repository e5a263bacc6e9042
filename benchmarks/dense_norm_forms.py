"""A dense layer's two exact norm forms over a sequence, timed, and the fit that picks.

    python benchmarks/dense_norm_forms.py [--rows 88] [--runs 2]
                                          [--out benchmarks/results/dense-norm-forms]
    python benchmarks/dense_norm_forms.py --steps bert-full gemma-full [--repeats 9]
                                          [--calls 10]

For each einsum below (positions S, shared letters P, kernel Kx → Ko: Dense layers
over sequences, attention's projections, LoRA's factors), a kernel's per-example
squared norms and its clipped sum for ``--rows`` examples are compiled as keras_dp's
step compiles them (``_backend.compiler_options``) and timed alone, in each form of
:mod:`keras_dp.ghost_norms`, as ``ghost_tap.Tap`` runs them:

- ``outer``: each example's gradient G_b formed and squared, then Σ_b f_b·G_b;
- ``gram``: Σ_{s,t} ⟨x_s, x_t⟩⟨g_s, g_t⟩ with its rounding margin, then the clipped
  sum as a second contraction of x and g over the examples and positions.

Each form is also timed as a norm alone (a kernel read more than once takes its sum
apart). Then each form's time is fitted by non-negative least squares (relative
errors) to its counts (``FEATURES``), the fit ``ghost_norms.form_times`` holds, and
the table says which form the fit picks (for S > 1: one position's Gram form is
‖x‖²‖g‖², timed for reference only), which the rule before it
(``2·outer + 32·Kx·Ko·P ≤ Gram`` multiply-adds) picked, and what each costs against
the fastest. Writes ``dense_norm_forms.md`` and ``dense_norm_forms.json``.

With ``--steps``, for each of ``clipping.py``'s models named, keras_dp's train step
(``clipping="auto"``, the batch fit feeds it) is compiled under the rule before and
under the shipped one, with and without noise, beside plain Keras' on the batch, and
timed alternated in one process (``step_parts.py``'s method: ``--repeats`` rounds of
``--calls`` calls each); written to ``steps.md``. Not a test: nothing here asserts a
time.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from conv_norm_forms import measure_and_save, relative_fit, timed  # noqa: E402

from keras_dp import ghost_norms as gn  # noqa: E402

FORMS = ("outer", "gram")
DENSE = "abc,cd->abd"  # a Dense over a sequence: S = b, Kx = c, Ko = d
HEADS = "abc,cde->abde"  # attention's query/key/value projection: Ko = heads × size
OUTPUT = "abcd,cde->abe"  # attention's output projection: Kx = heads × size
PER_HEAD = "abhc,hcd->abhd"  # a kernel per head: P = heads

# (name, equation, x shape of one example, kernel shape)
CASES = [
    *(
        (f"Dense {s}×{a} → {c}", DENSE, (s, a), (a, c))
        for s, pairs in (
            (1, ((64, 256), (256, 256), (256, 10), (30, 256), (4, 4))),
            (4, ((64, 64), (256, 256), (512, 128))),
            (8, ((32, 32), (128, 128), (64, 512))),
            (16, ((64, 64), (144, 32), (256, 64), (64, 256), (256, 256))),
            (32, ((32, 32), (64, 64), (128, 512), (512, 128), (64, 4), (4, 64))),
            (
                64,
                (
                    (32, 32),
                    (64, 64),
                    (64, 128),
                    (128, 64),
                    (128, 128),
                    (32, 256),
                    (256, 64),
                    (256, 256),
                    (64, 4),
                    (4, 64),
                    (16, 16),
                ),
            ),
            (128, ((32, 32), (64, 64), (128, 128), (256, 256), (256, 4), (4, 256), (64, 256))),
            (256, ((16, 16), (64, 64), (128, 128), (256, 64))),
        )
        for a, c in pairs
    ),
    ("BERT tiny's query: 64×64 → 2 heads × 32", HEADS, (64, 64), (64, 2, 32)),
    ("BERT tiny's attention output: 64×2×32 → 64", OUTPUT, (64, 2, 32), (2, 32, 64)),
    ("a kernel per head: 64×4×32 → 32", PER_HEAD, (64, 4, 32), (4, 32, 32)),
    ("a kernel per head: 16×8×16 → 16", PER_HEAD, (16, 8, 16), (8, 16, 16)),
]


def FEATURES(form: str, z: dict, summed: bool = True) -> list:  # noqa: N802 - a table
    """The counts a form's time is fitted to (S, P, Kx, Ko of one example), with or
    without the clipped sum."""
    s, p, a, c = z["S"], z["P"], z["Kx"], z["Ko"]
    if form == "outer":  # forming G_b, writing it (and the sum over b), reading x and g
        return [s * p * a * c, p * a * c, s * p * (a + c), 1]
    gram = [s * s * p * (a + c), s * p * (a + c), s * s * p, 1]
    return gram + [s * p * a * c] if summed else gram  # the second contraction


def form_fn(form: str, spec, kernel_shape, summed: bool):
    outer = form == "outer"

    def fn(x, g, factor):
        if outer:
            per = gn.kernel_grads(spec, x, g, kernel_shape)
            norms = jnp.sum(jnp.square(per.reshape(per.shape[0], -1)), axis=1)
            total = jnp.tensordot(factor, per, 1) if summed else None  # as the step sums
        else:
            norms = gn.grouped_sq_norms(*gn.grouped(spec, x, g), False)
            total = gn.kernel_sum(spec, x, g, factor, kernel_shape) if summed else None
        return norms, total

    return fn


def measure(rows: int, runs: int) -> list:
    rng = np.random.default_rng(0)
    results = []
    for name, equation, x_shape, kernel_shape in CASES:
        # Each example as the layer sees it in the step: a batch of one.
        out_shape = jax.eval_shape(
            lambda x, k, eq=equation: jnp.einsum(eq, x, k),
            jax.ShapeDtypeStruct((1, *x_shape), jnp.float32),
            jax.ShapeDtypeStruct(kernel_shape, jnp.float32),
        ).shape
        spec = gn.parse(equation, len(x_shape) + 1)
        s, p, a, c = gn.sizes(spec, (1, *x_shape), out_shape)
        x = jnp.asarray(rng.normal(size=(rows, 1, *x_shape)), jnp.float32)
        g = jnp.asarray(rng.normal(size=(rows, *out_shape)), jnp.float32)
        factor = jnp.asarray(rng.uniform(size=rows), jnp.float32)
        ms = {}
        for summed in (True, False):
            for form in FORMS:
                key = form if summed else f"{form} norm"
                fn = form_fn(form, spec, kernel_shape, summed)
                ms[key] = statistics.median(
                    timed(fn, x, g, factor, calls=None) for _ in range(runs)
                )
        results.append({"name": name, "S": s, "P": p, "Kx": a, "Ko": c, "ms": ms})
        print(name, {k: round(v, 3) for k, v in ms.items()}, flush=True)
    return results


def fit(results: list, rows: int) -> dict:
    """Per form, with and without the sum, non-negative coefficients (picoseconds an
    example) of FEATURES."""
    coefficients = {}
    for summed in (True, False):
        for form in FORMS:
            key = form if summed else f"{form} norm"
            coefficients[key] = relative_fit(
                [
                    (FEATURES(form, r, summed), r["ms"][key] / rows * 1e9)
                    for r in results
                    if r["S"] > 1  # one position: the Gram form is ‖x‖²‖g‖², not fitted
                ]
            )
    return coefficients


def old_rule(r) -> str:
    return "outer" if _old_faster(r["S"], r["P"], r["Kx"], r["Ko"]) else "gram"


def _old_faster(s, p, a, c, summed=True) -> bool:
    """The rule before the fit: by multiply-adds, the outer form charged twice its
    products and 32 for each number of an example's gradient."""
    outer, gram = gn.form_costs(s, p, a, c)
    return 2 * outer + 32 * (outer // max(1, s)) <= gram


@contextlib.contextmanager
def rule_before():
    """The step traced with the rule before the fit (no memory bound on kept gradients)."""
    saved = gn.outer_is_faster, gn.outer_form
    gn.outer_is_faster = _old_faster
    gn.outer_form = lambda spec, x_shape, out_shape, rows=None: _old_faster(
        *gn.sizes(spec, x_shape, out_shape)
    )
    try:
        yield
    finally:
        gn.outer_is_faster, gn.outer_form = saved


def _ratios(times: dict, key: str) -> str:
    """The median of a step's per-round ratio to plain Keras', and their range."""
    r = sorted(t / p for t, p in zip(times[key], times["plain"]))
    return f"{r[len(r) // 2]:.2f} ({r[0]:.2f}–{r[-1]:.2f})"


def steps(names: list, repeats: int, calls: int) -> str:
    """Compiled steps under each rule, alternated; a markdown table."""
    import step_parts as sp

    lines = [
        "| model (B, rows) | plain Keras | rule before | shipped | before, no noise"
        " | shipped, no noise | before / plain (per round) | shipped / plain (per round) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        x, y, b, plain, dp, batch = sp.fitted(name)
        compiled = {"plain": sp.compiled(plain, sp.rows_of(x, y, b))}
        for noiseless in (False, True):
            suffix = ", no noise" if noiseless else ""
            with rule_before():
                compiled["before" + suffix] = sp.compiled(dp, batch, noiseless)
            compiled["shipped" + suffix] = sp.compiled(dp, batch, noiseless)
        ms, times = sp.medians(compiled, plain, dp, repeats, calls)

        cells = " | ".join(
            f"{ms[k]:.2f}"
            for k in ("plain", "before", "shipped", "before, no noise", "shipped, no noise")
        )
        lines.append(
            f"| {name} ({b}, {len(batch[1])}) | {cells} | {_ratios(times, 'before')}"
            f" | {_ratios(times, 'shipped')} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def markdown(results, coefficients, rows, command) -> str:
    lines = [
        "# A dense layer's norm forms over a sequence, timed alone",
        "",
        f"`{command}` on {platform.machine()} ({os.cpu_count()} cores), jax {jax.__version__},"
        f" {rows} examples, ms a call (median), compiled with keras_dp's step options;"
        " norm and clipped sum, then the norm alone.",
        "",
        "| einsum | S | P | Kx | Ko | outer | Gram | outer norm | Gram norm | fastest"
        " | the fit's | shipped | its cost | the old rule's | its cost |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ms = r["ms"]
        fastest = min(FORMS, key=ms.get)
        predicted = {f: float(np.dot(coefficients[f], FEATURES(f, r))) for f in FORMS}
        picked = min(predicted, key=predicted.get)
        shipped = "outer" if gn.outer_is_faster(r["S"], r["P"], r["Kx"], r["Ko"]) else "gram"
        old = old_rule(r)
        cells = " | ".join(f"{ms[k]:.3f}" for k in ("outer", "gram", "outer norm", "gram norm"))
        lines.append(
            f"| {r['name']} | {r['S']} | {r['P']} | {r['Kx']} | {r['Ko']} | {cells} | {fastest}"
            f" | {picked} | {shipped} | {ms[shipped] / ms[fastest]:.2f}× | {old}"
            f" | {ms[old] / ms[fastest]:.2f}× |"
        )
    lines += ["", "The fit (picoseconds an example, per count of FEATURES):", ""]
    lines += [f"- {f}: " + ", ".join(f"{c:.3g}" for c in v) for f, v in coefficients.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=88)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/dense-norm-forms")
    parser.add_argument("--steps", nargs="+", default=None, metavar="MODEL")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    if args.steps:
        command = (
            f"python benchmarks/dense_norm_forms.py --steps {' '.join(args.steps)}"
            f" --repeats {args.repeats} --calls {args.calls} --out {args.out}"
        )
        table = steps(args.steps, args.repeats, args.calls)
        header = (
            f"# Compiled steps, the dense rule before and the shipped one\n\n`{command}` on"
            f" {platform.machine()} ({os.cpu_count()} cores), jax {jax.__version__}; ms a step,"
            " median over the rounds.\n\n"
        )
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "steps.md").write_text(header + table)
        return
    measure_and_save("dense_norm_forms", args, measure, fit, markdown)


if __name__ == "__main__":
    main()
