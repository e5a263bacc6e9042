"""DP LoRA fine-tuning of a tiny keras-hub Gemma3 built from config (offline), and ghost
clipping on other keras-hub families (GPT2, Llama) against per-example gradients."""

import functools

import keras
import keras_hub
import numpy as np
import pytest

import keras_dp
from keras_dp import ghost, offline

from .helpers import ghost_plan, whole_batch_update
from .test_ghost import assert_same_sums, clipped_sum, fallback_of


def tiny_gemma():
    keras.utils.set_random_seed(0)
    backbone = offline.gemma3_backbone(
        vocabulary_size=64, num_layers=1, hidden_dim=16, sequence_length=16, num_query_heads=2
    )
    return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)


def test_lora_dp_fit_on_causal_lm_changes_only_lora_weights():
    lm = tiny_gemma()
    lm.backbone.enable_lora(rank=2)
    rng = np.random.default_rng(0)
    n, length = 32, 8
    x = {
        "token_ids": rng.integers(1, 64, (n, length)).astype("int32"),
        "padding_mask": np.ones((n, length), bool),
    }
    y = rng.integers(1, 64, (n, length)).astype("int32")
    weights = np.ones((n, length), "float32")
    config = keras_dp.DPConfig(target_epsilon=8.0, batch_size=8, epochs=2, seed=0)
    lm = keras_dp.make_private(lm, config)
    assert isinstance(lm, keras_hub.models.Gemma3CausalLM) and isinstance(lm, keras_dp.DPModel)
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = {v.path: np.array(v.value) for v in lm.weights}
    history = lm.fit(
        x, y, sample_weight=weights, verbose=0, callbacks=[keras_dp.callbacks.PrivacyBudget()]
    )
    changed = {v.path for v in lm.weights if not np.array_equal(before[v.path], np.array(v.value))}
    assert changed and all("lora_kernel" in path for path in changed)
    # lora_kernel_b starts at zero, so it must have moved; the base kernels never do.
    assert any("lora_kernel_b" in path for path in changed)
    spent = lm.privacy_spent()
    assert spent.steps == 8 and spent.epsilon <= 8.0
    assert history.history["epsilon"][-1] == spent.epsilon
    assert lm.predict(x, verbose=0).shape == (n, length, 64)


def test_raw_strings_are_preprocessed_once_then_sampled(tmp_path):
    from keras_dp import data, sampling

    lm = offline.tiny_gemma3(sequence_length=64, num_layers=1, hidden_dim=32, pretrain_epochs=0)
    pairs = offline.synthetic_dialogues(48)
    raw = offline.as_prompts_and_responses(pairs[:40])
    held_out = offline.as_prompts_and_responses(pairs[40:])  # raw too: fit preprocesses it
    # The whole-set preprocessing equals the preprocessor's own output, row for row.
    source = data.preprocess(lm.preprocessor, sampling.ExampleSource(raw), chunk=16)
    x, y, sw = source.gather(np.array([3, 39]))
    want_x, want_y, want_sw = lm.preprocessor({k: [v[3], v[39]] for k, v in raw.items()})
    np.testing.assert_array_equal(x["token_ids"], np.asarray(want_x["token_ids"]))
    np.testing.assert_array_equal(y, np.asarray(want_y))
    np.testing.assert_array_equal(sw, np.asarray(want_sw))
    assert sw.sum() > 0 and sw.sum() < sw.size  # the loss covers the response only

    lm.backbone.enable_lora(rank=2)
    lm = keras_dp.make_private(lm, keras_dp.DPConfig(target_epsilon=8.0, batch_size=8, epochs=1))
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = {v.path: np.array(v.value) for v in lm.weights}
    history = lm.fit(raw, validation_data=held_out, verbose=0).history
    changed = {v.path for v in lm.weights if not np.array_equal(before[v.path], np.array(v.value))}
    assert changed and all("lora_kernel" in path for path in changed)
    assert lm.dp_config.dataset_size == 40 and lm.dp_steps == 5
    assert lm.privacy_spent().epsilon <= 8.0
    held_out_loss = lm.evaluate(held_out, verbose=0, return_dict=True)["loss"]
    assert history["val_loss"][-1] == pytest.approx(held_out_loss, rel=1e-5)
    assert isinstance(lm.generate(raw["prompts"][:1], max_length=64)[0], str)

    # keras-hub's own preset format keeps the DP class, the plan and the ledger (Keras
    # saves each LoRA kernel merged into its base kernel: the same function).
    lm.save_to_preset(str(tmp_path / "preset"))
    loaded = keras_hub.models.Gemma3CausalLM.from_preset(str(tmp_path / "preset"))
    assert isinstance(loaded, keras_dp.DPModel) and loaded.dp_steps == 5
    assert loaded.dp_config == lm.dp_config
    assert loaded.privacy_spent() == lm.privacy_spent()
    tokens = {"token_ids": x["token_ids"], "padding_mask": x["padding_mask"]}
    np.testing.assert_allclose(loaded(tokens), lm(tokens), rtol=1e-5, atol=1e-5)


