"""Ghost vs per-example clipping: step time, first epoch and memory, as ratios in one run.

    python benchmarks/clipping.py [--models mlp tabular siamese siamese-cnn siamese-text autoencoder
                                            decoder vae-decoder unet
                                            cnn cnn32 cnn128 mobile grouped tcn text text-cnn
                                            lstm gru
                                            simple-rnn
                                            bert-lora bert-full gemma-lora gemma-full]
                                  [--repeats 3] [--out benchmarks/results]
                                  [--microbatch-size K]

Writes ``clipping.md`` and ``clipping.json`` to --out. Not a test: nothing here asserts
a time. Fits alternate (plain Keras, then keras_dp with ``clipping="per_example"``,
``"ghost"`` and ``"auto"``, then the same in reverse order, and so on: no kind always
runs first or last in a repeat, where a drift of the machine would favour it; a
repeat's DP fits share one fixed seed, so they draw the same batches); a step's time
is (epoch wall time / updates) for every epoch after the first, median over the
epochs and the repeats, so sampling, dispatch and callbacks count. The first epoch
is reported apart, as a new user waits for it: the wall time from the ``fit`` call to
the first ``on_epoch_end`` of a fresh model, so fit's checks, σ's calibration (its
in-process memory emptied before every DP fit) and the step's compile count, wherever
they run. ``--microbatch-size`` fixes keras_dp's chunk (default: the platform's
choice). σ's calibration alone is timed too. Memory is XLA's peak temporary memory
of one compiled step at logical batch 32 and 1024: keras_dp's in one chunk (no
microbatching), and plain Keras' beside it, on the logical batch and on as many rows
as keras_dp computes (the Poisson bound's).
``--models`` with no name measures memory only.

The models: an MLP 64-256-256-10 on digits (batch 64), a binary classifier 30-256-256-1
on random tabular data (batch 64; 73,985 parameters, an odd count), a Siamese pair
classifier (one Dense tower 32-256-64 called on both items of a pair, |a − b|, a
Dense(1) head; random pairs, batch 64), a Siamese CNN (one tower of two 3x3
convolutions, average pooling and a Dense(32) on both 16x16 images of a pair, batch
64), a Siamese text classifier (one Embedding(5,000, 64) table looked up for both 32-token
texts of a pair, averaged, one Dense(64) tower, batch 64), a convolutional autoencoder
(16×16 images, two strided convolutions down, two strided transposed ones up, batch 64),
a DCGAN-like decoder (a Dense to 4×4×64, three strided 4×4 transposed convolutions to
32×32, batch 64), the decoder of Keras' VAE example (a 2-number latent, a Dense to
7×7×64, three 3×3 transposed convolutions to 28×28, batch 64), a small U-Net (32×32
images, two strided convolutions down, two strided transposed ones up joined to the
level's features, batch 64),
a CNN (two 3x3
convolutions and a Dense head, digits as 8x8 images, batch 64), a CNN on 32x32x3 images
(four 3x3 convolutions, two strided; random data of CIFAR-10's shape, batch 64), a
VGG block (two 3×3 convolutions of 128 channels on random 16×16×3 images, batch 64), a
MobileNet-like CNN on the same images (a strided convolution, two separable ones), a
ResNeXt-like CNN on them (a strided convolution, two of 8 groups), a
temporal convolutional classifier (three causal Conv1D, dilations 1, 2 and 4, over 64
steps of 8 random features, batch 64), an Embedding text classifier (vocabulary 5,000,
64 tokens, average pooling, two Dense layers, batch 64), Keras' text CNN (vocabulary
2,000, 64 tokens, a Conv1D of width 5, max pooling, batch 64), an LSTM, a GRU and a
SimpleRNN text classifier (the Embedding's 5,000 × 32 table, 32 units, batch 64), a
tiny keras-hub BERT classifier with LoRA rank 4 (2 layers, hidden 64, 64 tokens, batch
32) and fully fine-tuned, and the Gemma3 of ``run.py`` (4 layers, hidden 256, 128
tokens, batch 16) with LoRA and fully fine-tuned. Every model is a plain functional
``keras.Model`` so that every side runs Keras' own ``fit`` on the same arrays.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from run import LOSS, jit_step, log, train_state  # noqa: E402
from step_time import MODELS as STEP_MODELS  # noqa: E402
from step_time import digits_data, functional, mlp  # noqa: E402

import keras_dp  # noqa: E402
from keras_dp import accounting, calibration, sampling  # noqa: E402
from keras_dp import data as dp_data  # noqa: E402
from keras_dp import rows as batch_rows  # noqa: E402

logging.getLogger("absl").setLevel(logging.ERROR)
logging.getLogger("keras_dp").setLevel(logging.ERROR)
EPSILON, DELTA = 8.0, 1e-5
KINDS = ("plain", "per_example", "ghost", "auto")
# Each repeat's DP fits share DPConfig.seed = SEED + repeat, so per_example, ghost and
# auto compute the same draws: on a chunked model a step's time follows its draw's size
# (Gemma3 LoRA, batch 16: 11 to 21 real rows, 3 to 6 chunks), which made differences
# of 5-10% between clipping modes of independent draws. A fixed seed makes a fit not
# private; a benchmark needs no privacy.
SEED = 1000


def tabular():
    """A binary classifier on 30 features: 30-256-256-1, an odd parameter count."""
    return mlp(features=30, outputs=1)


def tabular_data(n=2048):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 30)).astype("float32")
    return x, (x @ rng.normal(size=(30, 1)) > 0).astype("float32")


def siamese():
    """A Siamese pair classifier: one tower (Dense 32-256-64) applied to both items of
    a pair (its layers called twice), |a - b|, a Dense(1) head."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((2, 32))
    first, second = keras.layers.Dense(256, activation="relu"), keras.layers.Dense(64)
    a, b = (second(first(inputs[:, i])) for i in (0, 1))
    return keras.Model(inputs, keras.layers.Dense(1)(keras.ops.abs(a - b)))


