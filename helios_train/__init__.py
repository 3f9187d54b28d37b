"""helios-train: train Helios (Base, Mid, Distilled) — `python -m helios_train stage=...` or, from Python,
`helios_train.train(config)` and `helios_train.infer(checkpoint, prompts, ...)` (helios_train/api.py).
The names are loaded on first use: `import helios_train.config` stays free of torch."""
from __future__ import annotations

__all__ = ["train", "infer"]


def __getattr__(name: str):
    if name in __all__:
        from helios_train import api

        return getattr(api, name)
    raise AttributeError(f"module 'helios_train' has no attribute {name!r}")
