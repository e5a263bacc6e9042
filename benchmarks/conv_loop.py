"""Convolution gradients inside a loop on a CPU: autodiff's against keras_dp's canonical forms.

    python benchmarks/conv_loop.py [--repeats 5]

XLA's CPU compiler runs the convolutions autodiff writes for a gradient (the kernel's:
the examples contracted; the input's: the kernel's feature axes swapped) far slower
inside a loop than outside one (jax-ml/jax#12868). A chunked DP step computes them in
its loop over chunks. This times 128 rows in chunks of 16, unrolled and in a
``fori_loop``, with autodiff's gradient and with ``keras_dp.ghost_conv``'s (forward
convolutions in the canonical layout). Not a test: nothing here asserts a time; the
ratios within one run are what to read. Figures: benchmarks/README.md.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from keras_dp import ghost_conv as gc

CASES = {  # (what, window, strides, channels in, filters, spatial)
    "kernel gradient, 3x3, 32 -> 64 on 14x14": ("kernel", (3, 3), (1, 1), 32, 64, 14),
    "kernel gradient, 3x3 stride 2, 32 -> 32 on 30x30": ("kernel", (3, 3), (2, 2), 32, 32, 30),
    "input gradient, 3x3, 32 -> 32 on 30x30": ("input", (3, 3), (1, 1), 32, 32, 30),
    "input gradient, 3x3 stride 2, 32 -> 32 on 30x30": ("input", (3, 3), (2, 2), 32, 32, 30),
}
ROWS, CHUNK = 128, 16


def gradient(what, spec, canonical):
    def grad(kernel, x, g):
        _, pullback = jax.vjp(lambda k, x: gc.conv(spec, x, k, canonical), kernel, x)
        dk, dx = pullback(g)
        return jnp.sum(dk) if what == "kernel" else jnp.sum(dx * dx)

    return grad


def run(grad, kernel, x, g, looped):
    def piece(i, total):
        xb = jax.lax.dynamic_slice_in_dim(x, i * CHUNK, CHUNK)
        gb = jax.lax.dynamic_slice_in_dim(g, i * CHUNK, CHUNK)
        return total + grad(kernel, xb, gb)

    if looped:
        return jax.lax.fori_loop(0, ROWS // CHUNK, piece, 0.0)
    total = 0.0
    for i in range(ROWS // CHUNK):
        total = piece(i, total)
    return total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.default_backend()}; ms for {ROWS} rows in chunks")
    columns = ["autodiff, unrolled", "autodiff, fori_loop", "canonical, unrolled"]
    print("| case | " + " | ".join(columns) + " | canonical, fori_loop |")
    print("|---|---|---|---|---|")
    for name, (what, window, strides, c, f, n) in CASES.items():
        spec = gc.Conv(window, strides, "VALID", (1, 1))
        key = jax.random.split(jax.random.key(0), 3)
        kernel = jax.random.normal(key[0], (*window, c, f))
        x = jax.random.normal(key[1], (ROWS, n, n, c))
        out = gc.conv(spec, x[:1], kernel, False).shape[1:]
        g = jax.random.normal(key[2], (ROWS, *out))
        cells = []
        for canonical in (False, True):
            for looped in (False, True):
                grad = gradient(what, spec, canonical)
                fn = jax.jit(lambda k, x, g, grad=grad, lp=looped: run(grad, k, x, g, lp))
                fn(kernel, x, g).block_until_ready()
                start = time.perf_counter()
                for _ in range(args.repeats):
                    fn(kernel, x, g).block_until_ready()
                cells.append(f"{(time.perf_counter() - start) / args.repeats * 1e3:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