def siamese_cnn():
    """A Siamese CNN on pairs of 16×16 images: one tower (two 3×3 convolutions, the
    second strided, average pooling, a Dense(32)) called on both, |a - b|, a Dense(1)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((2, 16, 16, 1))
    tower = [
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(32),
    ]

    def embed(h):
        for layer in tower:
            h = layer(h)
        return h

    a, b = (embed(inputs[:, i]) for i in (0, 1))
    return keras.Model(inputs, keras.layers.Dense(1)(keras.ops.abs(a - b)))


def siamese_text():
    """A duplicate-question classifier: one Embedding(5000, 64) table looked up for both
    texts of a pair (32 tokens each), each averaged, one Dense(64) tower called on both,
    |a - b|, a Dense(1) head."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((2, 32), dtype="int32")
    table = keras.layers.Embedding(5000, 64)
    tower = keras.layers.Dense(64, activation="relu")
    a, b = (tower(keras.ops.mean(table(inputs[:, i]), axis=1)) for i in (0, 1))
    return keras.Model(inputs, keras.layers.Dense(1)(keras.ops.abs(a - b)))


def text_pair_data(n=2048):
    rng = np.random.default_rng(0)
    x = rng.integers(1, 5000, (n, 2, 32)).astype("int32")
    same = rng.random(n) < 0.5
    keep = rng.random((same.sum(), 32)) < 0.7  # a duplicate shares 70% of its tokens
    x[same, 1] = np.where(keep, x[same, 0], x[same, 1])
    return x, same.astype("float32")[:, None]


