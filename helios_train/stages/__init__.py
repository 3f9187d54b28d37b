"""Stage algorithms. A stage supplies roles (models + optimizer settings), the phases of a step and
the loss of one micro-batch for a role; `helios_train/training/trainer.py` runs every stage the same way."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

STAGES = {
    "base": "helios_train.stages.base:BaseStage",
    "mid": "helios_train.stages.mid:MidStage",
    "distilled": "helios_train.stages.distilled:DistilledStage",
}
PLANNED = {
}


@dataclass
class RoleSpec:
    module: torch.nn.Module
    optim: Any  # OptimConfig
    # True when one loss calls the module several times with grad (the DMD generator's rollout):
    # DDP's per-parameter hooks cannot handle that, so the DDP backend averages its gradients itself.
    multi_forward: bool = False
    # One optimizer update per this many training steps (the DMD generator: stage.dmd.update_ratio). The
    # role's LR schedule (length and warm-up) is laid out over its own updates, so it ends where the run ends.
    update_every: int = 1


class Stage:
    """Interface (and shared helpers) of a stage. Subclasses fill the methods below."""

    name = "abstract"

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.roles: dict = {}  # name → PreparedRole, set by `bind`

    def role_specs(self) -> dict[str, RoleSpec]:
        raise NotImplementedError

    def bind(self, prepared: dict) -> None:
        self.roles = prepared

    def phases(self, step: int) -> list[str]:
        """Role names updated at `step`, in order (one optimizer step each)."""
        return list(self.roles)

    def prepare_batch(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def loss(self, role: str, batch: dict, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def work_key(self, step: int) -> str:
        """Called once at the start of each step: what decides the step's FLOPs and is known before it runs
        (helios_train/training/throughput.py counts each key once). One kind of step by default."""
        return ""

    def work_variant(self) -> str:
        """After the step: the data-dependent choices it made that change its FLOPs ("" = none)."""
        return ""

    def tokens_per_sample(self, batch: dict) -> dict[str, int]:
        """Token counts of one sample by kind ("noisy", "history"), for throughput metrics."""
        return {}

    def before_optimizer_step(self, role: str, step: int) -> None:
        """Called after a role's backward(s) of `step`, before the backend reduces, clips and steps."""

    def after_step(self, step: int, updated: list[str]) -> dict:
        """Called after the optimizer steps of `step` (roles in `updated`); returns values to log."""
        return {}

    def save_extra(self, directory, is_main: bool) -> None:
        """Tensors a stage keeps besides its roles (e.g. EMA), written into the checkpoint directory."""

    def load_extra(self, directory) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def check_stage_name(name: str) -> None:
    if name in PLANNED:
        raise NotImplementedError(f"stage={name}: {PLANNED[name]}")
    if name not in STAGES:
        raise ValueError(f"stage.name={name!r}: expected one of {sorted(STAGES) + sorted(PLANNED)}")


def build_stage(cfg, device: torch.device) -> Stage:
    check_stage_name(cfg.stage.name)
    module_name, cls_name = STAGES[cfg.stage.name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)(cfg, device)
