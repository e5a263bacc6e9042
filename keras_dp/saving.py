"""What a saved DP model carries: its plan and its ledger, never its noise key.

(Correlated noise is the exception that the statement names: a BandMF checkpoint holds
the last b − 1 noise vectors and the partition's seed until the plan completes; see
:mod:`keras_dp.noise_state`.)

A ``.keras`` file of a DP model holds, next to the base model's own config, a
``dp_state`` entry: the calibrated :class:`DPConfig` (without ``seed``: a known
seed would make the noise predictable) and the number of accounted updates taken.
Loading restores both, so a model loaded to continue training continues its
ledger; a model loaded for inference needs nothing else. ``make_private`` classes
are saved under one registered name (``keras_dp>PrivateModel``) plus a reference
to the base class, so they load in a fresh process after ``import keras_dp``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import keras

from keras_dp.config import DPConfig

REGISTERED_NAME = "PrivateModel"
_SAFE_PACKAGES = {"keras", "keras_hub", "keras_cv", "keras_nlp"}


def config_to_dict(config: DPConfig | None) -> dict | None:
    """The plan as JSON-ready values; ``seed`` is dropped (it would reveal the noise)."""
    if config is None:
        return None
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    values["seed"] = None
    return values


def config_from_dict(values: dict | None) -> DPConfig | None:
    if values is None:
        return None
    values = dict(values)
    if values.get("_calibrated_for") is not None:  # JSON turned tuples into lists
        values["_calibrated_for"] = _as_tuple(values["_calibrated_for"])
    return DPConfig(**values)


def same_plan(a: DPConfig, b: DPConfig) -> bool:
    """True when two calibrated plans spend privacy identically (seed and chunking aside)."""
    ignore = {"seed", "microbatch_size", "clipping", "_derived_steps", "_calibrated_for"}
    return all(
        getattr(a, f.name) == getattr(b, f.name)
        for f in dataclasses.fields(DPConfig)
        if f.name not in ignore
    )


def plans_agree(a: DPConfig, b: DPConfig) -> bool:
    """True when two plans, calibrated for the same data, spend privacy identically.

    A plan without ``dataset_size`` is calibrated for the other's; a plan that cannot
    be calibrated (a user-given σ that overspends) agrees with none.
    """
    try:
        if a.dataset_size is None and b.dataset_size is not None:
            a = a.calibrate(b.dataset_size)
        if b.dataset_size is None and a.dataset_size is not None:
            b = b.calibrate(a.dataset_size)
        if a.dataset_size is None:  # neither knows N: compare what is promised
            return same_plan(a, b)
        return same_plan(a.calibrate(), b.calibrate())
    except ValueError:
        return False


def base_reference(cls: type) -> dict:
    return {
        "module": cls.__module__,
        "class_name": cls.__name__,
        "registered_name": keras.saving.get_registered_name(cls),
    }


def resolve_base(reference: dict, custom_objects=None) -> type:
    """The base model class a ``make_private`` model was made from."""
    found = keras.saving.get_registered_object(
        reference["registered_name"], custom_objects=custom_objects
    )
    if found is not None:
        return found
    module = reference["module"]
    if module.split(".", 1)[0] in _SAFE_PACKAGES:
        found = vars(importlib.import_module(module)).get(reference["class_name"])
        if isinstance(found, type) and issubclass(found, keras.Model):
            return found
    raise TypeError(
        f"Cannot find the model class {module}.{reference['class_name']} of this DP model. "
        "Import the module that defines it and decorate the class with "
        "@keras.saving.register_keras_serializable(), or pass it in custom_objects."
    )


def base_from_config(base: type, config: dict, custom_objects=None):
    if "custom_objects" in inspect.signature(base.from_config).parameters:
        return base.from_config(config, custom_objects=custom_objects)
    return base.from_config(config)


def save_lora_weights(model, filepath: str) -> str:
    """Saves a keras-hub model's LoRA adapters alone, with its privacy statement beside them.

    Writes ``filepath`` (keras-hub's ``backbone.save_lora_weights``; the name must end
    in ``.lora.h5``) and ``<filepath>.privacy.txt``, the statement of what the
    adapters' training spent. Returns the statement's path.
    """
    from keras_dp.statement import privacy_statement

    model.backbone.save_lora_weights(filepath)
    statement_path = f"{filepath}.privacy.txt"
    with open(statement_path, "w") as f:
        f.write(privacy_statement(model) + "\n")
    return statement_path


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value
