"""What a DP step costs beyond plain Keras', part by part: compiled steps, alternated.

    python benchmarks/step_parts.py [--models mlp text] [--repeats 9] [--calls 100]
                                    [--rows 64 72 88] [--out benchmarks/results/step-parts]

For each model (``clipping.py``'s, at its batch B), after one epoch of fit has built
everything, six train steps are compiled and then timed in alternation (each round
times ``--calls`` calls of each, waited for at the end; the median over
``--repeats`` rounds). Every DP batch holds the same B real examples, first:

- ``plain``: Keras' own step on B rows;
- ``plain, P rows``: Keras' own step on P rows, keras_dp's physical batch (on a CPU
  its usual one, ``keras_dp.step.usual_rows``: B + 3·√B, which holds all but about
  one Poisson draw in 600; elsewhere the Poisson bound's);
- ``keras_dp, B rows, no noise``: keras_dp's step (``clipping="auto"``) on exactly
  B rows, with zeros in place of the Gaussian noise (``noise.gaussian_like``
  replaced while it compiles): clipping's own cost;
- ``keras_dp, P rows, no noise``: the same on P rows (B real, then padding): plus
  the padding rows that Poisson sampling's fixed shape computes;
- ``keras_dp, P rows``: the step that fit runs: plus the noise (its draw, scale and
  addition);
- ``keras_dp, B rows``: noise and no padding, as a sampler of exactly B examples
  would cost (``sampling="fixed"``, which needs about 2.5× the noise for the same
  ε: its neighbours differ by a replaced example, accounted with RDP).

With ``--rows R ...`` it times instead plain Keras' step on R rows and keras_dp's
without noise on R physical rows (min(R, B) real), for each R, alternated: how each
grows with the rows it computes. Written to ``rows.md`` and ``rows.json``.

Writes ``step_parts.md`` and ``step_parts.json`` to --out. Not a test: nothing here
asserts a time. A step called in a loop leaves out fit's host work (sampling,
dispatch, callbacks); ``clipping.py`` times fit.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
from clipping import MODELS, build  # noqa: E402
from gpu_probe import rows_of  # noqa: E402
from host import fitted_batches  # noqa: E402
from profile_step import dp_batch  # noqa: E402
from run import jit_step, log, train_state  # noqa: E402

from keras_dp import noise  # noqa: E402
from keras_dp import rows as batch_rows  # noqa: E402

PARTS = (
    "plain",
    "plain, P rows",
    "keras_dp, B rows, no noise",
    "keras_dp, P rows, no noise",
    "keras_dp, P rows",
    "keras_dp, B rows",
)


def usual_batch(model, x, y, b: int) -> tuple:
    """keras_dp's usual-shape batch (the one its fit fed) with the first ``b`` examples
    as its real rows."""
    batches = fitted_batches(model, x, y)
    physical = batches.usual_physical if batches.usual is not None else batches.physical
    return dp_batch(model, x, y, b, physical)


@contextlib.contextmanager
def no_noise():
    """Zeros in place of ``noise.gaussian_like`` while a step is traced."""
    draw = noise.gaussian_like
    noise.gaussian_like = lambda key, tree, stddev: jax.tree.map(
        lambda leaf: jnp.zeros(jnp.shape(leaf), jnp.float32), tree
    )
    try:
        yield
    finally:
        noise.gaussian_like = draw


def compiled(model, batch, noiseless: bool = False):
    """``state -> state``: the model's train step compiled for ``batch`` (state donated)."""
    data = jax.device_put(batch)
    state = train_state(model)
    with no_noise() if noiseless else contextlib.nullcontext():
        step = jit_step(model, donate_argnums=0).lower(state, data).compile()
    return lambda s: step(s, data)[1]


def timed(steps: dict, states: dict, repeats: int, calls: int) -> dict:
    times = {part: [] for part in steps}
    for _ in range(repeats):
        for part, step in steps.items():
            state = states[part]
            start = time.perf_counter()
            for _ in range(calls):
                state = step(state)
            jax.block_until_ready(state)
            times[part].append((time.perf_counter() - start) / calls * 1e3)
            states[part] = state
    return times


def fitted(name: str) -> tuple:
    """``(x, y, b, plain, dp, batch)``: both models after one epoch of fit, and
    keras_dp's usual-shape batch with the first ``b`` examples as its real rows."""
    _, data_fn, b, _ = MODELS[name]
    x, y = data_fn()
    n = len(y) - len(y) % b
    x, y = rows_of(x, y, n)
    plain, dp = build("plain", name, n), build("auto", name, n, seed=0)
    with contextlib.redirect_stdout(io.StringIO()):
        plain.fit(x, y, batch_size=b, epochs=1, verbose=0)
    return x, y, b, plain, dp, usual_batch(dp, x, y, b)  # fits dp one epoch


def medians(steps: dict, plain, dp, repeats: int, calls: int) -> tuple:
    """Each step's median ms over the alternated rounds, and every round's."""
    states = {
        part: jax.tree.map(jnp.copy, train_state(plain if part.startswith("plain") else dp))
        for part in steps
    }
    timed(steps, states, 1, 3)  # warm
    times = timed(steps, states, repeats, calls)
    return {part: statistics.median(t) for part, t in times.items()}, times