def autoencoder():
    """A convolutional autoencoder on 16×16 images: two strided 3×3 convolutions down
    (16 and 32 filters), two strided 3×3 transposed convolutions up (16 and 1)."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2DTranspose(16, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2DTranspose(1, 3, strides=2, padding="same"),
        ]
    )


def decoder():
    """A DCGAN-like generator: a Dense to 4×4×64, three strided 4×4 transposed
    convolutions up to 32×32×1 (32, 16 and 1 filters)."""
    keras.utils.set_random_seed(0)
    up = functools.partial(keras.layers.Conv2DTranspose, kernel_size=4, strides=2, padding="same")
    return keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(4 * 4 * 64, activation="relu"),
            keras.layers.Reshape((4, 4, 64)),
            up(32, activation="relu"),
            up(16, activation="relu"),
            up(1),
        ]
    )


def decoder_data(n=1024):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 32)).astype("float32"), rng.normal(size=(n, 32, 32, 1)).astype(
        "float32"
    )


def vae_decoder():
    """The decoder of Keras' VAE example on MNIST: a 2-number latent, a Dense to
    7×7×64, two strided 3×3 transposed convolutions (64, 32 filters) and one unstrided
    to 28×28×1."""
    keras.utils.set_random_seed(0)
    up = functools.partial(
        keras.layers.Conv2DTranspose, kernel_size=3, padding="same", activation="relu"
    )
    return keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(7 * 7 * 64, activation="relu"),
            keras.layers.Reshape((7, 7, 64)),
            up(64, strides=2),
            up(32, strides=2),
            keras.layers.Conv2DTranspose(1, 3, padding="same"),
        ]
    )


def vae_decoder_data(n=1024):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 2)).astype("float32"), rng.normal(size=(n, 28, 28, 1)).astype(
        "float32"
    )


def unet():
    """A small U-Net segmenting 32×32 images into 2 classes: 3×3 convolutions down (16,
    32 strided, 64 strided), strided 3×3 transposed convolutions up (32, 16), each
    joined to the level's features, a 1×1 convolution to the classes."""
    keras.utils.set_random_seed(0)
    conv = functools.partial(keras.layers.Conv2D, padding="same", activation="relu")
    up = functools.partial(
        keras.layers.Conv2DTranspose, kernel_size=3, strides=2, padding="same", activation="relu"
    )
    inputs = keras.Input((32, 32, 1))
    a = conv(16, 3)(inputs)
    b = conv(32, 3, strides=2)(a)
    c = conv(64, 3, strides=2)(b)
    u = keras.layers.Concatenate()([up(32)(c), b])
    u = keras.layers.Concatenate()([up(16)(u), a])
    return keras.Model(inputs, keras.layers.Conv2D(2, 1)(u))


def segmentation_data(n=1024):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 32, 32, 1)).astype("float32")
    return x, (x[..., 0] > 0).astype("int32")


def image_autoencoder_data(n=1024):
    x = image_pair_data(n)[0][:, 0]
    return x, x


def image_pair_data(n=1024):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2, 16, 16, 1)).astype("float32")
    same = rng.random(n) < 0.5
    noise = 0.3 * rng.normal(size=(same.sum(), 16, 16, 1)).astype("float32")
    x[same, 1] = x[same, 0] + noise
    return x, same.astype("float32")[:, None]


def pair_data(n=2048):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2, 32)).astype("float32")
    same = rng.random(n) < 0.5
    x[same, 1] = x[same, 0] + 0.3 * rng.normal(size=(same.sum(), 32)).astype("float32")
    return x, same.astype("float32")[:, None]


def cnn():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )


def image_data():
    x, y = digits_data()
    return x.reshape(-1, 8, 8, 1), y


def cnn32():
    """Four 3×3 convolutions (two strided) on 32×32×3 images (CIFAR-10's shape): its
    forward pass is ~12 MFLOP an example, so a CPU step runs it in chunks."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.Conv2D(64, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )


def mobile():
    """A MobileNet-like CNN on 32×32×3 images: a strided 3×3 convolution, then two
    separable convolutions (depthwise 3×3, pointwise 1×1; the second strided)."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.SeparableConv2D(32, 3, activation="relu"),
            keras.layers.SeparableConv2D(64, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )


def grouped():
    """A ResNeXt-like CNN on 32×32×3 images: a strided 3×3 convolution, then two 3×3
    convolutions of 8 groups (the second strided)."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(64, 3, groups=8, activation="relu"),
            keras.layers.Conv2D(64, 3, strides=2, groups=8, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )


def cnn128():
    """Two 3×3 convolutions of 128 channels ("same") on 16×16×3 images, a VGG block:
    each example's kernel gradient of the second (147,456 numbers) is larger than its
    input and output gradient together (65,536)."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(128, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(128, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )


