"""An embedding's table under ``clipping="auto"``: ghost norm or per-example gradients.

    python benchmarks/embedding_table.py [--cases 64,1000,64 512,256,32 ...] [--repeats 2]
                                         [--pool average|max]

An Embedding text classifier (tokens → Embedding(V, d) → average → Dense(64) →
Dense(2), batch 64) over a grid of (tokens T, vocabulary V, features d). ``auto`` gives
the table ghost norms unless its norm costs more than forming its per-example gradient,
a zeroed V×d table an example (``keras_dp.ghost._cheaper``, ``ghost_embedding.TABLE_COST``).
Averaged, the table's norm takes each position's gradient norm
(``keras_dp.ghost_pooling``); ``--pool max`` (``GlobalMaxPooling1D``) gives each
position its own gradient, and the norm the forms over all d features.
Four fits a case, alternated, through Keras' ``fit`` at ``verbose=0``:

- ``plain``: Keras' own;
- ``auto``: keras_dp's default, and which way it took the table;
- ``table ghost`` and ``table per-example``: ``auto`` with the table's choice forced
  (``ghost._cheaper`` patched for it here; the library has no such switch).

A step's time is each epoch's wall time over its updates, after the first (compiling)
epoch, the median over epochs and repeats. Random ids and labels, N = 1,024, 3 epochs
(48 updates). Prints a Markdown table. Not a test: nothing here asserts a time.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
from unittest import mock  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from clipping import timed_fit  # noqa: E402

import keras_dp  # noqa: E402
from keras_dp import ghost  # noqa: E402

BATCH, N, EPOCHS = 64, 1024, 3
KINDS = ("plain", "auto", "table ghost", "table per-example")
CASES = [
    (64, 1000, 64),
    (128, 1000, 32),
    (256, 5000, 32),
    (64, 5000, 64),
    (256, 1000, 16),
    (512, 256, 32),
    (1024, 100, 64),
    (128, 200, 32),
    (64, 100, 16),
]
logging.getLogger("keras_dp").setLevel(logging.ERROR)


POOLS = {"average": keras.layers.GlobalAveragePooling1D, "max": keras.layers.GlobalMaxPooling1D}


def classifier(tokens: int, vocab: int, dim: int, pool: str = "average") -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((tokens,), dtype="int32"),
            keras.layers.Embedding(vocab, dim),
            POOLS[pool](),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(2),
        ]
    )


def table_choice(kind: str):
    """A patch of ``ghost._cheaper`` that forces the table's choice (none: auto's)."""
    if kind not in ("table ghost", "table per-example"):
        return contextlib.nullcontext()
    chosen = kind == "table ghost"
    cheaper = ghost._cheaper

    def forced(taps, index):
        if any(t.kernel == index and t.kind == "embedding" for t in taps):
            return chosen
        return cheaper(taps, index)

    return mock.patch.object(ghost, "_cheaper", forced)


class TableLog(logging.Handler):
    """Whether ghost's fallback line names the embedding (auto left it per-example)."""

    def __init__(self):
        super().__init__()
        self.per_example = False

    def emit(self, record):
        self.per_example |= "embedding" in record.getMessage()


def one_fit(kind: str, case, x, y, pool: str) -> list:
    model = classifier(*case, pool)
    if kind != "plain":
        config = keras_dp.DPConfig(
            target_epsilon=8.0, target_delta=1e-5, batch_size=BATCH, epochs=EPOCHS, seed=1
        )
        model = keras_dp.make_private(model, config)
    model.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    with table_choice(kind):
        return timed_fit(model, x, y, BATCH, EPOCHS).per_step()


def measure(case, repeats: int, pool: str) -> tuple[dict, bool]:
    tokens, vocab, _ = case
    rng = np.random.default_rng(0)
    x = rng.integers(1, vocab, (N, tokens)).astype("int32")
    y = (x[:, 0] % 2).astype("int32")
    times = {kind: [] for kind in KINDS}
    log = TableLog()
    ghost_logger = logging.getLogger("keras_dp.ghost")
    for _ in range(repeats):
        for kind in KINDS:
            if kind == "auto":
                ghost_logger.addHandler(log)
                ghost_logger.setLevel(logging.INFO)
                ghost_logger.propagate = False
            try:
                times[kind] += one_fit(kind, case, x, y, pool)
            finally:
                ghost_logger.removeHandler(log)
                ghost_logger.setLevel(logging.ERROR)
                ghost_logger.propagate = True
    return {k: 1e3 * statistics.median(t) for k, t in times.items()}, log.per_example


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=[",".join(map(str, c)) for c in CASES])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pool", choices=sorted(POOLS), default="average")
    args = parser.parse_args()
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, {jax.default_backend()}; "
        f"jax {jax.__version__}, keras {keras.__version__}; {args.pool} pooling\n"
    )
    print(
        "| tokens, vocabulary, features | plain ms | auto ms (its table) | table ghost | "
        "table per-example | auto / plain | auto / best of the two |"
    )
    print("|---|---|---|---|---|---|---|")
    for text in args.cases:
        case = tuple(int(v) for v in text.split(","))
        ms, per_example = measure(case, args.repeats, args.pool)
        best = min(ms["table ghost"], ms["table per-example"])
        print(
            f"| {case[0]}, {case[1]:,}, {case[2]} | {ms['plain']:.2f} | {ms['auto']:.2f} "
            f"({'per-example' if per_example else 'ghost'}) | {ms['table ghost']:.2f} | "
            f"{ms['table per-example']:.2f} | {ms['auto'] / ms['plain']:.2f}× | "
            f"{ms['auto'] / best:.2f}× |",
            flush=True,
        )


if __name__ == "__main__":
    main()
