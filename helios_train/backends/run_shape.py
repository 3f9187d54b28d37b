"""The cluster shape a checkpoint was written on, and which changes of it a resume honours.

Allowed (README "Runs, checkpoints, resume"): another world size, accumulation count, worker count,
or backend (single / DDP / ZeRO-2 / ZeRO-3), as long as the global batch (world × accumulation ×
`data.batch_size`) stays — the data readers then continue or are re-split (helios_train/data/readers.py),
and the whole-tensor trainables and optimizer state load on any backend. Refused before any work:
a different global batch without `trainer.allow_batch_change=true` (the learning-rate schedule and
the samples per step would silently change), and a new shape for a ZeRO checkpoint written with
`trainer.portable_checkpoints=false` (its optimizer state exists only as shards of the old shape).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from helios_train.backends.sequence_groups import sequence_degree
from helios_train.config.errors import UserError


class ShapeError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class RunShape:
    world_size: int
    grad_accum_steps: int
    batch_size: int
    launcher: str
    zero_stage: Optional[int]  # DeepSpeed only
    sequence_degree: int = 1  # ranks per sequence group (launcher.ulysses_degree x ring_degree)

    @property
    def data_world(self) -> int:
        """Data-parallel slots: the ranks of a sequence group train one sample together."""
        return self.world_size // self.sequence_degree

    @property
    def global_batch(self) -> int:
        return self.data_world * self.grad_accum_steps * self.batch_size

    def same_partitions(self, other: "RunShape") -> bool:
        """Whether ZeRO shards written on one shape load natively on the other (same launcher, ranks, stage)."""
        return (self.launcher, self.world_size, self.zero_stage) == (other.launcher, other.world_size, other.zero_stage)

    def describe(self) -> str:
        backend = f"deepspeed zero{self.zero_stage}" if self.launcher == "deepspeed" else self.launcher
        ranks = f"{self.world_size} rank(s)" if self.sequence_degree == 1 else \
            f"{self.data_world} sequence group(s) of {self.sequence_degree} rank(s)"
        return f"{ranks} x {self.grad_accum_steps} micro-batch(es) of {self.batch_size} ({backend})"

    def state_dict(self) -> dict:
        return asdict(self)


def current_shape(cfg, world_size: int) -> RunShape:
    launcher = cfg.launcher.name
    return RunShape(world_size, int(cfg.trainer.grad_accum_steps), int(cfg.data.batch_size), launcher,
                    int(cfg.launcher.zero_stage) if launcher == "deepspeed" else None, sequence_degree(cfg.launcher))


def saved_shape(state: dict, now: RunShape) -> RunShape:
    """The shape in a checkpoint's trainer_state.json; checkpoints from before shape records had only the
    world size (resume then required every other part to be unchanged)."""
    if "shape" in state:
        return RunShape(**state["shape"])
    return RunShape(state["world_size"], now.grad_accum_steps, now.batch_size, now.launcher, now.zero_stage)


def check_resume_shape(checkpoint, saved: RunShape, now: RunShape, allow_batch_change: bool,
                       portable: bool) -> Optional[str]:
    """None when nothing changed, else the one-line `old -> new` description; raises what cannot be honoured."""
    if saved == now:
        return None
    if saved.global_batch != now.global_batch and not allow_batch_change:
        raise ShapeError(
            f"{checkpoint} was written with a global batch of {saved.global_batch} ({saved.describe()}), this run "
            f"has {now.global_batch} ({now.describe()}). Keep world x trainer.grad_accum_steps x data.batch_size "
            f"at {saved.global_batch} (e.g. trainer.grad_accum_steps="
            f"{max(1, saved.global_batch // (now.data_world * now.batch_size))}), or set "
            "trainer.allow_batch_change=true to continue with the new batch (the LR schedule is not rescaled).")
    sharded_only = saved.launcher == "deepspeed" and not portable
    if sharded_only and not saved.same_partitions(now):
        raise ShapeError(
            f"{checkpoint} holds its optimizer state only as DeepSpeed ZeRO-{saved.zero_stage} shards of "
            f"{saved.world_size} rank(s) (written with trainer.portable_checkpoints=false); resume it with "
            f"{saved.world_size} rank(s) and launcher=deepspeed zero_stage={saved.zero_stage}.")
    return f"{saved.describe()} -> {now.describe()}"
