"""Execution backends selected by `launcher.name`."""
from __future__ import annotations

from helios_train.backends.base import Backend
from helios_train.runtime.roles import PreparedRole


def build_backend(launcher_cfg, trainer_cfg, data_cfg=None) -> Backend:
    name = launcher_cfg.name
    if name == "single":
        return Backend(launcher_cfg, trainer_cfg)
    if name == "ddp":
        from helios_train.backends.ddp import DDPBackend

        return DDPBackend(launcher_cfg, trainer_cfg)
    if name == "deepspeed":
        from helios_train.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(launcher_cfg, trainer_cfg, data_cfg)
    raise ValueError(f"launcher.name={name!r}: expected single | ddp | deepspeed")


__all__ = ["Backend", "PreparedRole", "build_backend"]
