"""What a stage is: its roles (as data), the phases of a step, the loss of one micro-batch for a role, and the
callbacks it adds. `helios_train/training/trainer.py` runs every stage the same way and knows nothing more of it.

A stage never asks which backend runs it. What distribution means for its algorithm comes through the object
it is built with (the backend, seen through this narrow protocol; `OneProcess` when built on its own):
- `lockstep`: agreeing on forward counts across ranks where parameters are sharded (ZeRO-3; a no-op
  otherwise, helios_train/backends/lockstep.py);
- `zero_untouched_gradients(params)`: parameters the loss did not reach still step, on zero gradients
  (DeepSpeed's flat buffers already hold zeros; DDP and one process need them filled);
- `shards_parameters`: True when every rank holds 1/N of each base (nothing to offload, EMA per partition).
"""
from __future__ import annotations

from typing import Protocol

import torch

from helios_train.runtime.roles import RoleSpec, zero_missing_gradients


class Distribution(Protocol):
    lockstep: object  # None, or agree(counts) / pad(count, forward, target) (helios_train/backends/lockstep.py)
    shards_parameters: bool

    def zero_untouched_gradients(self, params) -> None: ...


class OneProcess:
    """The distribution of a stage built outside a trainer (tests, notebooks): one process, nothing sharded."""

    lockstep = None
    shards_parameters = False

    def zero_untouched_gradients(self, params) -> None:
        zero_missing_gradients(params)


class Stage:
    """Interface (and shared helpers) of a stage. Subclasses fill the methods below."""

    name = "abstract"
    output_role = "generator"  # the role whose weights the stage produces: validated, EMA'd, exported

    def __init__(self, cfg, device: torch.device, distribution: Distribution | None = None):
        self.cfg = cfg
        self.device = device
        self.distribution = distribution or OneProcess()
        self.roles: dict = {}  # name → PreparedRole / FrozenRole, set by `bind`

    def role_specs(self) -> dict[str, RoleSpec]:
        """Every role, trainable or frozen (helios_train/runtime/roles.py)."""
        raise NotImplementedError

    def bind(self, roles: dict) -> None:
        """The prepared roles (the trainer's handles of `role_specs`), before the first step."""
        self.roles = roles

    def callbacks(self) -> list:
        """Callbacks this stage adds to the run's (helios_train/runtime/callbacks.py), after `bind`."""
        return []

    def phases(self, step: int) -> list[str]:
        """Trainable role names updated at `step`, in order (one optimizer step each)."""
        return [name for name, role in self.roles.items() if role.trainable]

    def prepare_batch(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def loss(self, role: str, batch: dict, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def work_key(self, step: int) -> str:
        """Called once at the start of each step: what decides the step's FLOPs and is known before it runs
        (helios_train/training/callbacks/throughput.py counts each key once). One kind of step by default."""
        return ""

    def work_variant(self) -> str:
        """After the step: the data-dependent choices it made that change its FLOPs ("" = none)."""
        return ""

    def tokens_per_sample(self, batch: dict) -> dict[str, int]:
        """Token counts of one sample by kind ("noisy", "history"), for throughput metrics."""
        return {}

    def before_optimizer_step(self, role: str, step: int) -> None:
        """Called after a role's backward(s) of `step`, before the backend reduces, clips and steps."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
