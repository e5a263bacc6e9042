"""The memory bound on kept per-example gradients (``ghost_norms.keeps``), measured.

    python benchmarks/kept_bound.py [--models cnn128 cnn32] [--logical 256]
                                    [--repeats 7] [--calls 4]
                                    [--out benchmarks/results/kept-bound]

Where a kernel's norm takes the outer form, each example's gradient G_b is formed, and
ghost clipping keeps it for the clipped sum (``ghost_tap.Tap.grads``) only while the
chunk's gradients hold no more numbers than the tap's input and output gradient, or
``ghost_norms.KEPT_NUMBERS`` in all; otherwise the sum contracts x and g again. For
each of ``clipping.py``'s models named, with ``clipping="ghost"``, this measures the
shipped rule against the rule before it (a convolution's gradients kept wherever its
outer form is fastest, whatever their size):

- memory: XLA's peak temporary memory of one compiled step at logical batch 1,024,
  the whole physical batch in one chunk (``clipping.step_memory``), and plain Keras'
  on the same rows;
- time: the compiled step on one chunk of the Poisson bound's rows at ``--logical``,
  and on the batch ``fit`` feeds at the model's usual batch (its default chunks),
  each rule alternated in one process (``step_parts.timed``).

Writes ``README.md`` to --out. Not a test: nothing here asserts a time.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402

import clipping as cb  # noqa: E402
import jax  # noqa: E402
import step_parts as sp  # noqa: E402

from keras_dp import ghost_conv_norms as gcn  # noqa: E402


@contextlib.contextmanager
def rule_before():
    """Steps traced with a convolution's gradients kept wherever its outer form is
    fastest (no memory bound)."""
    shipped = gcn.formed
    gcn.formed = lambda spec, x_shape, g_shape: gcn.norm_form(spec, x_shape, g_shape) == "outer"
    try:
        yield
    finally:
        gcn.formed = shipped


def both_rules(model, batch, repeats: int, calls: int) -> dict:
    """Median ms of the step compiled under each rule, alternated."""
    steps = {}
    with rule_before():
        steps["before"] = sp.compiled(model, batch)
    steps["shipped"] = sp.compiled(model, batch)
    states = {k: jax.tree.map(jax.numpy.copy, cb.train_state(model)) for k in steps}
    sp.timed(steps, states, 1, 2)  # warm
    times = sp.timed(steps, states, repeats, calls)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(name: str, logical: int, repeats: int, calls: int) -> str:
    with rule_before():
        before, rows = cb.step_memory(name, "ghost", 1024)
    shipped, _ = cb.step_memory(name, "ghost", 1024)
    plain, _ = cb.step_memory(name, "plain", rows)
    model, batch = cb.one_chunk(name, "ghost", logical)
    chunk = both_rules(model, batch, repeats, calls)
    build = sp.build
    sp.build = lambda kind, *a, **k: build("ghost" if kind == "auto" else kind, *a, **k)
    try:
        x, y, b, _, dp, usual = sp.fitted(name)
    finally:
        sp.build = build
    fit = both_rules(dp, usual, repeats, calls)
    mib = 2**20
    row = (
        f"| {name} | {before / mib:.0f} | {shipped / mib:.0f} | {plain / mib:.0f} "
        f"| {before / plain:.2f}× → {shipped / plain:.2f}× "
        f"| {chunk['before']:.1f} → {chunk['shipped']:.1f} ({len(batch[1])} rows) "
        f"| {fit['before']:.1f} → {fit['shipped']:.1f} ({b}, {len(usual[1])} rows) |"
    )
    cb.log(row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["cnn128", "cnn32"])
    parser.add_argument("--logical", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/kept-bound")
    args = parser.parse_args()
    rows = [measure(n, args.logical, args.repeats, args.calls) for n in args.models]
    command = "python benchmarks/kept_bound.py --models " + " ".join(args.models)
    text = "\n".join(
        [
            "# A convolution's kept per-example gradients, bounded by memory",
            "",
            f"    {command}",
            "",
            sp._header(command).split("\n")[0],
            "",
            "Ghost clipping; the rule before (gradients kept wherever the outer form is"
            " fastest) → the shipped one (kept only within x and g's numbers or"
            " `KEPT_NUMBERS`). Memory: peak temporary MiB of one compiled step at logical"
            " batch 1,024 in one chunk. Time: ms a compiled step, medians of alternated"
            f" rounds, on one chunk at logical batch {args.logical}, and on the batch fit"
            " feeds (default chunks).",
            "",
            "| model | MiB before | MiB shipped | plain Keras MiB, same rows"
            " | ghost / plain | ms, one chunk | ms, fit's batch |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