def small_image_data(n=1024):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 16, 16, 3)).astype("float32")
    return x, rng.integers(0, 10, n).astype("int32")


def cifar_like_data(n=1024):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 32, 32, 3)).astype("float32")
    return x, rng.integers(0, 10, n).astype("int32")


def tcn():
    """A temporal convolutional classifier: three causal Conv1D (dilations 1, 2, 4) over
    64 steps of 8 features, average pooling, a Dense head."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((64, 8)),
            keras.layers.Conv1D(32, 3, padding="causal", activation="relu"),
            keras.layers.Conv1D(32, 3, padding="causal", dilation_rate=2, activation="relu"),
            keras.layers.Conv1D(32, 3, padding="causal", dilation_rate=4, activation="relu"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )


def series_data(n=2048):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 64, 8)).astype("float32")
    return x, (x[:, :, 0].sum(axis=1) > 0).astype("int32")


def text():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((64,), dtype="int32"),
            keras.layers.Embedding(5000, 64),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(2),
        ]
    )


def text_cnn():
    """Keras' text classification from scratch, small: Embedding, a Conv1D of width 5,
    global max pooling, a Dense head."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((64,), dtype="int32"),
            keras.layers.Embedding(2000, 32),
            keras.layers.Conv1D(32, 5, activation="relu"),
            keras.layers.GlobalMaxPooling1D(),
            keras.layers.Dense(2),
        ]
    )


def recurrent(layer):
    """A text classifier over a recurrent layer: Embedding, ``layer`` (32 units, the
    last state), a Dense head."""

    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((64,), dtype="int32"),
                keras.layers.Embedding(5000, 32),
                layer(32),
                keras.layers.Dense(2),
            ]
        )

    return model


def text_cnn_data(n=2048):
    x, y = text_data(n)
    return x % 2000, y


def text_data(n=2048):
    rng = np.random.default_rng(0)
    x = rng.integers(1, 5000, (n, 64)).astype("int32")
    return x, (x[:, 0] % 2).astype("int32")


def bert_lora():
    return bert(lora_rank=4)


def bert_full():
    return bert(lora_rank=None)


def bert(lora_rank):
    """A tiny keras-hub BERT classifier (2 layers, hidden 64, 2 heads, 64 tokens), with
    LoRA of ``lora_rank`` or fully fine-tuned (None)."""
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=1000,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        intermediate_dim=128,
        max_sequence_length=64,
    )
    task = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    if lora_rank is not None:
        backbone.enable_lora(lora_rank)
    return functional(task)


def bert_data(n=512):
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(1, 1000, (n, 64)).astype("int32"),
        "segment_ids": np.zeros((n, 64), "int32"),
        "padding_mask": np.ones((n, 64), bool),
    }
    return x, (x["token_ids"][:, 0] % 2).astype("int32")


MODELS = {  # name: (model_fn, data_fn, batch, epochs)
    "mlp": (mlp, digits_data, 64, 6),
    "tabular": (tabular, tabular_data, 64, 4),
    "siamese": (siamese, pair_data, 64, 4),
    "siamese-cnn": (siamese_cnn, image_pair_data, 64, 3),
    "siamese-text": (siamese_text, text_pair_data, 64, 4),
    "autoencoder": (autoencoder, image_autoencoder_data, 64, 3),
    "decoder": (decoder, decoder_data, 64, 3),
    "vae-decoder": (vae_decoder, vae_decoder_data, 64, 3),
    "unet": (unet, segmentation_data, 64, 3),
    "cnn": (cnn, image_data, 64, 6),
    "cnn32": (cnn32, cifar_like_data, 64, 3),
    "cnn128": (cnn128, small_image_data, 64, 3),
    "tcn": (tcn, series_data, 64, 4),
    "mobile": (mobile, cifar_like_data, 64, 3),
    "grouped": (grouped, cifar_like_data, 64, 3),
    "text": (text, text_data, 64, 4),
    "text-cnn": (text_cnn, text_cnn_data, 64, 4),
    "lstm": (recurrent(keras.layers.LSTM), text_data, 64, 3),
    "gru": (recurrent(keras.layers.GRU), text_data, 64, 3),
    "simple-rnn": (recurrent(keras.layers.SimpleRNN), text_data, 64, 3),
    "bert-lora": (bert_lora, bert_data, 32, 4),
    "bert-full": (bert_full, bert_data, 32, 4),
    "gemma-lora": STEP_MODELS["gemma-lora"],
    "gemma-full": STEP_MODELS["gemma-full"],
}


