"""How far keras_dp's compiled MLP step is from the ghost algorithm written out in JAX.

    python benchmarks/ghost_floor.py [--repeats 15] [--calls 100]
                                     [--out benchmarks/results/ghost-floor]

The suite's MLP (64-256-256-10 on digits, batch B = 64, Adam), after one epoch of fit
has built everything. Six compiled steps, timed in alternation (each round times
``--calls`` calls of each; the median over ``--repeats`` rounds), all on the same B
real rows and without noise:

- ``Keras``: plain Keras' own train step;
- ``keras_dp``: keras_dp's step (``clipping="auto"``: every kernel ghost), its noise
  replaced by zeros while it compiles (``step_parts.py``'s way);
- ``JAX, plain``: the same network and loss written in JAX, ``jax.grad`` of the mean
  loss, an Adam update;
- ``JAX, ghost`` (batched) and ``JAX, ghost (vmap)`` (each row's gradients at the
  layers' outputs under ``jax.vmap``, as keras_dp takes them): the algorithm alone.
  Each layer's per-example squared norm is (‖x_b‖² + 1)·‖g_b‖² (kernel and bias,
  x_b the layer's input, g_b the gradient at its output), the clip factor
  min(1, C/‖·‖), the clipped sum Σ_b f_b·x_b ⊗ g_b, divided by B, then Adam;
- ``JAX, ghost (keras_dp's options)``: the vmap variant compiled with keras_dp's XLA
  options (``keras_dp._backend.compiler_options()``).

The JAX steps start from the Keras model's weights. What keras_dp's step costs beyond
``JAX, ghost`` is its machinery (padding masks, non-finite rows, folded biases, the
loss' and the counts' reductions, Keras' optimizer and layers), not the algorithm.
Writes ``ghost_floor.md`` and ``ghost_floor.json``. Not a test: nothing here asserts a
time.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import step_parts  # noqa: E402
from gpu_probe import rows_of  # noqa: E402

from keras_dp import _backend  # noqa: E402

CLIP = 1.0


def forward(params, x, zs=None):
    """Logits, and each Dense layer's input; ``zs[i]`` added to layer i's output."""
    h, inputs = x, []
    for i, (w, b) in enumerate(params):
        inputs.append(h)
        out = h @ w + b + (0.0 if zs is None else zs[i])
        h = jax.nn.relu(out) if i < len(params) - 1 else out
    return h, inputs


def losses(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


def adam(params, grads, opt, lr=1e-3):
    m, v, t = opt
    t = t + 1
    m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, grads)
    v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, grads)
    scale = lr * jnp.sqrt(1 - 0.999**t) / (1 - 0.9**t)
    params = jax.tree.map(lambda p, m, v: p - scale * m / (jnp.sqrt(v) + 1e-7), params, m, v)
    return params, (m, v, t)


def plain_step(state, x, y):
    params, opt = state
    grads = jax.grad(lambda p: jnp.mean(losses(forward(p, x)[0], y)))(params)
    return adam(params, grads, opt)


def ghost_step(state, x, y, per_row: bool):
    params, opt = state
    zs = [jnp.zeros((x.shape[0], w.shape[1])) for w, _ in params]
    if per_row:

        def row(xr, yr, zr):
            def f(zr):
                logits, inputs = forward(params, xr[None], [z[None] for z in zr])
                return jnp.sum(losses(logits, yr[None])), [a[0] for a in inputs]

            return jax.grad(f, has_aux=True)(zr)

        gs, inputs = jax.vmap(row)(x, y, zs)
    else:

        def f(zs):
            logits, inputs = forward(params, x, zs)
            return jnp.sum(losses(logits, y)), inputs

        gs, inputs = jax.grad(f, has_aux=True)(zs)
    sq = sum((jnp.sum(a * a, 1) + 1) * jnp.sum(g * g, 1) for a, g in zip(inputs, gs))
    factor = jnp.minimum(1.0, CLIP / jnp.maximum(jnp.sqrt(sq), 1e-12))
    b = x.shape[0]
    grads = [((a.T @ (g * factor[:, None])) / b, (factor @ g) / b) for a, g in zip(inputs, gs)]
    return adam(params, grads, opt)


def jax_steps(dp_model, x, y) -> dict:
    """The JAX steps, compiled, each as ``state -> state`` on (x, y)."""
    weights = [v.value for v in dp_model.trainable_variables]
    params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in zip(weights[0::2], weights[1::2])]
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = (params, (zeros, zeros, jnp.zeros((), jnp.int32)))
    x, y = jnp.asarray(x), jnp.asarray(y)
    variants = {
        "JAX, plain": (plain_step, {}),
        "JAX, ghost": (lambda s, x, y: ghost_step(s, x, y, False), {}),
        "JAX, ghost (vmap)": (lambda s, x, y: ghost_step(s, x, y, True), {}),
        "JAX, ghost (keras_dp's options)": (
            lambda s, x, y: ghost_step(s, x, y, True),
            _backend.compiler_options() or {},
        ),
    }
    steps = {}
    for name, (fn, options) in variants.items():
        jitted = jax.jit(fn, donate_argnums=0)  # the state donated, as Keras' step is
        compiled = jitted.lower(state, x, y).compile(compiler_options=options)
        steps[name] = (lambda c: lambda s: c(s, x, y))(compiled)
    return steps, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/ghost-floor")
    args = parser.parse_args()
    x, y, b, plain, dp, batch = step_parts.fitted("mlp")
    exact = rows_of(*batch, b)
    steps = {
        "Keras": step_parts.compiled(plain, rows_of(x, y, b)),
        "keras_dp": step_parts.compiled(dp, exact, noiseless=True),
    }
    states = {
        "Keras": jax.tree.map(jnp.copy, step_parts.train_state(plain)),
        "keras_dp": jax.tree.map(jnp.copy, step_parts.train_state(dp)),
    }
    ours, state = jax_steps(dp, x[:b], y[:b])
    steps.update(ours)
    states.update({name: jax.tree.map(jnp.copy, state) for name in ours})
    step_parts.timed(steps, states, 1, 3)  # warm
    times = step_parts.timed(steps, states, args.repeats, args.calls)
    ms = {name: statistics.median(t) for name, t in times.items()}
    command = "python benchmarks/ghost_floor.py " + " ".join(os.sys.argv[1:])
    lines = [
        step_parts._header(command),
        f"The MLP's compiled steps on B = {b} rows, no noise, ms (median of "
        f"{args.repeats} alternated rounds of {args.calls} calls):",
        "",
        "| step | ms | / Keras | / JAX, plain |",
        "|---|---|---|---|",
    ]
    for name, value in ms.items():
        lines.append(
            f"| {name} | {value:.3f} | {value / ms['Keras']:.2f}× | "
            f"{value / ms['JAX, plain']:.2f}× |"
        )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ghost_floor.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "ghost_floor.json"), "w") as f:
        json.dump({"command": command, "ms": ms, "runs": times, "batch": b}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
