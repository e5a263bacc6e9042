"""Where a small model's fixed cost per DP step goes on an accelerator.

    python benchmarks/gpu_probe.py [--out benchmarks/results]

On the H200 a DP fit step of the MLP took 1.4-1.6 ms against 0.8 ms plain, with
the sampler's work taken out (``host.py``'s "one cached batch"), while on this
CPU the same comparison is 1.08x. For the logistic regression of ``host.py``
and the MLP of ``run.py``, plain and keras_dp (and, with ``--models gemma-lora``,
``run.py``'s Gemma3 LoRA at B = 16, whose DP fit step took 2.1x plain's there),
this prints:

- ``fit``: ms per update through ``fit`` (epochs after the first, median);
- ``async``: ms per call of the jitted ``train_step`` alone, 300 calls on one
  device-resident batch, waited for at the end (the device's time when it is
  the bound);
- ``sync``: the same, waited for after every call (dispatch plus device latency);
- plain Keras' step alone on as many rows as keras_dp's physical batch (its padding
  rows are computed too), so that the two steps compare on equal work;
- the compiled step's operations that the device runs (fusions, library calls,
  copies, loops, conditionals: each loop or conditional reads its predicate on
  the host on a GPU);
- keras_dp's first fit: how many times XLA compiled its train step, and in how many
  seconds (once, ahead of Keras' loop while σ is searched; a second compile is the
  Poisson bound's program, made only when a draw first needs it);
- the first device-to-host transfer in the main thread during updates 2-5 of a fit
  (``jax.transfer_guard_device_to_host("disallow_explicit")``), at ``verbose=0`` and
  with the progress bar: one there is a wait on every step.

Writes ``gpu_probe.md`` to --out. Not a test: nothing here asserts a time.
``PROBE_CALLS`` (default 300) sets the calls timed (fewer for a dry run on a CPU).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import run  # noqa: E402
from host import fitted_batches, logistic  # noqa: E402
from run import LOSS, EpochTimer, jit_step, train_state  # noqa: E402
from step_time import MODELS as STEP_MODELS  # noqa: E402
from step_time import digits_data, mlp, token_data  # noqa: E402

import keras_dp  # noqa: E402
from keras_dp import noise  # noqa: E402
from keras_dp import rows as batch_rows  # noqa: E402

logging.getLogger("keras_dp").setLevel(logging.ERROR)
EPOCHS, CALLS = 6, int(os.environ.get("PROBE_CALLS", 300))
MODELS = {  # name: (model_fn, data_fn, batch)
    "logistic": (logistic, digits_data, 64),
    "mlp": (mlp, digits_data, 64),
    "gemma-lora": (STEP_MODELS["gemma-lora"][0], token_data, 16),
}
KINDS = {
    "logistic": ("plain", "keras_dp"),
    "mlp": ("plain", "keras_dp", "jax_privacy"),
    "gemma-lora": ("plain", "keras_dp"),
}
DEFAULT_MODELS = ["logistic", "mlp"]  # gemma-lora: gpu.sh's part probe-lm


def build(kind: str, name: str, n: int) -> keras.Model:
    if kind == "jax_privacy":  # run.py's, for n examples (the MLP's B and epochs there)
        return run.build(kind, name, n)
    model_fn, _, batch = MODELS[name]
    model = model_fn()
    if kind == "keras_dp":
        # Budget for the timed fit and the three one-epoch fits after it (the batch, and
        # the guard at verbose=0 and 1), with one epoch to spare.
        config = keras_dp.DPConfig(target_epsilon=8.0, batch_size=batch, epochs=EPOCHS + 4)
        model = keras_dp.make_private(model, config)
    model.compile(optimizer="adam", loss=LOSS)
    return model


def fit(model, kind: str, x, y, size: int, epochs: int, callbacks=(), verbose: int = 0) -> None:
    # keras_dp: the config's batch; plain and jax-privacy fits take batches of B = size
    kwargs = {} if kind == "keras_dp" else {"batch_size": size}
    with contextlib.redirect_stdout(io.StringIO()):  # the progress bar, when verbose
        model.fit(x, y, epochs=epochs, verbose=verbose, callbacks=list(callbacks), **kwargs)


def step_compiles(fn, *args) -> list[float]:
    """Seconds of each XLA compilation of keras_dp's train step while ``fn(*args)`` runs."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    dispatch = logging.getLogger("jax._src.dispatch")
    dispatch.addHandler(handler)
    try:
        with jax.log_compiles():
            fn(*args)
    finally:
        dispatch.removeHandler(handler)
    seconds = []
    for record in records:
        message = record.getMessage()
        if "XLA compilation" in message and "_dp_noised_train_step" in message:
            found = re.search(r"in ([0-9.e-]+) sec", message)
            seconds.append(float(found.group(1)) if found else float("nan"))
    return seconds


