"""How the ranks of a run split into data-parallel slots and sequence-parallel groups
(`launcher.ulysses_degree` × `launcher.ring_degree`, README "Sequence parallelism").

With a sequence degree N the world's W ranks form a (dp, ring, ulysses) device mesh of shape
(W / N, ring, ulysses): ranks N·d … N·d + N − 1 are one sequence group, which trains data-parallel
slot d — the same samples and the same random draws on each of its ranks (the trainer keys its reader,
its seed and `micro_generator` by `data_rank`), while the transformer splits each sample's tokens over
them (helios_train/model/sequence_parallel.py, `launcher.sequence_plan`). Contiguous groups keep a group on
one node, where its all-to-alls are cheapest.

Gradients need no group of their own: with the exact gather every rank back-propagates the same loss
through an exact distributed graph, so the mean over all W ranks — what DDP and ZeRO already compute on
the world group — is the data-parallel mean of the one-process gradient (measured in
tests/test_sequence_parallel.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from helios_train.config.errors import UserError


class SequenceConfigError(UserError, ValueError):
    pass


def degrees(launcher_cfg) -> tuple[int, int]:
    """(ring, ulysses) from the launcher config, checked to be whole numbers >= 1."""
    out = []
    for key in ("ring_degree", "ulysses_degree"):
        value = getattr(launcher_cfg, key, 1)
        if not isinstance(value, int) or value < 1:
            raise SequenceConfigError(f"launcher.{key}={value!r}: must be a whole number >= 1 (1 = off)")
        out.append(value)
    return out[0], out[1]


def sequence_degree(launcher_cfg) -> int:
    ring, ulysses = degrees(launcher_cfg)
    return ring * ulysses


def check_world(launcher_cfg, world_size: int, device_type: str) -> None:
    """The rules that need only the launcher and the world size (run before the model is read)."""
    ring, ulysses = degrees(launcher_cfg)
    n = ring * ulysses
    if n == 1:
        return
    if launcher_cfg.name == "single":
        raise SequenceConfigError(
            f"launcher.ulysses_degree={ulysses} launcher.ring_degree={ring}: sequence parallelism splits a sample "
            f"over {n} processes; launch under torchrun with launcher=ddp or launcher=deepspeed_zero2/3")
    if world_size % n:
        raise SequenceConfigError(
            f"{world_size} rank(s) cannot form sequence groups of {n} (launcher.ulysses_degree={ulysses} x "
            f"launcher.ring_degree={ring}): the world size must be a multiple of the sequence degree")


@dataclass
class SequenceGroups:
    """This rank's place in the (dp, ring, ulysses) mesh; `mesh` is None without sequence parallelism."""

    ring: int = 1
    ulysses: int = 1
    rank: int = 0
    world_size: int = 1
    mesh: Optional[Any] = None

    @property
    def degree(self) -> int:
        return self.ring * self.ulysses

    @property
    def data_rank(self) -> int:
        """The data-parallel slot this rank trains (its sequence group's index)."""
        return self.rank // self.degree

    @property
    def data_world(self) -> int:
        return self.world_size // self.degree

    @property
    def sequence_rank(self) -> int:
        """The rank's place inside its sequence group; 0 counts the group's samples and writes its data position."""
        return self.rank % self.degree

    @classmethod
    def build(cls, launcher_cfg, rank: int, world_size: int, device_type: str) -> "SequenceGroups":
        """The groups of an initialised process group (collective when the degree is above 1: every rank calls it)."""
        check_world(launcher_cfg, world_size, device_type)
        ring, ulysses = degrees(launcher_cfg)
        groups = cls(ring, ulysses, rank, world_size)
        if groups.degree > 1:
            groups.mesh = sequence_mesh(device_type, world_size // groups.degree, ring, ulysses)
        return groups


def sequence_mesh(device_type: str, data_parallel: int, ring: int, ulysses: int):
    """The (dp, ring, ulysses) device mesh over the whole world; diffusers' context-parallel config takes its
    ("ring", "ulysses") dimensions."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (data_parallel, ring, ulysses), mesh_dim_names=("dp", "ring", "ulysses"))


class SimulatedSequenceGroup:
    """One rank of a sequence group whose peers are simulated: torch's fake process group answers every
    collective with a buffer of the right shape and sends nothing. The dry run measures a rank's memory with
    it (helios_train/planning/dry_run.py); only Ulysses, whose CPU kernels run on fake tensors."""

    def __init__(self, launcher_cfg):
        self.ring, self.ulysses = degrees(launcher_cfg)
        self.mesh = None

    def __enter__(self):
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore

        if self.ring > 1:
            raise SequenceConfigError(f"launcher.ring_degree={self.ring}: the dry run measures Ulysses only (a ring "
                                      "step's kernels differ from the GPU's); measure launcher.ulysses_degree instead")
        if self.ulysses > 1:
            if dist.is_initialized():
                raise RuntimeError("a sequence-parallel dry run needs a process without a process group")
            dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=self.ulysses)
            self.mesh = sequence_mesh("cpu", 1, 1, self.ulysses)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        if self.mesh is not None:
            dist.destroy_process_group()
        return False
