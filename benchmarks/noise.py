"""The noise draw alone: keras_dp's unrolled Threefry against ``jax.random.normal``.

    python benchmarks/noise.py [--sizes 84170 324000] [--repeats 7]

For each size, the median time of one jitted draw of that many float32 normals, the
two alternated, and their ratio; both give the same values (tests/test_noise.py).
84,170 is the MLP's parameter count in benchmarks/clipping.py, 324,000 the text
classifier's. Not a test: nothing here asserts a time.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from keras_dp import noise  # noqa: E402


def seconds(fn, key, calls: int = 200) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(key)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[84_170, 324_000])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    key = noise.step_key(noise.root_key(0), jnp.int32(0))
    print(f"{jax.default_backend()}, {os.cpu_count()} cores, jax {jax.__version__}\n")
    print("| draws | keras_dp ms | jax.random.normal ms | keras_dp / jax |")
    print("|---|---|---|---|")
    for size in args.sizes:
        draws = {
            "keras_dp": jax.jit(lambda k, n=size: noise.gaussian_like(k, [jnp.zeros(n)], 1.0)),
            "jax": jax.jit(lambda k, n=size: jax.random.normal(k, (n,))),
        }
        times = {name: [] for name in draws}
        for fn in draws.values():
            jax.block_until_ready(fn(key))  # compile
        for _ in range(args.repeats):
            for name, fn in draws.items():
                times[name].append(seconds(fn, key))
        ours, theirs = (1e3 * statistics.median(times[n]) for n in ("keras_dp", "jax"))
        print(f"| {size:,} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f}× |")


if __name__ == "__main__":
    main()
