"""DP LoRA fine-tuning of a tiny keras-hub Gemma3 built from config (offline)."""

import keras
import keras_hub
import numpy as np

import keras_dp


def tiny_gemma():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=64,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
        image_size=None,
        vision_encoder=None,
        sliding_window_size=16,
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