def parts(name: str, repeats: int, calls: int) -> dict:
    x, y, b, plain, dp, batch = fitted(name)
    batch = batch_rows.unpack_rows(batch)  # as leaves (fit packs them on an accelerator)
    p = len(batch[1])
    exact = rows_of(*batch, b)  # its B real rows only
    steps = {
        "plain": compiled(plain, rows_of(x, y, b)),
        "plain, P rows": compiled(plain, rows_of(x, y, p)),
        "keras_dp, B rows, no noise": compiled(dp, exact, noiseless=True),
        "keras_dp, P rows, no noise": compiled(dp, batch, noiseless=True),
        "keras_dp, P rows": compiled(dp, batch),
        "keras_dp, B rows": compiled(dp, exact),
    }
    ms, times = medians(steps, plain, dp, repeats, calls)
    log(f"{name} (B={b}, P={p}): " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))
    return {"batch": b, "physical": p, "ms": ms, "runs": times}


def by_rows(name: str, rows: list, repeats: int, calls: int) -> dict:
    """Plain Keras' step on R rows and keras_dp's without noise on R physical rows."""
    x, y, b, plain, dp, _ = fitted(name)
    steps = {}
    for r in rows:
        steps[f"plain, {r} rows"] = compiled(plain, rows_of(x, y, r))
        batch = dp_batch(dp, x, y, min(r, b), r)
        steps[f"keras_dp, {r} rows, no noise"] = compiled(dp, batch, noiseless=True)
    ms, times = medians(steps, plain, dp, repeats, calls)
    log(f"{name} (B={b}): " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))
    return {"batch": b, "rows": rows, "ms": ms, "runs": times}


def rows_markdown(results: dict, command: str) -> str:
    lines = [
        _header(command),
        "ms per compiled step (median of the rounds), by the rows it computes:",
        "",
    ]
    for name, r in results.items():
        rows, ms = r["rows"], r["ms"]
        lines += [
            f"{name} (B={r['batch']}):",
            "",
            "| step | " + " | ".join(f"{n} rows" for n in rows) + " |",
            "|---" * (len(rows) + 1) + "|",
        ]
        for kind, label in (
            ("plain, {} rows", "plain Keras"),
            ("keras_dp, {} rows, no noise", "keras_dp, no noise"),
        ):
            lines.append(
                f"| {label} | " + " | ".join(f"{ms[kind.format(n)]:.3f}" for n in rows) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def _header(command: str) -> str:
    return (
        f"Machine: {platform.machine()}, {os.cpu_count()} cores "
        f"({len(os.sched_getaffinity(0))} usable), {jax.devices()[0].device_kind}; "
        f"jax {jax.__version__}, keras {keras.__version__}\n\n    {command}\n"
    )


def markdown(results: dict, command: str) -> str:
    lines = [
        _header(command),
        "ms per compiled step (median of the rounds; its ratio to plain Keras' step on B rows):",
        "",
        "| model (B, P) | " + " | ".join(PARTS) + " |",
        "|---" * (len(PARTS) + 1) + "|",
    ]
    for name, r in results.items():
        ms, plain = r["ms"], r["ms"]["plain"]
        cells = [f"{ms[k]:.3f} ({ms[k] / plain:.2f}×)" for k in PARTS]
        lines.append(f"| {name} ({r['batch']}, {r['physical']}) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The parts, in ms and as a share of plain Keras' step on B rows:",
        "",
        "| model | clipping (B rows) | padding rows (P − B) | noise | the step fit runs |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ms, plain = r["ms"], r["ms"]["plain"]
        clip = ms["keras_dp, B rows, no noise"] - plain
        pad = ms["keras_dp, P rows, no noise"] - ms["keras_dp, B rows, no noise"]
        drawn = ms["keras_dp, P rows"] - ms["keras_dp, P rows, no noise"]
        lines.append(
            f"| {name} | {_share(clip, plain)} | {_share(pad, plain)} | {_share(drawn, plain)} | "
            f"{ms['keras_dp, P rows']:.3f} ({ms['keras_dp, P rows'] / plain:.2f}×) |"
        )
    return "\n".join(lines) + "\n"


def _share(ms: float, plain: float) -> str:
    return f"{ms:+.3f} ({ms / plain:+.0%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "text"], choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--rows", nargs="*", type=int, default=[])
    parser.add_argument("--out", default="benchmarks/results/step-parts")
    args = parser.parse_args()
    command = "python benchmarks/step_parts.py " + " ".join(
        f"--models {' '.join(args.models)} --repeats {args.repeats} --calls {args.calls}".split()
    )
    if args.rows:
        command += " --rows " + " ".join(map(str, args.rows))
    run, write, stem = (
        (lambda n: by_rows(n, args.rows, args.repeats, args.calls), rows_markdown, "rows")
        if args.rows
        else (lambda n: parts(n, args.repeats, args.calls), markdown, "step_parts")
    )
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for name in args.models:  # written after each model: a run cut off keeps the rest
        results[name] = run(name)
        with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
            f.write(write(results, command))
    log(write(results, command))


if __name__ == "__main__":
    main()
