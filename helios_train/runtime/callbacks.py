"""What runs around the training step without being the loop: EMA, validation, throughput, low-VRAM residency.

The trainer calls every registered callback at these points and knows nothing else of them; the standard
ones are built from the config (helios_train/training/callbacks/), a stage adds its own (`Stage.callbacks`).
A callback with a `name` keeps state in `trainer_state.json` under that name (`state_dict`), and may write
files of its own into the checkpoint folder (`save`/`load`, called on every rank: a sharded state gathers).
"""
from __future__ import annotations

import contextlib
from pathlib import Path


class Callback:
    name: str = ""  # non-empty: `state_dict()` is saved under this key of trainer_state.json

    def setup(self, trainer) -> None:
        """Once the roles are prepared (wrapped by the backend), before a checkpoint is loaded."""

    def on_train_start(self, trainer) -> None:
        """After a checkpoint (if any) is loaded, before the first step."""

    def step_context(self, trainer, step: int):
        """Entered around the phases of `step` (forwards, backwards and optimizer steps)."""
        return contextlib.nullcontext()

    def on_step_end(self, trainer, step: int, updated: list[str]) -> dict:
        """After the optimizer steps of `step` (roles in `updated`), before logging; returns values to log."""
        return {}

    def on_logged(self, trainer, step: int) -> None:
        """After `step` was counted and logged (`trainer.step` is the number of steps done)."""

    def metrics(self, trainer, step_time_s: float, batches: list[dict]) -> dict:
        """Per-step values to log that need the step's time or batches."""
        return {}

    def save(self, trainer, directory: Path, is_main: bool) -> None:
        """Files of this callback in a checkpoint being written (every rank calls it)."""

    def load(self, trainer, directory: Path) -> None:
        """Read back what `save` wrote."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
