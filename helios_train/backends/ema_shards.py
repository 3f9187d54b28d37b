"""Where each rank's share of the EMA lives, and how the whole EMA is put back together (helios_train/algorithms/ema.py).

Three layouts, one interface (`assign`, `owns`, `local`, `gather`, `for_rendering`, `local_from_whole`):
- `WholeOnEveryRank`: every rank averages every trainable tensor (one process, or `stage.ema.sharded=false`);
- `OwnerSharded` (DDP / ZeRO-2 with `sharded=true`): whole tensors are assigned to ranks, largest first to
  the least-loaded rank, so each rank averages ~1/N of the bytes against its own (replicated) live copy;
- `Zero3Partitioned` (ZeRO-3): each rank averages the partition of every trainable parameter it holds
  (`param.ds_tensor`, the slice [rank·P, (rank+1)·P) of the flattened tensor, zero-padded at the end) —
  no extra communication per step, as the official EMA in its own ZeRO-3 engine.
`gather` (checkpoints) and `for_rendering` (validation with `validation.use_ema`) are collectives under
the sharded layouts: every rank calls them.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from helios_train.algorithms.ema import Layout, WholeOnEveryRank


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_to_main(flat: torch.Tensor, world: int) -> list[torch.Tensor] | None:
    """Every rank's equally long 1-D `flat`, on the main rank (None elsewhere)."""
    if world == 1:
        return [flat]
    rank = dist.get_rank()
    out = [torch.empty_like(flat) for _ in range(world)] if rank == 0 else None
    dist.gather(flat, out, dst=0)
    return out


class OwnerSharded(Layout):
    def __init__(self):
        self.rank, self.world = _rank_world()

    def assign(self, params):
        super().assign(params)
        load = [0] * self.world
        self.owner: dict[str, int] = {}
        for n in sorted(params, key=lambda k: (-params[k].numel(), k)):  # the same order on every rank
            r = min(range(self.world), key=lambda i: (load[i], i))
            self.owner[n] = r
            load[r] += params[n].numel()
        self.order = list(params)  # named_parameters order, identical on every rank

    def owns(self, name):
        return self.owner[name] == self.rank

    def _own_flat(self, shadow: dict, length: int, device) -> torch.Tensor:
        """This rank's shadows, concatenated in parameter order, zero-padded to `length`."""
        flat = torch.zeros(length, dtype=torch.float32, device=device)
        offset = 0
        for n in self.order:
            if self.owner[n] == self.rank:
                k = shadow[n].numel()
                flat[offset:offset + k] = shadow[n].reshape(-1)
                offset += k
        return flat

    def _whole(self, shadow: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sizes = [0] * self.world
        for n in self.order:
            sizes[self.owner[n]] += math.prod(self.shapes[n])
        like = next(iter(shadow.values())) if shadow else torch.zeros(0)
        if self.world > 1 and dist.get_backend() == "nccl":
            like = like if like.is_cuda else torch.zeros(0, device="cuda")
        pieces = _gather_to_main(self._own_flat(shadow, max(sizes), like.device), self.world)
        if pieces is None:
            return {}
        out, offsets = {}, [0] * self.world
        for n in self.order:
            r, k = self.owner[n], math.prod(self.shapes[n])
            out[n] = pieces[r][offsets[r]:offsets[r] + k].view(self.shapes[n]).cpu().clone()
            offsets[r] += k
        return out

    def gather(self, shadow):
        return self._whole(shadow)

    def for_rendering(self, shadow, renders):
        whole = self._whole(shadow)  # collective: every rank takes part, the main rank receives
        return whole if renders else {}


class Zero3Partitioned(Layout):
    def __init__(self):
        self.rank, self.world = _rank_world()

    def assign(self, params):
        # DeepSpeed ZeRO-3: `ds_shape` is the whole shape, `ds_tensor` this rank's partition (equal sizes)
        self.shapes = {n: tuple(p.ds_shape) for n, p in params.items()}
        self.partition = {n: p.ds_tensor.numel() for n, p in params.items()}
        self.order = list(params)

    def local(self, param):
        return param.ds_tensor

    def gather(self, shadow):
        flat = torch.cat([shadow[n].reshape(-1) for n in self.order])
        pieces = _gather_to_main(flat, self.world)
        if pieces is None:
            return {}
        out, offset = {}, 0
        for n in self.order:
            k = self.partition[n]
            whole = torch.cat([p[offset:offset + k] for p in pieces])[:math.prod(self.shapes[n])]
            out[n] = whole.view(self.shapes[n]).cpu().clone()
            offset += k
        return out

    def for_rendering(self, shadow, renders):
        return shadow  # every rank renders under ZeRO-3 (lockstep) and writes its own partition

    def local_from_whole(self, name, whole):
        super().local_from_whole(name, whole)
        k = self.partition[name]
        piece = whole.reshape(-1)[self.rank * k:(self.rank + 1) * k]
        return torch.cat([piece, piece.new_zeros(k - piece.numel())]) if piece.numel() < k else piece


def layout_for(ema_cfg, zero3: bool) -> Layout:
    """The layout of the run: ZeRO-3 → partitions; `stage.ema.sharded` on several ranks → owners; else whole."""
    if zero3:
        return Zero3Partitioned()
    return OwnerSharded() if ema_cfg.sharded and _rank_world()[1] > 1 else WholeOnEveryRank()
