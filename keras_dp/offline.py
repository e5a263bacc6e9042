"""The examples' offline default: a tiny Gemma3 and the synthetic dialogue corpus.

Pretrained presets and dataset downloads need a network. Offline, the examples
build a small ``Gemma3CausalLM`` from config with a SentencePiece tokenizer trained
at run time, and stand in for pretraining by training it briefly (non-privately)
on the dialogues of the PUBLIC split: language only, no summaries. The corpus is
SYNTHETIC (``keras_dp/assets``, made by ``scripts/make_synthetic_dialogues.py``)
and split three ways: ``TRAIN`` (the private fine-tuning data), ``EVAL`` (held
out) and ``PUBLIC`` (tokenizer and pretraining only). Needs the ``hub`` extra.
"""

from __future__ import annotations

import io
import json
import pathlib
import warnings

from keras_dp._backend import import_quietly

CORPUS = pathlib.Path(__file__).parent / "assets" / "synthetic_dialogues.jsonl"
TRAIN, EVAL, PUBLIC = slice(0, 2000), slice(2000, 2400), slice(2400, 3000)
_PRETRAINED: dict = {}  # weights of pretrained tiny models, by their settings


def synthetic_dialogues(limit: int | None = None) -> list[dict]:
    """The shipped SYNTHETIC ``{"dialogue", "summary"}`` pairs (3,000; template-made)."""
    with CORPUS.open() as f:
        pairs = [json.loads(line) for line in f]
    return pairs[:limit] if limit is not None else pairs


def prompt(dialogue: str) -> str:
    """The instruction prompt used for every example (Gemma chat turns)."""
    return (
        "<start_of_turn>user\nSummarize this dialogue:\n"
        f"{dialogue}<end_of_turn>\n<start_of_turn>model\n"
    )


def as_prompts_and_responses(pairs: list[dict]) -> dict[str, list[str]]:
    """Pairs in the ``{"prompts", "responses"}`` form keras-hub causal-LM preprocessors take."""
    return {
        "prompts": [prompt(p["dialogue"]) for p in pairs],
        "responses": [p["summary"] + "<end_of_turn>" for p in pairs],
    }


def train_tokenizer(texts: list[str], vocabulary_size: int = 256) -> bytes:
    """A SentencePiece model (bytes) trained in memory, with Gemma's special pieces."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocabulary_size,
        model_type="unigram",
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        bos_piece="<bos>",
        eos_piece="<eos>",
        unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        character_coverage=1.0,
        hard_vocab_limit=False,  # the template corpus has few distinct words
        minloglevel=2,
    )
    return model.getvalue()


def gemma3_backbone(
    vocabulary_size: int,
    num_layers: int,
    hidden_dim: int,
    sequence_length: int,
    num_query_heads: int = 4,
    num_key_value_heads: int = 1,
):
    """A text-only ``Gemma3Backbone`` from config (random weights, no download).

    ``num_key_value_heads`` key/value heads (one by default),
    ``head_dim = hidden_dim // num_query_heads``, an MLP of ``2 * hidden_dim`` and a
    sliding window of ``sequence_length``.
    """
    keras_hub = import_quietly("keras_hub")

    return keras_hub.models.Gemma3Backbone(
        vocabulary_size=vocabulary_size,
        num_layers=num_layers,
        num_query_heads=num_query_heads,
        num_key_value_heads=num_key_value_heads,
        hidden_dim=hidden_dim,
        intermediate_dim=2 * hidden_dim,
        head_dim=hidden_dim // num_query_heads,
        image_size=None,
        vision_encoder=None,
        sliding_window_size=sequence_length,
    )


def gemma3_causal_lm(
    preset: str | None = None, sequence_length: int = 128, dtype: str | None = None, **tiny_options
):
    """``Gemma3CausalLM.from_preset(preset, dtype=dtype)`` (a Kaggle/Hugging Face name
    needs a network; a local directory written by ``save_to_preset`` does not), or
    offline :func:`tiny_gemma3` when ``preset`` is None; ``tiny_options`` go to the
    latter."""
    if preset is None:
        return tiny_gemma3(sequence_length=sequence_length, **tiny_options)
    keras_hub = import_quietly("keras_hub")

    kwargs = {} if dtype is None else {"dtype": dtype}
    lm = keras_hub.models.Gemma3CausalLM.from_preset(preset, **kwargs)
    lm.preprocessor.sequence_length = sequence_length
    return lm


def tiny_gemma3(
    sequence_length: int = 128,
    num_layers: int = 2,
    hidden_dim: int = 64,
    vocabulary_size: int = 256,
    seed: int = 0,
    pretrain_epochs: int = 3,
):
    """A ``Gemma3CausalLM`` pretrained on the PUBLIC split's dialogues (language only).

    The tokenizer and the pretraining see only the PUBLIC split, so a DP run on
    ``TRAIN`` covers everything its data touched. Pretrained weights are cached,
    so a second call with the same settings returns a fresh copy at once.
    """
    import keras

    keras_hub = import_quietly("keras_hub")

    keras.utils.set_random_seed(seed)  # before the tokenizer: TF's reseed drops its resource
    public = synthetic_dialogues()[PUBLIC]
    texts = [prompt(p["dialogue"]) for p in public] + [p["summary"] for p in public]
    tokenizer = keras_hub.models.Gemma3Tokenizer(
        proto=train_tokenizer(texts, vocabulary_size), has_vision_tokens=False
    )
    backbone = gemma3_backbone(tokenizer.vocabulary_size(), num_layers, hidden_dim, sequence_length)
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=sequence_length
    )
    lm = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)
    if pretrain_epochs:
        key = (sequence_length, num_layers, hidden_dim, vocabulary_size, seed, pretrain_epochs)
        if key not in _PRETRAINED:
            _PRETRAINED[key] = _pretrain(lm, [p["dialogue"] for p in public], pretrain_epochs)
        lm.backbone.set_weights(_PRETRAINED[key])
    return lm


def _pretrain(lm, texts: list[str], epochs: int) -> list:
    """Non-private language-model training on public ``texts``; the backbone's weights."""
    import keras

    lm.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    with warnings.catch_warnings():  # keras-hub's tf.data path: "shuffle ... ignored"
        warnings.filterwarnings("ignore", message=".*shuffle=True.*")
        lm.fit(
            {"prompts": [""] * len(texts), "responses": texts},
            batch_size=16,
            epochs=epochs,
            verbose=0,
        )
    return lm.backbone.get_weights()
