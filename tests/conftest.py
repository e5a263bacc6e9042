import os

os.environ.setdefault("KERAS_BACKEND", "jax")
# Four simulated CPU devices, so the reference-step property tests can run plans on 1, 2
# and 4 devices in this process (set before JAX is imported; a model uses one device
# unless a keras.distribution says otherwise).
_DEVICES = "--xla_force_host_platform_device_count=4"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES}".strip()