def test_the_preset_path_runs_offline_in_bfloat16(tmp_path):
    """The notebook's PRESET path: save_to_preset, then from_preset(directory) in bfloat16
    (as real Gemma presets load), LoRA, DP fit on raw strings through the preprocessor."""
    small = offline.tiny_gemma3(
        sequence_length=16, num_layers=1, hidden_dim=16, vocabulary_size=128, pretrain_epochs=0
    )
    small.save_to_preset(str(tmp_path / "preset"))
    lm = offline.gemma3_causal_lm(str(tmp_path / "preset"), sequence_length=16, dtype="bfloat16")
    assert lm.backbone.token_embedding.embeddings.dtype == "bfloat16"
    lm.backbone.enable_lora(rank=2)
    pairs = offline.synthetic_dialogues(limit=40)
    data = offline.as_prompts_and_responses(pairs)
    lm = keras_dp.make_private(lm, keras_dp.DPConfig(target_epsilon=8.0, batch_size=8, epochs=1))
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = {v.path: np.array(v.value, np.float32) for v in lm.trainable_variables}
    lm.fit(data, verbose=0)
    moved = [p for p, v in ((v.path, v) for v in lm.trainable_variables)
             if not np.array_equal(before[p], np.array(v.value, np.float32))]  # fmt: skip
    assert moved and all("lora_kernel" in p for p in moved)
    assert 0 < lm.privacy_spent().epsilon <= 8.0
    assert isinstance(lm.generate("Hi", max_length=8), str)


def test_user_level_uls_on_raw_dialogues_with_a_preprocessor():
    """Each dialogue's first speaker is its user; user blocks go through the keras-hub
    preprocessor's output (token dicts) and the causal LM's loss."""
    lm = offline.tiny_gemma3(sequence_length=48, num_layers=1, hidden_dim=32, pretrain_epochs=0)
    pairs = offline.synthetic_dialogues(60)
    raw = offline.as_prompts_and_responses(pairs)
    users = [p["dialogue"].split(":", 1)[0] for p in pairs]
    lm.backbone.enable_lora(rank=2)
    config = keras_dp.DPConfig(
        target_epsilon=8.0, batch_size=4, epochs=1, privacy_unit="user", examples_per_user=3
    )
    lm = keras_dp.make_private(lm, config)
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    before = {v.path: np.array(v.value) for v in lm.weights}
    history = lm.fit(raw, user_ids=users, verbose=0)
    changed = {v.path for v in lm.weights if not np.array_equal(before[v.path], np.array(v.value))}
    assert changed and all("lora_kernel" in path for path in changed)
    assert lm.dp_config.dataset_size == len(set(users))  # N counts users
    assert lm.privacy_spent().epsilon <= 8.0
    assert 0 <= history.history["sparse_categorical_accuracy"][-1] <= 1


def enable_lora(backbone) -> None:
    """LoRA rank 2 with random B (it starts at zero, which would hide A's gradient)."""
    backbone.enable_lora(rank=2)
    rng = np.random.default_rng(1)
    for v in backbone.trainable_variables:
        if "lora_kernel_b" in v.path:
            v.assign(rng.normal(size=v.shape).astype("float32"))