def rows_of(x, y, rows: int):
    return jax.tree.map(lambda a: a[:rows], (x, y))


def first_batch(model, x, y, size: int):
    """The first batch keras_dp's fit feeds its step (or plain's: B = ``size`` rows)."""
    if not isinstance(model, keras_dp.DPModel):
        return rows_of(x, y, size)
    return fitted_batches(model, x, y)[0]


def step_times(model, batch) -> tuple[float, float]:
    """ms per call of the jitted train_step: (waited for at the end, after each)."""
    step = jit_step(model, donate_argnums=0)
    state = jax.tree.map(lambda a: a.copy(), train_state(model))  # donated below
    data = jax.device_put(batch)
    logs, state = step(state, data)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(CALLS):
        logs, state = step(state, data)
    jax.block_until_ready((logs, state))
    waited_at_end = (time.perf_counter() - start) / CALLS
    start = time.perf_counter()
    for _ in range(CALLS):
        logs, state = step(state, data)
        jax.block_until_ready((logs, state))
    waited_each = (time.perf_counter() - start) / CALLS
    return waited_at_end * 1e3, waited_each * 1e3


def noise_ms(model) -> float:
    """ms per call of the Gaussian noise alone (a tree like the weights), async."""
    draw = jax.jit(lambda key, i, tree: noise.gaussian_like(jax.random.fold_in(key, i), tree, 1))
    tree, key = [v.value for v in model.trainable_variables], jax.random.key(0)
    out = jax.block_until_ready(draw(key, 0, tree))
    start = time.perf_counter()
    for i in range(CALLS):
        out = draw(key, i, tree)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / CALLS * 1e3


def operations(model, batch) -> dict:
    """Counts of the compiled step's device operations (all computations)."""
    state = train_state(model)
    text = jit_step(model).lower(state, batch).compile().as_text()
    counts = collections.Counter()
    for op in (
        "fusion",
        "custom-call",
        "dot",
        "copy",
        "while",
        "conditional",
        "all-reduce",
        "sort",
    ):
        counts[op] = len(re.findall(rf"= [^ ]+ {op}\(", text))
    counts["instructions"] = len(re.findall(r"^\s+\S+ = ", text, re.M))
    return dict(counts)


class GuardedSteps(keras.callbacks.Callback):
    """Disallows device-to-host transfers (implicit and explicit) in the main thread
    from the start of update 2 to the start of update 6 of the first epoch: a
    transfer there is made on every step."""

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 2:
            self.guard = jax.transfer_guard_device_to_host("disallow_explicit")
            self.guard.__enter__()
        if batch == 6:
            self.guard.__exit__(None, None, None)


def first_transfer(model, kind: str, x, y, size: int, verbose: int = 0) -> str:
    """Where the first device-to-host transfer of a fit's updates 2-5 is (main thread)."""
    try:
        fit(model, kind, x, y, size, epochs=1, callbacks=[GuardedSteps()], verbose=verbose)
    except Exception as error:  # noqa: BLE001 - we report where it came from
        frames = traceback.extract_tb(error.__traceback__)
        where = [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames]
        message = " ".join(str(error).split())[:160]
        return f"{' <- '.join(reversed(where[-6:]))}: {type(error).__name__}: {message}"
    return "none in the main thread"