LOSSES = {
    "tabular": keras.losses.BinaryCrossentropy(from_logits=True),
    "siamese": keras.losses.BinaryCrossentropy(from_logits=True),
    "siamese-cnn": keras.losses.BinaryCrossentropy(from_logits=True),
    "siamese-text": keras.losses.BinaryCrossentropy(from_logits=True),
    "autoencoder": keras.losses.MeanSquaredError(),
    "decoder": keras.losses.MeanSquaredError(),
    "vae-decoder": keras.losses.MeanSquaredError(),
}


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds, self.steps = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = time.perf_counter(), 0
        self.fit_start = getattr(self, "fit_start", self._start)

    def on_train_batch_begin(self, batch, logs=None):
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        self.seconds.append(now - self._start)
        self.steps.append(self._steps)
        if len(self.seconds) == 1:
            self.first_fit_epoch = now - self.fit_start

    def per_step(self) -> list:
        """Seconds an update in each epoch after the first (which compiles)."""
        return [s / k for s, k in zip(self.seconds[1:], self.steps[1:])]


def timed_fit(model, x, y, batch: int, epochs: int) -> EpochTimer:
    """``model.fit`` at ``verbose=0``, timed by epoch: a keras_dp model runs its
    config's plan, a plain one ``epochs`` epochs of ``batch``."""
    timer = EpochTimer()
    plain = not isinstance(model, keras_dp.DPModel)
    kwargs = {"batch_size": batch, "epochs": epochs} if plain else {}
    if not plain:
        forget_calibrations()  # every DP fit searches its σ, as a new user's first does
    timer.fit_start = time.perf_counter()
    model.fit(x, y, verbose=0, callbacks=[timer], **kwargs)
    return timer


def forget_calibrations() -> None:
    """Empties keras_dp's in-process memory of σ and of the ε it computed."""
    calibration._CALIBRATED.clear()
    for cached in (
        accounting._kept_epsilon,
        accounting._step_pld,
        accounting._step_rdp,
        accounting._estimate,
        accounting.epsilon,
    ):
        cached.cache_clear()


MICROBATCH_SIZE = None  # --microbatch-size


def build(kind: str, name: str, n: int, seed: int | None = None) -> keras.Model:
    model_fn, _, batch, epochs = MODELS[name]
    model = model_fn()
    if kind != "plain":
        config = keras_dp.DPConfig(
            target_epsilon=EPSILON,
            target_delta=DELTA,
            batch_size=batch,
            epochs=epochs,
            clipping=kind,
            microbatch_size=MICROBATCH_SIZE,
            seed=seed,
        )
        model = keras_dp.make_private(model, config)
    model.compile(optimizer="adam", loss=LOSSES.get(name, LOSS))
    return model


def one_fit(kind: str, name: str, x, y, seed: int | None = None) -> dict:
    _, _, batch, epochs = MODELS[name]
    model = build(kind, name, len(y), seed)
    start = time.perf_counter()
    timer = timed_fit(model, x, y, batch, epochs)
    return {
        "fit_seconds": time.perf_counter() - start,
        "first_epoch": timer.first_fit_epoch,
        "per_step": timer.per_step(),
    }