def _gemma_clipped_sum(clipping: str, lora: bool):
    """One update's clipped sum on the tiny Gemma3 (σ = 0, every example, SGD at lr B)."""
    lm = tiny_gemma()
    if lora:
        enable_lora(lm.backbone)
    start = [np.asarray(v, np.float64) for v in lm.trainable_variables]
    rng = np.random.default_rng(0)
    n, length = 6, 8
    lengths = rng.integers(3, length + 1, (n, 1))
    x = {
        "token_ids": rng.integers(1, 64, (n, length)).astype("int32"),
        "padding_mask": np.arange(length)[None, :] < lengths,  # padded sequences
    }
    y = rng.integers(1, 64, (n, length)).astype("int32")
    config = whole_batch_update(n, 0.05, clipping)
    lm = keras_dp.make_private(lm, config)
    lm.compile(
        optimizer=keras.optimizers.SGD(learning_rate=float(n)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    lm.fit(x, y, sample_weight=x["padding_mask"].astype("float32"), verbose=0)
    return [s - np.asarray(v, np.float64) for s, v in zip(start, lm.trainable_variables)]


def test_ghost_equals_per_example_on_gemma3_lora_and_full():
    """keras-hub's EinsumDense layers (with LoRA), its tied ReversibleEmbedding (the
    lookup and the logits: two taps of one table) and RMS norms, on padded sequences
    with weights. Fully fine-tuned, only the RMS norms' scales get per-example
    gradients."""
    for lora in (True, False):
        assert_same_sums(_gemma_clipped_sum("per_example", lora), _gemma_clipped_sum("ghost", lora))
    x = {"token_ids": np.ones((1, 8), "int32"), "padding_mask": np.ones((1, 8), bool)}
    lm = tiny_gemma()
    plan = ghost_plan(lm, x)
    assert plan.fallback and all(path.endswith("scale") for path in plan.fallback)
    # What sizes an accelerator's chunks, before any trace: the same variables.
    assert ghost.likely_per_example_size(lm) == plan.fallback_size
    tied = [t for t in plan.active if t.tied]
    assert sorted(t.kind for t in tied) == ["einsum", "embedding"]
    assert all(t.layer.endswith("token_embedding") for t in tied)


HUB_BACKBONES = {  # other families' layers: Keras' attention, LayerNorm offsets, GQA
    "gpt2": lambda: keras_hub.models.GPT2Backbone(
        vocabulary_size=64,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
    ),
    "llama": lambda: keras_hub.models.LlamaBackbone(
        vocabulary_size=64,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
    ),
}


def hub_classifier(family: str, lora: bool) -> keras.Model:
    """A backbone of ``family`` with a Dense head on its first token."""
    keras.utils.set_random_seed(0)
    backbone = HUB_BACKBONES[family]()
    if lora:
        enable_lora(backbone)
    inputs = {
        "token_ids": keras.Input((8,), dtype="int32", name="token_ids"),
        "padding_mask": keras.Input((8,), dtype="bool", name="padding_mask"),
    }
    logits = keras.layers.Dense(3)(backbone(inputs)[:, 0, :])
    return keras.Model(inputs, logits)


def hub_data(n: int = 6):
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(1, 64, (n, 8)).astype("int32"),
        "padding_mask": np.arange(8)[None, :] < rng.integers(3, 9, (n, 1)),  # padded
    }
    return x, rng.integers(0, 3, n)


@pytest.mark.parametrize("family", sorted(HUB_BACKBONES))
def test_ghost_equals_per_example_on_gpt2_and_llama_classifiers(family):
    """Every example clipped (C = 0.05), padded sequences, LoRA on and off; every
    kernel (attention's EinsumDense, the MLPs', LoRA's adapters) takes ghost norms."""
    x, y = hub_data()
    for lora in (True, False):
        model_fn = functools.partial(hub_classifier, family, lora)
        fallback = fallback_of(model_fn, x)
        assert not any("kernel" in path for path in fallback), fallback
        assert lora == (not fallback)  # full: norm scales, position or unused embeddings
        want = clipped_sum(model_fn, x, y, "per_example", clip=0.05)  # σ = 0, SGD at lr B
        assert_same_sums(want, clipped_sum(model_fn, x, y, "ghost", clip=0.05))
