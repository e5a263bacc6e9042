"""The noise draw alone: keras_dp's unrolled Threefry against ``jax.random.normal``.

    python benchmarks/noise.py [--sizes 84170 324000] [--repeats 7]

For each size, the median time of one jitted draw of that many float32 normals, the
two alternated, and their ratio; both give the same values (tests/test_noise.py).
84,170 is the MLP's parameter count in benchmarks/clipping.py, 324,000 the text
classifier's. Its last column is keras_dp's draw compiled with its train step's
compiler options (``keras_dp._backend.compiler_options()``: 512-bit vectors on a
CPU), the same values.

A second table says where the draw's time goes and what the alternatives cost, in the
same alternation: keras_dp's Threefry hash alone (the random bits, no transform), the
bits made uniforms, its draw with the hash and erf⁻¹ fused in one loop (as it drew
before it stored the uniforms between them), and XLA's own generator
(``lax.rng_bit_generator``, Philox, the bits alone, and ``jax.random.normal`` of an
"rbg" key, which draws with it). They are timed, not used: keras_dp keeps
``jax.random.normal``'s exact values.

A third table times the two exact transforms of uniforms into normals alone, from
uniforms already in memory: ``jax.random.normal``'s ``√2·erf⁻¹(u)`` of N uniforms, and
Box–Muller's ``√(−2 ln u₁)·(cos, sin)(2π u₂)`` of N/2 pairs (two normals a pair, so half
the hashing too).

A fourth table times odd lengths: keras_dp's draw of N + 1 normals (an odd count; it
draws whole blocks of ``noise.BLOCK`` and leaves the rest unread) against one stored
draw of exactly N + 1 and of N, the way keras_dp drew before it drew whole blocks. Not
a test: nothing here asserts a time.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from keras_dp import _backend, noise  # noqa: E402


def seconds(fn, key, calls: int = 200) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(key)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def threefry_bits(key, size: int):
    """The 32 random bits of each of keras_dp's draws (``noise._normals`` without its
    transform)."""
    words = jax.random.key_data(key)
    count = jax.lax.iota(jnp.uint32, size)
    x0, x1 = noise.threefry2x32(words[0], words[1], jnp.zeros_like(count), count)
    return x0 ^ x1


def uniforms(key, size: int):
    mantissa = (threefry_bits(key, size) >> np.uint32(9)) | np.uint32(0x3F800000)
    return jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1)


def philox_bits(key, size: int):
    state = jnp.tile(jax.random.key_data(key), 2)
    algorithm = jax.lax.RandomAlgorithm.RNG_PHILOX
    return jax.lax.rng_bit_generator(state, (size,), jnp.uint32, algorithm)[1]


def rbg_normal(key, size: int):
    rbg = jax.random.wrap_key_data(jnp.tile(jax.random.key_data(key), 2), impl="rbg")
    return jax.random.normal(rbg, (size,))


def erf_inv_normals(u):
    """√2·erf⁻¹ of ``u`` (uniforms on [0, 1)) moved to (−1, 1)."""
    return noise._to_normal(2 * u - 1)


def box_muller(pairs):
    radius = jnp.sqrt(np.float32(-2) * jnp.log(pairs[0]))
    angle = np.float32(2 * np.pi) * pairs[1]
    return radius * jnp.cos(angle), radius * jnp.sin(angle)


def exact_draw(key, size: int):
    """One stored draw of exactly ``size`` normals (keras_dp's before whole blocks)."""
    return noise._normals(jax.random.key_data(key), size)


def fused_draw(key, size: int, stddev: float = 1.0):
    """keras_dp's ``gaussian_like`` of one leaf of ``size`` before it stored the
    uniforms: the hash and erf⁻¹ of whole blocks in one stored loop."""
    words = jax.random.key_data(key)
    uniform = lambda: noise._uniforms(words, noise.whole_blocks(size))  # noqa: E731
    flat = noise._drawn_once(lambda: noise._to_normal(uniform()), key)
    return stddev * flat[:size]


def median_ms(draws: dict, key, repeats: int) -> dict:
    times = {name: [] for name in draws}
    for fn in draws.values():
        jax.block_until_ready(fn(key))  # compile
    for _ in range(repeats):
        for name, fn in draws.items():
            times[name].append(seconds(fn, key))
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[84_170, 324_000])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    key = noise.step_key(noise.root_key(0), jnp.int32(0))
    print(f"{jax.default_backend()}, {os.cpu_count()} cores, jax {jax.__version__}\n")
    rows, parts, transforms, odd = [], [], [], []
    for size in args.sizes:
        draws = {
            "keras_dp": lambda k, n=size: noise.gaussian_like(k, [jnp.zeros(n)], 1.0),
            "jax": lambda k, n=size: jax.random.normal(k, (n,)),
            "bits": lambda k, n=size: threefry_bits(k, n),
            "uniforms": lambda k, n=size: uniforms(k, n),
            "fused": lambda k, n=size: fused_draw(k, n),
            "philox": lambda k, n=size: philox_bits(k, n),
            "rbg": lambda k, n=size: rbg_normal(k, n),
        }
        jitted = {name: jax.jit(fn) for name, fn in draws.items()}
        # The same draw compiled with the options of keras_dp's train step.
        jitted["step"] = jax.jit(draws["keras_dp"], compiler_options=_backend.compiler_options())
        ms = median_ms(jitted, key, args.repeats)
        ours = ms["keras_dp"]
        u = jax.random.uniform(key, (2, (size + 1) // 2), minval=1e-6, maxval=1.0)
        alone = median_ms(
            {"erf_inv": lambda _, u=u: _erf(u), "box_muller": lambda _, u=u: _bm(u)},
            key,
            args.repeats,
        )
        transforms.append(
            f"| {size:,} | {alone['erf_inv']:.3f} | {alone['box_muller']:.3f} | "
            f"{alone['box_muller'] / alone['erf_inv']:.2f}× |"
        )
        rows.append(
            f"| {size:,} | {ours:.3f} | {ms['jax']:.3f} | {ours / ms['jax']:.2f}× | "
            f"{ms['step']:.3f} ({ms['step'] / ours:.2f}×) |"
        )
        lengths = {
            "keras_dp": lambda k, n=size + 1: noise.gaussian_like(k, [jnp.zeros(n)], 1.0),
            "exact odd": lambda k, n=size + 1: exact_draw(k, n),
            "exact even": lambda k, n=size: exact_draw(k, n),
        }
        at = median_ms({name: jax.jit(fn) for name, fn in lengths.items()}, key, args.repeats)
        odd.append(
            f"| {size + 1:,} | {at['keras_dp']:.3f} | {at['exact odd']:.3f} | "
            f"{at['exact even']:.3f} | {at['exact odd'] / at['keras_dp']:.2f}× |"
        )
        parts.append(
            f"| {size:,} | {ours:.3f} | {ms['bits']:.3f} ({ms['bits'] / ours:.0%}) | "
            f"{ms['uniforms']:.3f} | {ms['fused']:.3f} ({ms['fused'] / ours:.2f}×) | "
            f"{ms['philox']:.3f} | {ms['rbg']:.3f} |"
        )
    print(
        "| draws | keras_dp ms | jax.random.normal ms | keras_dp / jax | "
        "keras_dp with its step's compiler options (/ without) |"
    )
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nWhere keras_dp's draw goes, and XLA's generator, ms:\n")
    print(
        "| draws | keras_dp normals | its Threefry bits (share) | its uniforms | "
        "hash and erf⁻¹ fused (/ keras_dp) | Philox bits (rng_bit_generator) | "
        "normals of an rbg key |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(parts))
    print("\nThe transforms alone, from uniforms in memory, ms:\n")
    print("| normals | erf⁻¹ (jax.random.normal's) | Box–Muller | Box–Muller / erf⁻¹ |")
    print("|---|---|---|---|")
    print("\n".join(transforms))
    print("\nAn odd number of draws, ms:\n")
    print(
        "| draws | keras_dp (whole blocks) | one draw of exactly N + 1 | "
        "one draw of N | exact / keras_dp |"
    )
    print("|---|---|---|---|---|")
    print("\n".join(odd))


_erf, _bm = jax.jit(erf_inv_normals), jax.jit(box_muller)


if __name__ == "__main__":
    main()
