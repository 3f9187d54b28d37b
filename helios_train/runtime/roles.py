"""Roles: what a stage declares about each model it uses, and the handles the trainer gives back.

A stage declares its roles as data (`Stage.role_specs`): a trainable role has an optimizer config, a frozen one
none; a role may share another role's module (the DMD teacher is the critic's base with its LoRA adapters off).
The stage also says how its loss calls the model (`Calls`); the backend decides what that needs (DDP can wrap
a module called once per backward, and reduces the gradients of the others itself; DeepSpeed's hooks work for
all three). The trainer turns trainable roles into `PreparedRole`s (backend-wrapped, with optimizer) and frozen
ones into `FrozenRole`s; stages, backends and the trainer share this vocabulary and nothing else of each other.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

import torch


class Calls(Enum):
    """How one loss of a role calls its model before the backward."""

    ONCE = "once"  # one forward through the (wrapped) model
    SEVERAL = "several"  # several forwards with grad (the DMD generator's rollout, the critic with the GAN)
    SUBMODULES = "submodules"  # drives the module's submodules itself, not its forward (the packed Mid pass)


@dataclass
class RoleSpec:
    module: torch.nn.Module
    optim: Any = None  # OptimConfig of a trainable role; None = frozen (no optimizer, never a phase)
    calls: Calls = Calls.ONCE
    # One optimizer update per this many training steps (the DMD generator: stage.dmd.update_ratio). The
    # role's LR schedule (length and warm-up) is laid out over its own updates, so it ends where the run ends.
    update_every: int = 1
    shares: Optional[str] = None  # the role whose module this frozen role runs (prepared there, not again)
    adapters: bool = True  # False: the module runs with its LoRA adapters disabled (the teacher)

    @property
    def trainable(self) -> bool:
        return self.optim is not None


@dataclass
class PreparedRole:
    """A trainable role after the backend: what the stage calls and what the trainer steps."""

    name: str
    module: torch.nn.Module  # the unwrapped model (for saving / adapter toggling)
    model: torch.nn.Module  # what the stage calls forward on (DDP / engine wrapper or the module)
    optimizer: Optional[torch.optim.Optimizer]
    scheduler: Any
    max_grad_norm: float
    params: list = field(default_factory=list)
    manual_reduce: bool = False  # gradients averaged by the backend, not by a DDP wrapper
    trainable = True


@dataclass
class FrozenRole:
    """A frozen role: its module, called without a wrapper, in the view its spec asks for."""

    name: str
    module: torch.nn.Module
    adapters: bool = True
    trainable = False

    @property
    def model(self) -> torch.nn.Module:
        return self.module

    @contextlib.contextmanager
    def active(self):
        """The module as this role sees it inside the block (adapters disabled for the teacher, restored after)."""
        if self.adapters:
            yield self.module
            return
        self.module.disable_adapters()
        try:
            yield self.module
        finally:
            self.module.enable_adapters()


def zero_missing_gradients(params) -> None:
    """Give every parameter without a gradient a zero one, so the optimizer steps it (weight decay, moments)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
