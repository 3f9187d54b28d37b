"""The one place that knows the transformer: a family adapter per `model.family` (helios_train/model/adapter.py
says what a family provides; helios.py is Helios), plus loading, trainables, forward inputs, GAN taps, the packed
Mid forward, sequence parallelism, low-VRAM residency and the VAE / text codecs.

Add a family: subclass `ModelAdapter` and `register_family("name", YourAdapter)` (tests/test_model_family.py does
it for a toy family), then `model.family=name`."""
from __future__ import annotations

import importlib

FAMILIES: dict[str, object] = {"helios": "helios_train.model.helios:HeliosAdapter"}


def register_family(name: str, adapter_class) -> None:
    FAMILIES[name] = adapter_class


def adapter_for(model_cfg):
    """The adapter of `model_cfg.family` (default helios)."""
    name = str(getattr(model_cfg, "family", None) or "helios")
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r}: no such model family; registered: {sorted(FAMILIES)} "
                         "(helios_train.model.register_family adds one)")
    entry = FAMILIES[name]
    if isinstance(entry, str):
        module_name, cls_name = entry.split(":")
        entry = getattr(importlib.import_module(module_name), cls_name)
    return entry()
