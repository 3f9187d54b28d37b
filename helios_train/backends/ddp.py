"""torch DistributedDataParallel under torchrun: nccl on CUDA, gloo on CPU.

Only trainable parameters are reduced (DDP skips frozen ones), so a LoRA run moves ~1 GB of
gradients per step for the 14B model, not 56 GB. Gradient accumulation uses `no_sync` on all but
the last micro-batch.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from helios_train.backends.base import Backend
from helios_train.backends.sequence_groups import SequenceGroups
from helios_train.runtime.process_guard import teardown_by_exit
from helios_train.runtime.roles import Calls, PreparedRole


def gradient_buckets(grads: list[torch.Tensor], cap_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive gradients grouped by (dtype, device) into buckets of at most `cap_bytes` (a larger
    tensor gets a bucket of its own)."""
    buckets, current = [], {}  # (dtype, device) → (the open bucket, its bytes)
    for g in grads:
        key, nbytes = (g.dtype, g.device), g.numel() * g.element_size()
        items, size = current.get(key, ([], 0))
        if items and size + nbytes > cap_bytes:
            buckets.append(items)
            items, size = [], 0
        items.append(g)
        current[key] = (items, size + nbytes)
    return buckets + [items for items, _ in current.values()]


class DDPBackend(Backend):
    name = "ddp"

    def __init__(self, launcher_cfg, trainer_cfg):
        super().__init__(launcher_cfg, trainer_cfg)
        backend = launcher_cfg.backend
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        # A process group that already exists (a caller running several trainings in one process) is
        # reused and left alive at shutdown: whoever creates it destroys it.
        self.owns_process_group = not dist.is_initialized()
        if self.owns_process_group:
            dist.init_process_group(
                backend=backend,
                # A silent peer ends the job after this long, named by helios_train/runtime/heartbeat.py.
                timeout=datetime.timedelta(seconds=trainer_cfg.collective_timeout_s),
                device_id=self.device if self.device.type == "cuda" else None,
            )
        # DDP stays on the world group under sequence parallelism (helios_train/backends/sequence_groups.py).
        self.sequence = SequenceGroups.build(launcher_cfg, self.rank, self.world_size, self.device.type)

    def prepare(self, name, module, optimizer, scheduler, max_grad_norm, calls: Calls = Calls.ONCE) -> PreparedRole:
        role = super().prepare(name, module, optimizer, scheduler, max_grad_norm)
        if calls != Calls.ONCE:
            # Several forwards with grad before one backward: DDP's ready-once hooks would fire twice; a loss
            # that drives the submodules never runs the wrapper's forward at all. Same maths without the
            # wrapper: identical replicas at start (same seed / checkpoint), gradients averaged in
            # `reduce_gradients` before clipping.
            self._broadcast(module)
            role.manual_reduce = True
            return role
        role.model = DistributedDataParallel(
            module,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.launcher_cfg.find_unused_parameters,
            bucket_cap_mb=self.launcher_cfg.bucket_cap_mb,
        )
        return role

    def accumulation_context(self, role: PreparedRole, is_last_micro: bool):
        if role.manual_reduce or is_last_micro:
            return super().accumulation_context(role, True)
        return role.model.no_sync()

    def _broadcast(self, module) -> None:
        for p in module.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)

    def reduce_gradients(self, role: PreparedRole) -> None:
        # A parameter no rank touched this step (the GAN heads before stage.gan.start_step) keeps
        # grad None, so AdamW skips it exactly as in a single process (no weight decay, no moments).
        touched = torch.tensor([p.grad is not None for p in role.params], dtype=torch.int32, device=self.device)
        dist.all_reduce(touched, op=dist.ReduceOp.MAX)
        grads = []
        for p, any_rank in zip(role.params, touched.tolist()):
            if not any_rank:
                p.grad = None
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        # Bucketed like DDP's own reducer (launcher.bucket_cap_mb): a 14B LoRA r256 generator has ~2,000
        # trainable tensors, one collective each would be latency-bound.
        for bucket in gradient_buckets(grads, int(self.launcher_cfg.bucket_cap_mb * 2**20)):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.world_size)
            for g, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(reduced)

    def barrier(self) -> None:
        dist.barrier()

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone().to(self.device)
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def all_max(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone().float().to(self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value

    def all_sum_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(t.item())

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            # The entry point ends a multi-process run with os._exit after this barrier: no destroy, whose
            # gloo destructor can deadlock on the GIL (helios_train/runtime/process_guard.py).
            if self.owns_process_group and not teardown_by_exit():
                dist.destroy_process_group()
