"""EMA of the output role's trainables as a callback (official `use_ema`, `ema_start_step`; the maths:
helios_train/algorithms/ema.py, where each rank's share lives: helios_train/backends/ema_shards.py).

Official rule: the EMA steps on every step up to its start, then only on steps that updated the role. The
whole EMA is written into each checkpoint as `<role>.ema.safetensors` (gathered when sharded: every rank calls
`save`), which `python -m helios_train export --ema` reads; validation may render with it (`weights`)."""
from __future__ import annotations

import contextlib
from pathlib import Path

from helios_train.algorithms.ema import EMA
from helios_train.backends.ema_shards import layout_for
from helios_train.runtime.callbacks import Callback


class EMACallback(Callback):
    def __init__(self, cfg, role: str):
        self.cfg = cfg
        self.role = role
        self.ema: EMA | None = None

    def file(self, directory: Path) -> Path:
        return Path(directory) / f"{self.role}.ema.safetensors"

    def setup(self, trainer) -> None:
        # Built once the backend has wrapped (ZeRO-3: partitioned) the role's module.
        module = trainer.roles[self.role].module
        self.ema = EMA(module, self.cfg, layout_for(self.cfg, trainer.backend.shards_parameters))

    def on_step_end(self, trainer, step: int, updated: list[str]) -> dict:
        if self.role in updated or step <= self.cfg.update_after_step:
            return {"ema_decay": self.ema.update(trainer.roles[self.role].module, step + 1)}
        return {}

    def save(self, trainer, directory: Path, is_main: bool) -> None:
        state = self.ema.state_dict()  # collective when the EMA is sharded: every rank calls it
        if is_main:
            from safetensors.torch import save_file

            save_file(state, str(self.file(directory)))

    def load(self, trainer, directory: Path) -> None:
        from safetensors.torch import load_file

        self.ema.load_state_dict(load_file(str(self.file(directory))))

    def weights(self, trainer, renders: bool):
        """The EMA weights in the role's module inside the block (every rank enters: a sharded EMA gathers)."""
        if self.ema is None:
            return contextlib.nullcontext()
        return self.ema.swap_into(trainer.roles[self.role].module, renders=renders)