def probe(name: str, x, y) -> dict:
    result, models = {}, {}
    size = MODELS[name][2]  # B
    for kind in KINDS[name]:  # jax-privacy's MLP step is ~34 ms on a CPU: the probe is for GPUs
        model = models[kind] = build(kind, name, len(y))
        timer = EpochTimer()
        compiles = step_compiles(fit, model, kind, x, y, size, EPOCHS, [timer])
        batch = first_batch(model, x, y, size)
        at_end, each = step_times(model, batch)
        result[kind] = {
            "fit_ms": statistics.median(timer.per_step) * 1e3,
            "async_ms": at_end,
            "sync_ms": each,
            "ops": operations(model, batch),
            "noise_ms": noise_ms(model) if kind == "keras_dp" else None,
            "compiles": compiles if kind == "keras_dp" else None,
            "transfer": "not checked"
            if kind == "jax_privacy"
            else first_transfer(model, kind, x, y, size),
            "transfer_bar": "not checked"
            if kind == "jax_privacy"
            else first_transfer(model, kind, x, y, size, verbose=1),
        }
        print(name, kind, result[kind], flush=True)
        if kind == "keras_dp" and "plain" in result:  # plain's step on as many rows
            rows = len(batch_rows.unpack_rows(batch)[0]["dp_mask_key"])
            plain_rows = step_times(models["plain"], rows_of(x, y, rows))[0]
            result["plain"]["async_ms_dp_rows"] = (rows, plain_rows)
    return result


def markdown(results: dict) -> str:
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.devices()[0].device_kind}; jax {jax.__version__}, keras {keras.__version__}",
        "",
        "    python benchmarks/gpu_probe.py",
        "",
        "ms per update: through fit; the jitted train_step alone waited for at the end "
        f"(async) and after each call (sync), {CALLS} calls on one device-resident batch.",
        "",
        "| model | kind | fit | async | sync | fusions | library calls | dots | copies | loops "
        "| conditionals | instructions |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, kinds in results.items():
        for kind, r in kinds.items():
            o = r["ops"]
            lines.append(
                f"| {name} | {kind} | {r['fit_ms']:.3f} | {r['async_ms']:.3f} | "
                f"{r['sync_ms']:.3f} | {o['fusion']} | {o['custom-call']} | {o['dot']} | "
                f"{o['copy']} | "
                f"{o['while']} | {o['conditional']} | {o['instructions']} |"
            )
    noise_line = ", ".join(
        f"{name} {r['noise_ms']:.3f}"
        for name, kinds in results.items()
        for r in kinds.values()
        if r["noise_ms"] is not None
    )
    lines += ["", f"The Gaussian noise alone (a key fold and the draw, async), ms: {noise_line}"]
    compile_line = "; ".join(
        f"{name} {len(r['compiles'])} ({', '.join(f'{s:.2f} s' for s in r['compiles'])})"
        for name, kinds in results.items()
        for r in kinds.values()
        if r.get("compiles") is not None
    )
    lines += [
        "",
        "keras_dp's train step compiled during its first fit (XLA compilations, each's "
        f"seconds; a second is the Poisson bound's program, made when a draw needs it): "
        f"{compile_line}",
    ]
    same_rows = ", ".join(
        f"{name} {r['async_ms_dp_rows'][1]:.3f} ms on {r['async_ms_dp_rows'][0]} rows"
        for name, kinds in results.items()
        for r in kinds.values()
        if "async_ms_dp_rows" in r
    )
    if same_rows:
        lines += [
            "",
            f"Plain Keras' step on keras_dp's physical batch (its rows), async: {same_rows}",
        ]
    lines += [
        "",
        "First device-to-host transfer in the main thread, updates 2-5 of a fit (innermost first):",
        "",
    ]
    for name, kinds in results.items():
        for kind, r in kinds.items():
            lines.append(f"- {name}, {kind}: {r['transfer']}; verbose=1: {r['transfer_bar']}")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for name in args.models:  # the table is written after each model (a run cut off keeps it)
        _, data_fn, batch = MODELS[name]
        x, y = data_fn()
        n = len(y) - len(y) % batch
        results[name] = probe(name, *rows_of(x, y, n))
        text = markdown(results)
        with open(os.path.join(args.out, "gpu_probe.md"), "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