def speed(name: str, repeats: int) -> dict:
    """One model's fits, alternated: per kind its median step, first epoch and runs."""
    _, data_fn, batch, _ = MODELS[name]
    x, y = data_fn()
    n = len(y) - len(y) % batch
    x, y = keras.tree.map_structure(lambda a: a[:n], x), y[:n]
    runs = {kind: [] for kind in KINDS}
    for repeat in range(repeats):
        order = KINDS if repeat % 2 == 0 else KINDS[::-1]  # ABBA: no kind always last
        for kind in order:  # a repeat's DP fits draw the same batches
            runs[kind].append(one_fit(kind, name, x, y, seed=SEED + repeat))
            r = runs[kind][-1]
            log(
                f"{name} {kind}: {statistics.median(r['per_step']) * 1e3:.2f} ms/step, "
                f"first epoch {r['first_epoch']:.2f} s"
            )
    return {
        kind: {
            "ms_per_step": 1e3 * statistics.median([t for r in rs for t in r["per_step"]]),
            "first_epoch_s": statistics.median(r["first_epoch"] for r in rs),
            "runs": rs,
        }
        for kind, rs in runs.items()
    }


def step_memory(name: str, kind: str, logical_batch: int) -> tuple[int, int]:
    """(peak temporary bytes, rows) of one compiled step: keras_dp's with its whole
    physical batch in one chunk, or (``kind="plain"``) Keras' own on ``logical_batch``
    rows."""
    model_fn, data_fn, _, _ = MODELS[name]
    x, y = data_fn()
    if kind == "plain":
        model = model_fn()
        model.compile(optimizer="adam", loss=LOSS)
        rows = np.arange(logical_batch) % len(y)
        batch = (keras.tree.map_structure(lambda a: a[rows], x), y[rows])
        model._symbolic_build(data_batch=batch)
        return temp_bytes(model, batch), logical_batch
    model, batch = one_chunk(name, kind, logical_batch)
    return temp_bytes(model, batch), len(batch_rows.unpack_rows(batch)[1])


