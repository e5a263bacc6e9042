"""Plan a DP training run: calibrate σ for a target ε and print the guarantee."""

import logging

import keras_dp

logging.basicConfig(level=logging.INFO)
config = keras_dp.DPConfig(target_epsilon=3.0, batch_size=256, epochs=3, l2_clip_norm=1.0)
config = config.calibrate(dataset_size=60_000)
print(f"σ = {config.noise_multiplier:.4f} over {config.steps} updates")
print(keras_dp.privacy_statement(config))
