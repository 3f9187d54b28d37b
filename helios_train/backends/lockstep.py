"""Identical forward/backward sequences on every rank when DeepSpeed ZeRO-3 shards the parameters.

Under ZeRO-3 a forward gathers each module's weights with collectives, a backward pass through a
(checkpointed) forward gathers them again, and which gathers are needed depends on what the
previous forwards/backwards released. So every rank must run the same sequence of no-grad forwards,
grad forwards and backward passes, or the collectives pair up wrongly and the job hangs (measured on
the toy: a step where one rank draws a first chunk hangs in its backward).

The DMD rollout is data-dependent: a rank whose sample is a first chunk (no history) runs the
amplified sampler, twice the steps per level (official `is_amplify_first_chunk`), so the shared exit
steps land on different positions and the graph reaching the loss differs. Under ZeRO-3 the stage therefore

- takes, per level, the largest exit step over ranks and pads with discarded no-grad forwards
  (`pyramid_rollout(lockstep=...)`), so every rank runs "n no-grad forwards, then the exit forward";
- ties every level's exit output to the chunk with weight 0 and gives each exit forward an input that
  requires grad, so every rank backpropagates through the same forwards and modules;
- pads fully no-grad rollouts (the critic's) to the longest rank with discarded forwards.

Every count is exchanged before the forwards it governs: under ZeRO-3 the forwards gather parameters
with collectives of their own, so a count exchanged after a rollout pairs with a gather of a rank
still sampling and the job hangs (it did, with the helios_14b_shape model, whose parameters are above
ZeRO-3's persistence threshold; the toy model's are all below it, so nothing was gathered there).

Values and gradients are unchanged; only ranks with shorter rollouts pay extra compute. Under DDP
and ZeRO-1/2 nothing is padded: their backends give the stage no lockstep.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


def params_sharded(cfg) -> bool:
    """True when the launcher shards parameters across ranks (DeepSpeed ZeRO-3): config checks before any
    backend exists; a running backend says it as `shards_parameters`."""
    return cfg.launcher.name == "deepspeed" and int(cfg.launcher.zero_stage) == 3


class ForwardLockstep:
    """The `lockstep` of a backend whose ranks must run the same forwards (ZeRO-3); backends that need none
    give the stage `None`. Both methods are collectives or follow one: every rank calls them."""

    def __init__(self, device: torch.device):
        self.device = device

    def agree(self, counts: list[int]) -> list[int]:
        """Element-wise maximum of `counts` over ranks (collective)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return list(counts)
        t = torch.tensor(counts, dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    @staticmethod
    def pad(count: int, forward: Callable[[], object], target: int) -> int:
        """Run `forward()` without grad from `count` up to `target` forwards (the busiest rank's count, agreed
        with `agree` before the forwards began). Returns the number of padding forwards."""
        extra = target - count
        with torch.no_grad():
            for _ in range(extra):
                forward()
        return extra