def one_chunk(name: str, kind: str, logical_batch: int) -> tuple:
    """``(model, batch)``: keras_dp's model (``clipping=kind``) and the batch its step
    takes for ``logical_batch``, the whole physical batch (padded to the Poisson
    bound) one chunk: no microbatching."""
    model_fn, data_fn, _, _ = MODELS[name]
    x, y = data_fn()
    size = max(4 * logical_batch, len(y))
    config = keras_dp.DPConfig(
        target_epsilon=EPSILON,
        batch_size=logical_batch,
        steps=1,
        microbatch_size=1 << 16,  # one chunk: no microbatching
        dataset_size=size,
        seed=0,
        clipping=kind,
    ).calibrate()
    model = keras_dp.make_private(model_fn(), config)
    model.compile(optimizer="adam", loss=LOSS)
    reps = -(-size // len(y))
    tile = lambda a: np.concatenate([a] * reps)[:size]  # noqa: E731
    source = sampling.ExampleSource(keras.tree.map_structure(tile, x), tile(y))
    model._symbolic_build(data_batch=source.gather(np.arange(2)))
    model._dp_seed = 0
    return model, dp_data.DPBatches(model, source, config, 1 << 16, 1)[0]


def temp_bytes(model, batch) -> int:
    """XLA's peak temporary bytes of ``model.train_step`` compiled for ``batch``."""
    batch = jax.tree.map(jax.numpy.asarray, batch)
    compiled = jit_step(model).lower(train_state(model), batch).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def memory(names) -> dict:
    out = {}
    for name in names:
        out[name] = {
            kind: {b: step_memory(name, kind, b) for b in (32, 1024)}
            for kind in ("plain", "per_example", "ghost")
        }
        # Plain Keras on as many rows as keras_dp computes at 1024 (the Poisson bound's
        # padding included): what clipping adds, apart from what the sampler adds.
        rows = out[name]["ghost"][1024][1]
        out[name]["plain_same_rows"] = step_memory(name, "plain", rows)
        log(f"memory {name}: {out[name]}")
    return out


def calibration_seconds() -> dict:
    out = {}
    for name in ("mlp", "gemma-lora"):
        _, data_fn, batch, epochs = MODELS[name]
        n = len(data_fn()[1])
        n -= n % batch
        config = keras_dp.DPConfig(
            target_epsilon=EPSILON, target_delta=DELTA, batch_size=batch, epochs=epochs
        )
        forget_calibrations()
        start = time.perf_counter()
        config.calibrate(n)
        out[name] = time.perf_counter() - start
    return out


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}", "", "    " + results["command"], ""]
    if results["speed"]:
        lines += [
            "| model | plain ms/step | per_example | ghost | auto | per_example / plain "
            "| ghost / plain | auto / plain |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, s in results["speed"].items():
            p = s["plain"]["ms_per_step"]
            ms = [s[k]["ms_per_step"] for k in KINDS[1:]]
            lines.append(
                f"| {name} | {p:.2f} | "
                + " | ".join(f"{m:.2f}" for m in ms)
                + " | "
                + " | ".join(f"**{m / p:.2f}×**" for m in ms)
                + " |"
            )
        lines += [
            "",
            "First epoch as a new user waits for it, seconds: from the `fit` call to the "
            "end of the first epoch (fit's checks, σ's calibration and the compile included):",
            "",
            "| model | plain | per_example | ghost | auto | auto / plain |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in results["speed"].items():
            f = [s[k]["first_epoch_s"] for k in KINDS]
            lines.append(
                f"| {name} | " + " | ".join(f"{v:.2f}" for v in f) + f" | **{f[3] / f[0]:.2f}×** |"
            )
    if "calibration" in results:
        lines += ["", "Calibration of σ alone (once per plan and process), seconds: "]
        lines[-1] += ", ".join(f"{k} {v:.2f}" for k, v in results["calibration"].items())
    if "memory" in results:
        lines += [
            "",
            "Peak temporary memory of one compiled step (MiB; rows computed in brackets): "
            "keras_dp's with its whole physical batch (padded to the Poisson bound) in one "
            "chunk, no microbatching; plain Keras' on the logical batch, and (the last row "
            "of each model) on as many rows as keras_dp's step at 1024:",
            "",
            "| model | step | logical batch 32 | logical batch 1024 | 1024 / 32 "
            "| / plain at 1024 | / plain on the same rows |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, kinds in results["memory"].items():
            plain = kinds.get("plain", {}).get(1024)
            same = kinds.get("plain_same_rows")
            for kind, m in kinds.items():
                if kind == "plain_same_rows":
                    continue
                (a, ra), (b, rb) = m[32], m[1024]
                vs = f"{b / plain[0]:.2f}×" if plain else "–"
                vs_same = f"{b / same[0]:.2f}×" if same and same[1] == rb else "–"
                growth = f"{b / a:.1f}×" if a >= 2**16 else "–"  # XLA kept ~nothing at 32
                lines.append(
                    f"| {name} | {kind} | {a / 2**20:.1f} ({ra}) | {b / 2**20:.1f} ({rb}) "
                    f"| {growth} | {vs} | {vs_same} |"
                )
            if same:
                lines.append(
                    f"| {name} | plain, {same[1]} rows | – | {same[0] / 2**20:.1f} ({same[1]}) "
                    "| – | – | – |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-models", nargs="*", default=["mlp", "cnn", "text"])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--microbatch-size", type=int, default=None)
    args = parser.parse_args()
    global MICROBATCH_SIZE
    MICROBATCH_SIZE = args.microbatch_size
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.default_backend()}; "
        f"jax {jax.__version__}, keras {keras.__version__}",
        "command": "python benchmarks/clipping.py " + " ".join(os.sys.argv[1:]),
    }
    os.makedirs(args.out, exist_ok=True)

    def write():  # after each model too, so that a run cut off keeps what it measured
        with open(os.path.join(args.out, "clipping.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(os.path.join(args.out, "clipping.md"), "w") as f:
            f.write(markdown(results))

    if args.models:
        results["calibration"] = calibration_seconds()
    results["speed"] = {}
    for name in args.models:
        results["speed"][name] = speed(name, args.repeats)
        write()
    if args.memory_models:
        results["memory"] = memory(args.memory_models)
    write()
    log(markdown(results))


if __name__ == "__main__":
    main()
