"""keras_dp: differentially private (DP-SGD) training for Keras 3 on JAX."""

from keras_dp._backend import require_jax_backend

require_jax_backend()

from keras_dp import accounting, audit, callbacks  # noqa: E402
from keras_dp.config import DPConfig, default_delta  # noqa: E402
from keras_dp.model import DPModel, PrivacySpent, make_private  # noqa: E402
from keras_dp.planner import Plans, plan, plan_table  # noqa: E402
from keras_dp.saving import save_lora_weights  # noqa: E402
from keras_dp.statement import privacy_statement  # noqa: E402

__version__ = "0.1.0.dev0"


def __getattr__(name: str):
    """``keras_dp.offline`` (it imports keras-hub) is loaded on first use."""
    if name == "offline":
        import importlib

        return importlib.import_module("keras_dp.offline")
    raise AttributeError(f"module 'keras_dp' has no attribute {name!r}")


__all__ = [
    "DPConfig",
    "DPModel",
    "PrivacySpent",
    "Plans",
    "accounting",
    "audit",
    "callbacks",
    "make_private",
    "plan",
    "plan_table",
    "default_delta",
    "privacy_statement",
    "save_lora_weights",
]
