"""The benchmark suite: speed, memory, calibration and compilations, in one run.

    pip install -e ".[bench]"        # adds jax-privacy (the peer) and scikit-learn
    python benchmarks/run.py [--repeats 3] [--sweep 1 2 4 8 16] [--sweep-repeats 3]
                             [--out benchmarks/results]

Writes ``results.md`` (tables) and ``results.json`` (every measurement) to --out.
Not a test: nothing here asserts a time. Every figure is a ratio measured in this
one run on this machine. Fits alternate (plain, keras_dp, jax-privacy, plain,
...); the first (compiling) epoch is left out and a step's time is the median
over repeats of (epoch wall time / updates in the epoch), so asynchronous
dispatch, data sampling and per-epoch set-up count for every side.

1. DP overhead: keras_dp DP ``fit`` / plain Keras ``fit``, same model, batch and
   optimizer: a keras-hub Gemma3 (4 layers, hidden 256, seq 128, batch 16) with
   LoRA and fully fine-tuned (its layers as a plain functional model, so every
   side runs Keras' own ``fit`` on the same arrays), and an MLP on digits.
2. The peer: jax-privacy's Keras API (``jax_privacy.keras_api.make_private``,
   fixed batches) on the same models, each library at its default and at its
   best ``microbatch_size`` from --sweep.
3. Memory: XLA's peak temporary memory of one compiled DP step at logical batch
   32, 256 and 1024 with ``microbatch_size=16`` (``compiled.memory_analysis()``).
4. Calibration time for typical plans, and XLA compilations of the train step
   per ``fit``.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keras-hub imports TensorFlow

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from step_time import MODELS, TASKS  # noqa: E402

import keras_dp  # noqa: E402
from keras_dp import _backend, sampling  # noqa: E402
from keras_dp import data as dp_data  # noqa: E402
from keras_dp._keras import train_state  # noqa: E402  (re-exported to the other benchmarks)

logging.getLogger("absl").setLevel(logging.ERROR)
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
EPSILON, DELTA = 8.0, 1e-5


def jit_step(model, fresh: bool = False, **kwargs):
    """``jax.jit(model.train_step, **kwargs)`` compiled as ``fit`` compiles it: a
    keras_dp model's step with keras_dp's compiler options
    (``_backend.compiler_options()``: 512-bit vectors on a CPU), plain Keras' with
    XLA's defaults. So that a benchmark times and measures the programs that train.
    ``fresh``: a new function object, which JAX traces and XLA compiles again (JAX
    keeps a function's trace and program). ``compiler_options`` in ``kwargs`` replaces
    keras_dp's."""
    if isinstance(model, keras_dp.DPModel):
        kwargs.setdefault("compiler_options", _backend.compiler_options())
    step = model.train_step
    if fresh:
        step = lambda state, data: model.train_step(state, data)  # noqa: E731
    return jax.jit(step, **kwargs)


class EpochTimer(keras.callbacks.Callback):
    """Seconds per update of every epoch after the first (which compiles).

    Only epoch and batch-*begin* hooks: Keras keeps dispatching asynchronously.
    """

    def __init__(self):
        super().__init__()
        self.per_step = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_begin(self, batch, logs=None):
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        if epoch > 0 and self._steps:
            self.per_step.append((time.perf_counter() - self._start) / self._steps)


def fit_time(kind: str, name: str, x, y, microbatch=None, seed=0) -> tuple[float, float]:
    """Median seconds per update of one fit, and the mean rows per timed update.

    ``kind`` is plain, keras_dp, jax_privacy or keras_dp_fixed (keras_dp with fixed
    batches of B rows, like jax-privacy's: a like-for-like comparison of the step).
    Plain and jax-privacy take fixed batches of B rows; keras_dp's Poisson batches
    hold B rows only on average, so the rows its timed updates drew are counted
    (``seed`` picks the draws).
    """
    _, _, batch, epochs = MODELS[name]
    # Whole batches only, for every side: jax-privacy fails on a partial last batch.
    n = len(y) - len(y) % batch
    x, y = keras.tree.map_structure(lambda a: a[:n], x), y[:n]
    model = build(kind, name, n, microbatch, seed)
    kwargs = {} if kind.startswith("keras_dp") else {"batch_size": batch, "epochs": epochs}
    timer = EpochTimer()
    with contextlib.redirect_stdout(io.StringIO()):
        model.fit(x, y, verbose=0, callbacks=[timer], **kwargs)
    rows = float(batch)
    if kind == "keras_dp":
        rows = timed_rows(model, epochs)
    return statistics.median(timer.per_step), rows


def build(kind: str, name: str, n: int, microbatch=None, seed=0) -> keras.Model:
    """``MODELS[name]`` compiled as ``kind`` trains it, for ``n`` training examples."""
    model_fn, _, batch, epochs = MODELS[name]
    model = model_fn()
    if kind.startswith("keras_dp"):
        fixed = {"sampling": "fixed", "accountant": "rdp"} if kind == "keras_dp_fixed" else {}
        config = keras_dp.DPConfig(
            target_epsilon=EPSILON,
            target_delta=DELTA,
            batch_size=batch,
            epochs=epochs,
            microbatch_size=microbatch,
            seed=seed,
            **fixed,
        )
        model = keras_dp.make_private(model, config)
    if kind == "jax_privacy":
        from jax_privacy import keras_api

        params = keras_api.DPKerasConfig(
            epsilon=EPSILON,
            delta=DELTA,
            clipping_norm=1.0,
            batch_size=batch,
            gradient_accumulation_steps=1,
            train_steps=epochs * (n // batch),
            train_size=n,
            microbatch_size=microbatch,
            seed=seed,
        )
        with contextlib.redirect_stdout(io.StringIO()):  # it prints while calibrating
            model = keras_api.make_private(model, params)
    model.compile(optimizer="adam", loss=LOSS)
    return model


def timed_rows(model, epochs: int) -> float:
    """Mean real rows of the updates after the first epoch (those timed)."""
    config = model.dp_config
    counts = [
        len(dp_data.draw_indices(config, model._dp_seed, step))
        for step in range(config.steps // epochs, config.steps)
    ]
    return float(np.mean(counts))


def overhead(names, repeats, sweep, sweep_repeats, sweep_kinds) -> dict:
    """Step times of plain, keras_dp and jax-privacy (defaults), alternated, and sweeps."""
    results = {}
    for name in names:
        x, y = MODELS[name][1]()
        times = {"plain": [], "keras_dp": [], "jax_privacy": []}
        rows = []
        for repeat in range(repeats):  # each repeat its own Poisson draws
            for kind in times:
                seconds, drawn = fit_time(kind, name, x, y, seed=repeat)
                times[kind].append(seconds)
                if kind == "keras_dp":
                    rows.append(drawn)
                log(f"{name} {kind}: {seconds * 1e3:.1f} ms/step ({drawn:.1f} rows/step)")
        entry = {kind: statistics.median(t) for kind, t in times.items()}
        entry["runs"] = times
        entry["keras_dp_rows"] = rows
        entry["batch_size"] = MODELS[name][2]
        if name != "mlp" and sweep:
            entry.update(sweep_sizes(name, x, y, sweep, sweep_repeats, sweep_kinds))
        results[name] = entry
    return results


def sweep_sizes(name, x, y, sizes, repeats, kinds=("keras_dp", "jax_privacy")) -> dict:
    """Both libraries at each ``microbatch_size``, alternated, median of ``repeats``.

    Repeat r uses seed r for both, so keras_dp sees the same Poisson draws at every
    size; its rows per timed update are reported with each repeat.
    """
    swept = {kind: {size: [] for size in sizes} for kind in kinds}
    rows = []
    for repeat in range(repeats):
        for size in sizes:
            for kind in swept:
                seconds, drawn = fit_time(kind, name, x, y, microbatch=size, seed=repeat)
                swept[kind][size].append(seconds)
                log(f"{name} {kind} mb {size}: {seconds * 1e3:.1f} ms/step ({drawn:.1f} rows)")
                if kind == "keras_dp" and size == sizes[0]:
                    rows.append(drawn)
    out = {"keras_dp_sweep_rows": statistics.mean(rows)}
    for kind, by_size in swept.items():
        medians = {size: statistics.median(t) for size, t in by_size.items()}
        best = min(medians, key=medians.get)
        out[f"{kind}_sweep"] = {"median": medians, "runs": by_size}
        out[f"{kind}_best"] = {"microbatch_size": best, "seconds": medians[best]}
    return out


def step_memory(name: str, logical_batch: int, microbatch: int, metrics=None) -> int:
    """Peak temporary bytes of one compiled DP step (XLA's memory analysis).

    ``metrics=None`` compiles as the model's class does by default (keras-hub's causal
    LMs add a per-token accuracy); ``[]`` compiles with no metric.
    """
    _, data_fn, _, _ = MODELS[name]
    x, y = data_fn()
    model = keras_dp.make_private(
        TASKS[name](),
        keras_dp.DPConfig(
            target_epsilon=EPSILON,
            batch_size=logical_batch,
            steps=1,
            microbatch_size=microbatch,
            dataset_size=max(4 * logical_batch, len(y)),
            seed=0,
        ),
    )
    kwargs = {} if metrics is None else {"metrics": metrics, "weighted_metrics": metrics}
    model.compile(optimizer="adam", loss=LOSS, **kwargs)
    config = model.dp_config.calibrate()
    model.set_dp_config(config)
    reps = math.ceil(config.dataset_size / len(y))
    tile = lambda a: np.concatenate([a] * reps)[: config.dataset_size]  # noqa: E731
    source = sampling.ExampleSource(keras.tree.map_structure(tile, x), tile(y))
    model._symbolic_build(data_batch=source.gather(np.arange(2)))
    model._dp_seed = 0
    batches = dp_data.DPBatches(model, source, config, microbatch, 1)
    batch = jax.tree.map(jax.numpy.asarray, batches[0])
    compiled = jit_step(model).lower(train_state(model), batch).compile()
    if os.environ.get("KERAS_DP_DUMP_HLO"):
        with open(f"{os.environ['KERAS_DP_DUMP_HLO']}.{logical_batch}.txt", "w") as f:
            f.write(compiled.as_text())
    return int(compiled.memory_analysis().temp_size_in_bytes)


def memory(names, microbatch=16) -> dict:
    out = {}
    for name in names:
        out[name] = {b: step_memory(name, b, microbatch) for b in (32, 256, 1024)}
        log(f"memory {name}: {out[name]}")
        if name.startswith("gemma"):
            label = f"{name}, no compiled metrics"
            out[label] = {b: step_memory(name, b, microbatch, []) for b in (32, 256, 1024)}
            log(f"memory {label}: {out[label]}")
    return out


def calibration() -> dict:
    from calibration import PLANS

    out = {}
    for label, plan in PLANS.items():
        start = time.perf_counter()
        sigma = keras_dp.DPConfig(**plan).calibrate().noise_multiplier
        out[label] = {"seconds": time.perf_counter() - start, "noise_multiplier": sigma}
        log(f"calibration {label}: {out[label]['seconds']:.2f} s")
    return out


def compilations() -> int:
    """Traces of the train step in a 3-epoch keras_dp fit (jit traces once per shape)."""
    traces = []

    class Counting(keras_dp.DPModel, keras.Sequential):
        def train_step(self, state, batch):
            traces.append(1)  # runs only while jit traces
            return super().train_step(state, batch)

    model_fn, data_fn, batch, _ = MODELS["mlp"]
    model = Counting(
        model_fn().layers,
        dp_config=keras_dp.DPConfig(target_epsilon=EPSILON, batch_size=batch, epochs=3, seed=0),
    )
    model.compile(optimizer="adam", loss=LOSS)
    model.fit(*data_fn(), verbose=0)
    return len(traces)


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}", ""]
    if "overhead" in results:
        lines += overhead_table(results["overhead"]) + sweep_table(results["overhead"])
    if "memory" in results:
        lines += memory_table(results["memory"])
    if "calibration" in results:
        lines += ["", "| plan | calibration s | σ |", "|---|---|---|"]
        for label, c in results["calibration"].items():
            lines.append(f"| {label} | {c['seconds']:.2f} | {c['noise_multiplier']:.4f} |")
    if "compilations" in results:
        lines += ["", f"Train-step compilations in a 3-epoch fit: {results['compilations']}"]
    return "\n".join(lines) + "\n"


def overhead_table(overhead: dict) -> list:
    lines = [
        "| model | B | plain ms/step | keras_dp | keras_dp rows/step | jax-privacy | "
        "keras_dp/plain | jax-privacy/plain | jax-privacy/keras_dp | keras_dp best (mb) | "
        "jax-privacy best (mb) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in overhead.items():
        best = {
            k: f"{r[f'{k}_best']['seconds'] * 1e3:.0f} ({r[f'{k}_best']['microbatch_size']})"
            if f"{k}_best" in r
            else "–"
            for k in ("keras_dp", "jax_privacy")
        }
        if "keras_dp_sweep_rows" in r:  # and per B rows, as the peer's fixed batches hold
            rows = r["keras_dp_sweep_rows"]
            per_b = r["keras_dp_best"]["seconds"] * r["batch_size"] / rows
            best["keras_dp"] += f", {rows:.1f} rows/step; {per_b * 1e3:.0f} per B rows"
        rows = statistics.mean(r.get("keras_dp_rows") or [float("nan")])
        lines.append(
            f"| {name} | {r.get('batch_size', '')} | {r['plain'] * 1e3:.1f} | "
            f"{r['keras_dp'] * 1e3:.1f} | {rows:.1f} | {r['jax_privacy'] * 1e3:.1f} | "
            f"{r['keras_dp'] / r['plain']:.2f}× | {r['jax_privacy'] / r['plain']:.2f}× | "
            f"{r['jax_privacy'] / r['keras_dp']:.2f}× | {best['keras_dp']} | "
            f"{best['jax_privacy']} |"
        )
    return lines


def sweep_table(overhead: dict) -> list:
    lines = []
    for name, r in overhead.items():
        if "keras_dp_sweep" not in r:
            continue
        sizes = list(r["keras_dp_sweep"]["median"])
        lines += ["", f"{name}, ms/step by microbatch_size (median of the sweep's repeats):", ""]
        lines += ["| library | " + " | ".join(str(m) for m in sizes) + " |"]
        lines += ["|---|" + "---|" * len(sizes)]
        for kind in [k for k in ("keras_dp", "keras_dp_fixed", "jax_privacy") if f"{k}_sweep" in r]:
            cells = " | ".join(f"{r[f'{kind}_sweep']['median'][m] * 1e3:.0f}" for m in sizes)
            lines.append(f"| {kind} | {cells} |")
    return lines


def memory_table(memory: dict) -> list:
    lines = ["", "| model | peak temp MB at B=32 | B=256 | B=1024 | 1024/32 |"]
    lines += ["|---|---|---|---|---|"]
    for name, m in memory.items():
        mb = {b: v / 2**20 for b, v in m.items()}
        lines.append(
            f"| {name} | {mb[32]:.1f} | {mb[256]:.1f} | {mb[1024]:.1f} | {mb[1024] / mb[32]:.2f}× |"
        )
    return lines


def log(message: str) -> None:
    print(message, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep", nargs="*", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--sweep-repeats", type=int, default=3)
    parser.add_argument(
        "--sweep-fixed",
        action="store_true",
        help="also sweep keras_dp with fixed batches of B rows (like jax-privacy's)",
    )
    parser.add_argument("--memory-models", nargs="*", default=["mlp", "gemma-lora"])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["calibration", "compilations", "memory", "overhead"],
        choices=["calibration", "compilations", "memory", "overhead"],
    )
    args = parser.parse_args()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}"
    results = {"machine": machine, "jax": jax.__version__, "keras": keras.__version__}
    runs = {
        "calibration": calibration,
        "compilations": compilations,
        "memory": lambda: memory(args.memory_models),
        "overhead": lambda: overhead(
            args.models,
            args.repeats,
            args.sweep,
            args.sweep_repeats,
            ("keras_dp", "jax_privacy") + (("keras_dp_fixed",) if args.sweep_fixed else ()),
        ),
    }
    os.makedirs(args.out, exist_ok=True)
    for section in args.sections:  # written after each section, so a cut-off run keeps some
        results[section] = runs[section]()
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        table = markdown(results)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(table)
    print(table)


if __name__ == "__main__":
    main()
