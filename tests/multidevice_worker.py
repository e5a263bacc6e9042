"""Runs DP fits on N simulated CPU devices (or in one of several processes).

Usage: python multidevice_worker.py OUT.npz DEVICES [PROCESS_ID NUM_PROCESSES PORT]
XLA_FLAGS must be set before JAX is imported, hence a separate process per device
count. Each scenario's weights, ε and physical batch are saved for the test to compare.
"""

import dataclasses
import os
import sys

out, devices = sys.argv[1], int(sys.argv[2])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402

if len(sys.argv) > 3:  # one of several processes on localhost, CPU collectives
    process_id, num_processes, port = (int(a) for a in sys.argv[3:6])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_dp  # noqa: E402
from keras_dp import data  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
results = {}


def data_parallel():
    if jax.device_count() > 1:
        devices = keras.distribution.list_devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))


def flat(model):
    return np.concatenate([np.ravel(np.asarray(v.value)) for v in model.trainable_variables])


def physical_rows(model, x, y):
    config = model.dp_config
    source = keras_dp.sampling.ExampleSource(x, y)
    from keras_dp.step import chunk_size

    shards, _ = keras_dp.distribute.batch_shards()
    return data.DPBatches(model, source, config, chunk_size(config, shards, model), 1).physical


def mlp_with_dropout():
    """Poisson sampling, per-example dropout, several steps."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(3),
        ]
    )
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 6)).astype("float32"), rng.integers(0, 3, 300)
    config = keras_dp.DPConfig(
        target_epsilon=4.0, batch_size=30, steps=15, l2_clip_norm=1.0, seed=11
    )
    model = keras_dp.make_private(model, config)
    # Accuracy is updated chunk by chunk on each device, the per-device counts summed.
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS, metrics=["accuracy"])
    history = model.fit(x, y, verbose=0)
    results["mlp_accuracy"] = np.asarray(history.history["accuracy"])
    results["mlp_weights"] = flat(model)
    results["mlp_epsilon"] = model.privacy_spent().epsilon
    results["mlp_steps"] = model.dp_steps
    results["mlp_physical"] = physical_rows(model, x, y)
    # Without a seed in the config each process would draw its own secret one;
    # process 0's is shared, so every process samples the same global batch.
    model = keras_dp.make_private(
        keras.models.clone_model(model), dataclasses.replace(config, seed=None)
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS)
    model.fit(x, y, epochs=1, verbose=0)
    results["secret_seed"] = np.asarray([model._dp_seed >> 32, model._dp_seed & 0xFFFFFFFF])


def zero_loss_noise():
    """One update of a Dense(4000) on a zero loss: the update is the noise alone."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4000, use_bias=False)])
    config = keras_dp.DPConfig(
        target_epsilon=float("inf"),
        noise_multiplier=2.0,
        batch_size=8,
        steps=1,
        l2_clip_norm=3.0,
        sampling="fixed",
        accountant="rdp",
        seed=5,
    )
    model = keras_dp.make_private(model, config)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=lambda t, p: 0.0 * keras.ops.mean(p))
    before = flat(model)
    x = np.ones((40, 2), "float32")
    model.fit(x, np.zeros((40, 4000), "float32"), verbose=0)
    results["noise_update"] = flat(model) - before


def uneven_fixed_batch():
    """A batch of 10 on 4 devices is padded to a multiple of 4, every row counted."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(10, 5)).astype("float32") * 3, rng.integers(0, 3, 10)
    config = keras_dp.DPConfig(
        target_epsilon=float("inf"),
        noise_multiplier=0.0,
        batch_size=10,
        steps=1,
        l2_clip_norm=0.5,
        sampling="fixed",
        accountant="rdp",
        microbatch_size=5,
        seed=2,
    )
    model = keras_dp.make_private(model, config)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=LOSS)
    history = model.fit(x, y, verbose=0)
    results["uneven_weights"] = flat(model)
    results["uneven_loss"] = history.history["loss"][-1]
    results["uneven_physical"] = physical_rows(model, x, y)


def gemma(lora: bool):
    """A tiny keras-hub Gemma3 under ModelParallel (its own layout map): with LoRA, or
    fully fine-tuned with ghost norms (its tied embedding's table sharded over "model")."""
    import keras_hub

    from keras_dp import offline

    keras.distribution.set_distribution(None)
    if jax.device_count() > 1:
        mesh = keras.distribution.DeviceMesh(
            (2, jax.device_count() // 2), ("batch", "model"), keras.distribution.list_devices()
        )
        # keras-hub 0.32 gives the Gemma family's layout map on GemmaBackbone only.
        backbone_class = keras_hub.models.Gemma3Backbone
        if not hasattr(backbone_class, "get_layout_map"):
            backbone_class = keras_hub.models.GemmaBackbone
        layout = backbone_class.get_layout_map(mesh)
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="batch")
        )
    keras.utils.set_random_seed(0)
    backbone = offline.gemma3_backbone(
        vocabulary_size=64,
        num_layers=1,
        hidden_dim=16,
        sequence_length=16,
        num_query_heads=2,
        num_key_value_heads=2,
    )
    lm = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    if lora:
        lm.backbone.enable_lora(rank=2)
    rng = np.random.default_rng(0)
    n, length = 64, 8
    x = {
        "token_ids": rng.integers(1, 64, (n, length)).astype("int32"),
        "padding_mask": np.ones((n, length), bool),
    }
    y = rng.integers(1, 64, (n, length)).astype("int32")
    if lora:
        config = keras_dp.DPConfig(target_epsilon=8.0, batch_size=8, steps=6, seed=3)
    else:  # C small enough that every example is clipped
        config = keras_dp.DPConfig(
            target_epsilon=8.0, batch_size=8, steps=4, seed=3, clipping="ghost", l2_clip_norm=0.05
        )
    lm = keras_dp.make_private(lm, config)
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), loss=LOSS)
    lm.fit(x, y, verbose=0)
    name = "gemma" if lora else "gemma_full"
    results[f"{name}_weights"] = flat(lm)
    results[f"{name}_sharded_on_model"] = sum(
        "model" in str(getattr(v.value.sharding, "spec", ""))
        for v in lm.weights
        if hasattr(v.value, "sharding")
    )
    results[f"{name}_epsilon"] = lm.privacy_spent().epsilon


data_parallel()
mlp_with_dropout()
zero_loss_noise()
uneven_fixed_batch()
if len(sys.argv) == 3:
    gemma(lora=True)
    gemma(lora=False)
results["devices"] = jax.device_count()
np.savez(out.replace(".npz", f".{jax.process_index()}.npz"), **results)
