"""A tied embedding's ghost norm against its per-example gradients: memory and time.

    python benchmarks/tied_embedding.py [--vocab 1024 8192 32768] [--repeats 7]
                                        [--model gemma3|bart]

A language model whose token embedding is also its output projection (keras-hub's
``ReversibleEmbedding(tie_weights=True)``: Gemma, GPT-2, Llama's tied variants) reads
one table twice: as a lookup and in reverse as the logits. keras_dp's ghost clipping
takes that table's per-example norm from the two reads (each one's ghost norm and
their cross term, :func:`keras_dp.ghost_embedding.tied_cross`); the previous release gave
the table per-example gradients ([V, d] for every example of a chunk). Both are run
here on the same model, a Gemma3 (by default 2 layers, hidden 128; 64 tokens, batch 16, random
weights) fully fine-tuned, for each vocabulary size, beside plain Keras' step on the
same 16 rows. ``--model bart``: a keras-hub ``BartSeq2SeqLM`` of the same size (64
tokens into the encoder, 64 into the decoder), whose one table is looked up for both
and read in reverse as the logits (three reads: each side's norm over its reads, then
their cross term). The kinds:

- ``plain``: Keras' own train step;
- ``ghost``: keras_dp, ``clipping="ghost"`` (the table's two reads are ghost);
- ``table per-example``: the same, with the table left to per-example gradients (the
  plan as the previous release made it);
- ``per_example``: every variable's per-example gradients.

Each keras_dp step is one compiled train step over its physical batch with 16 real
rows (its chunks as fit would run them); XLA's peak temporary memory and the median
time of the compiled step, the kinds alternated. Then each DP kind's memory with the
whole physical batch in one chunk, as keras_dp runs it on a GPU or TPU. Not a test:
nothing asserts a time.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keras-hub imports TensorFlow

import argparse  # noqa: E402
import contextlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
from unittest import mock  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from profile_step import dp_batch, seconds  # noqa: E402
from run import jit_step, train_state  # noqa: E402

import keras_dp  # noqa: E402
from keras_dp import ghost, offline, sampling  # noqa: E402
from keras_dp import rows as batch_rows  # noqa: E402

BATCH, LENGTH = 16, 64
KINDS = ("plain", "ghost", "table per-example", "per_example")
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


HIDDEN, LAYERS, MODEL = 128, 2, "gemma3"  # --hidden, --layers, --model


def lm(vocab: int) -> keras.Model:
    import keras_hub

    keras.utils.set_random_seed(0)
    if MODEL == "bart":
        backbone = keras_hub.models.BartBackbone(
            vocabulary_size=vocab, num_layers=LAYERS, num_heads=2, hidden_dim=HIDDEN,
            intermediate_dim=2 * HIDDEN, max_sequence_length=LENGTH,
        )  # fmt: skip
        task = keras_hub.models.BartSeq2SeqLM(backbone=backbone, preprocessor=None)
        return keras.Model(task.inputs, task.outputs)
    backbone = offline.gemma3_backbone(
        vocabulary_size=vocab, num_layers=LAYERS, hidden_dim=HIDDEN, sequence_length=LENGTH
    )
    task = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    return keras.Model(task.inputs, task.outputs)


def tokens(vocab: int, n: int = 4 * BATCH):
    rng = np.random.default_rng(0)
    sides = ("encoder_", "decoder_") if MODEL == "bart" else ("",)
    x = {}
    for side in sides:
        x[f"{side}token_ids"] = rng.integers(1, vocab, (n, LENGTH)).astype("int32")
        x[f"{side}padding_mask"] = np.ones((n, LENGTH), bool)
    return x, rng.integers(1, vocab, (n, LENGTH)).astype("int32")


def compiled(kind: str, vocab: int, microbatch: int | None = None):
    """(compiled step, state, batch) of ``kind`` on ``BATCH`` real rows, keras_dp's in
    chunks of ``microbatch`` rows (None: the platform's choice)."""
    x, y = tokens(vocab)
    model = lm(vocab)
    if kind == "plain":
        model.compile(optimizer="adam", loss=LOSS)
        batch = jax.tree.map(lambda a: a[:BATCH], (x, y))
        model._symbolic_build(data_batch=batch)
    else:
        config = keras_dp.DPConfig(
            target_epsilon=3.0,
            batch_size=BATCH,
            steps=10,
            dataset_size=len(y),
            seed=0,
            microbatch_size=microbatch,
            clipping="per_example" if kind == "per_example" else "ghost",
        ).calibrate()
        model = keras_dp.make_private(model, config)
        model.compile(optimizer="adam", loss=LOSS)
        source = sampling.ExampleSource(x, y)
        model._symbolic_build(data_batch=source.gather(np.arange(2)))
        model._dp_seed = 0
        batch = dp_batch(model, x, y, BATCH)
    batch = jax.tree.map(jax.numpy.asarray, batch)
    state = train_state(model)
    untied = mock.patch.object(ghost, "_tied", lambda taps, i: False)
    with untied if kind == "table per-example" else contextlib.nullcontext():
        step = jit_step(model).lower(state, batch).compile()
    return step, state, batch


def one_pass_mib(vocab: int) -> dict:
    """Peak temporary memory (MiB) of each DP kind's step with its whole physical batch
    in one chunk, as on an accelerator (:func:`keras_dp.step.chunk_size`)."""
    out = {}
    for kind in KINDS[1:]:
        step, _, batch = compiled(kind, vocab, 1 << 16)
        out[kind] = step.memory_analysis().temp_size_in_bytes / 2**20
        out["rows"] = len(batch_rows.unpack_rows(batch)[1])
    return out


def measure(vocab: int, repeats: int) -> dict:
    steps = {kind: compiled(kind, vocab) for kind in KINDS}
    times = {kind: [] for kind in KINDS}
    for kind in KINDS:  # warm
        seconds(*steps[kind])
    for _ in range(repeats):  # alternated
        for kind in KINDS:
            times[kind].append(seconds(*steps[kind]))
    return {
        kind: {
            "ms": 1e3 * statistics.median(times[kind]),
            "temp_mib": steps[kind][0].memory_analysis().temp_size_in_bytes / 2**20,
        }
        for kind in KINDS
    }


def main() -> None:
    global HIDDEN, LAYERS, MODEL
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", nargs="+", type=int, default=[1024, 8192, 32768])
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", choices=["gemma3", "bart"], default=MODEL)
    parser.add_argument("--memory-only", action="store_true", help="one chunk's memory alone")
    args = parser.parse_args()
    HIDDEN, LAYERS, MODEL = args.hidden, args.layers, args.model
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {jax.default_backend()}; "
        f"jax {jax.__version__}, keras {keras.__version__}\n\n"
        "    python benchmarks/tied_embedding.py "
        f"--vocab {' '.join(map(str, args.vocab))} --hidden {HIDDEN} --layers {LAYERS} "
        f"--repeats {args.repeats} --model {MODEL}"
        f"{' --memory-only' if args.memory_only else ''}\n"
    )
    if not args.memory_only:
        print(
            "| vocabulary | " + " | ".join(f"{k} ms (× plain)" for k in KINDS[1:]) + " | plain ms |"
        )
        print("|---" * len(KINDS) + "|---|")
        memory = []
        for vocab in args.vocab:
            r = measure(vocab, args.repeats)
            plain = r["plain"]["ms"]
            cells = [f"{r[k]['ms']:.0f} ({r[k]['ms'] / plain:.2f}×)" for k in KINDS[1:]]
            print(f"| {vocab:,} | " + " | ".join(cells) + f" | {plain:.0f} |", flush=True)
            memory.append((vocab, r))
        print("\nPeak temporary memory of the compiled step (above), MiB:\n")
        print("| vocabulary | " + " | ".join(KINDS) + " |")
        print("|---" * (len(KINDS) + 1) + "|")
        for vocab, r in memory:
            cells = [f"{r[k]['temp_mib']:.0f}" for k in KINDS]
            print(f"| {vocab:,} | " + " | ".join(cells) + " |")
    print("\nThe same, the whole physical batch in one chunk (as on an accelerator), MiB:\n")
    print("| vocabulary | rows | " + " | ".join(KINDS[1:]) + " | ghost / table per-example |")
    print("|---" * (len(KINDS) + 2) + "|")
    for vocab in args.vocab:
        r = one_pass_mib(vocab)
        cells = [f"{r[k]:.0f}" for k in KINDS[1:]]
        ratio = r["ghost"] / r["table per-example"]
        print(
            f"| {vocab:,} | {r['rows']} | " + " | ".join(cells) + f" | {ratio:.2f}× |", flush=True
        )


if __name__ == "__main__":
    main()
