"""The small interface the trainer uses for every execution backend (single, DDP, DeepSpeed).

A stage declares roles (generator, critic, ...; helios_train/runtime/roles.py). The backend `prepare`s each
trainable role — wrapping the module (DDP / DeepSpeed engine) as the role's `Calls` allow, and owning how its
gradients are reduced, clipped and applied — so the training loop is the same under every backend. What
distribution means for a stage's algorithm it offers as `lockstep`, `shards_parameters` and
`zero_untouched_gradients` (helios_train/stages/stage.py); no stage asks which backend it runs on.

Clipping stays here rather than in a callback: DeepSpeed clips inside its engine step (`gradient_clipping`), so
only the backend can apply the role's `max_grad_norm` the same way everywhere.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch

from helios_train.backends.sequence_groups import SequenceGroups, check_world
from helios_train.runtime import checkpoint as ckpt
from helios_train.runtime.roles import Calls, FrozenRole, PreparedRole, zero_missing_gradients


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


class Backend:
    """Single-process backend; DDP and DeepSpeed override the distributed parts."""

    name = "single"
    lockstep = None  # ranks need not run the same forwards (helios_train/backends/lockstep.py)
    shards_parameters = False  # every rank holds whole bases

    def __init__(self, launcher_cfg, trainer_cfg):
        self.launcher_cfg = launcher_cfg
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if self.world_size != 1 and self.name == "single":
            raise RuntimeError(
                f"launcher=single but WORLD_SIZE={self.world_size}: use launcher=ddp (or deepspeed) under torchrun"
            )
        self.device = resolve_device(trainer_cfg.device, self.local_rank)
        check_world(launcher_cfg, self.world_size, self.device.type)
        # No sequence parallelism until a distributed backend has its process group (then `SequenceGroups.build`).
        self.sequence = SequenceGroups(rank=self.rank, world_size=self.world_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """The data-parallel slot this rank trains: its reader, seed and random draws (= rank without
        sequence parallelism; the ranks of one sequence group share it)."""
        return self.sequence.data_rank

    @property
    def data_world(self) -> int:
        """Data-parallel slots: samples per step are data_world × accumulation × batch size."""
        return self.sequence.data_world

    def split_sequence(self, module: torch.nn.Module) -> None:
        """Split the transformer's token sequence over this rank's sequence group (a no-op at degree 1)."""
        if self.sequence.degree > 1:
            from helios_train.model.sequence_parallel import enable_sequence_parallel

            enable_sequence_parallel(module, self.sequence.mesh, self.device, self.launcher_cfg.sequence_plan)

    # -- roles -------------------------------------------------------------------------------
    def prepare(self, name, module, optimizer, scheduler, max_grad_norm, calls: Calls = Calls.ONCE) -> PreparedRole:
        self.split_sequence(module)
        params = [p for p in module.parameters() if p.requires_grad]
        return PreparedRole(name, module, module, optimizer, scheduler, max_grad_norm, params)

    def prepare_frozen(self, name, module, adapters: bool = True, shared: bool = False) -> FrozenRole:
        """A frozen role; its module is split over the sequence group unless another role's preparation did."""
        if not shared:
            self.split_sequence(module)
        return FrozenRole(name, module, adapters)

    def zero_untouched_gradients(self, params) -> None:
        """Parameters the step's loss did not reach still step, on zero gradients (the stage asks; e.g. idle
        GAN heads, official). DeepSpeed's flat buffers hold zeros already."""
        zero_missing_gradients(params)

    def reduce_gradients(self, role: PreparedRole) -> None:
        """Average gradients over ranks for roles not wrapped by DDP (no-op in one process)."""

    def accumulation_context(self, role: PreparedRole, is_last_micro: bool):
        return contextlib.nullcontext()

    def backward(self, role: PreparedRole, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm_and_step(self, role: PreparedRole) -> tuple[float, bool]:
        """Clip, then step unless the gradient is non-finite. Returns (pre-clip norm, stepped)."""
        if role.manual_reduce:
            self.reduce_gradients(role)
        norm = torch.nn.utils.clip_grad_norm_(role.params, role.max_grad_norm or float("inf"))
        norm = float(self.all_max(norm.detach()))
        stepped = math.isfinite(norm)
        if stepped:
            role.optimizer.step()
            role.scheduler.step()
        role.optimizer.zero_grad(set_to_none=True)
        return norm, stepped

    def current_lr(self, role: PreparedRole) -> float:
        return role.optimizer.param_groups[0]["lr"]

    # -- collectives -------------------------------------------------------------------------
    def barrier(self) -> None:
        pass

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def all_max(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def all_sum_int(self, value: int) -> int:
        return value

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a list of numbers in ONE collective (float64: counts stay exact).
        The per-step metrics use it instead of one blocking collective per number."""
        if self.world_size == 1:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    # -- checkpoints -------------------------------------------------------------------------
    def save_role(self, role: PreparedRole, directory: Path) -> None:
        if self.is_main:
            ckpt.save_trainables(role.module, directory / f"{role.name}.trainable.safetensors")
            ckpt.save_torch(role.optimizer.state_dict(), directory / f"{role.name}.optimizer.pt")
            ckpt.save_torch(role.scheduler.state_dict(), directory / f"{role.name}.scheduler.pt")

    def load_role(self, role: PreparedRole, directory: Path) -> None:
        ckpt.load_trainables(role.module, directory / f"{role.name}.trainable.safetensors")
        optimizer_state = ckpt.load_torch(directory / f"{role.name}.optimizer.pt")
        ckpt.check_finite(optimizer_state, directory / f"{role.name}.optimizer.pt")
        role.optimizer.load_state_dict(optimizer_state)
        role.scheduler.load_state_dict(ckpt.load_torch(directory / f"{role.name}.scheduler.pt"))

    def shutdown(self) -> None:
        pass
