"""Phase offload of the frozen bases in the DMD stage (`stage.dmd.low_vram`; official `dmd_is_low_vram_mode`,
`OptimizedLowVRAMManager` in helios/utils/utils_helios_post.py).

A DMD step uses two 14B bases, the generator's (the student) and the critic's (shared with the teacher),
but never both at once: generator rollout → teacher and critic scores (+ the GAN's L_G) → generator
backward; critic-phase rollout → critic loss and backward. `FrozenBaseResidency.use(role)` makes that
role's frozen base resident on the device and frees the others' device copies, so a GPU holds one
base (28.7 GB at 14B bf16) instead of two. Training numbers do not change (tests/test_low_vram.py).

How this differs from the official manager, which moves whole modules with `module.to("cpu")`:
- only frozen parameters move. Trainable tensors (LoRA, GAN heads: fp32) stay where the optimizer and
  DeepSpeed's flat buffers reference them — under ZeRO-2 moving them would free nothing, the engine's
  flat buffer keeps its copy — and buffers (RoPE tables, KBs) stay too;
- frozen weights never change, so each has one pinned host copy made at setup and offloading is just
  freeing the device copy: no device→host traffic, half the official bytes per switch. The cost is host
  memory: both bases stay in pinned RAM for the whole run (2 × 28.7 GB per GPU process at 14B, where the
  official holds the one being offloaded);
- onloads are non-blocking copies from pinned memory, ordered on the compute stream. A side stream
  could not overlap them with compute: the destination is the memory the departing base just freed, so
  the copy has to wait for the last kernel that used it, and the next kernels need the arriving base;
- an offloaded parameter holds an empty tensor, so a forward through an offloaded base fails at once
  (a shape error) instead of computing on stale or host memory.

Fake tensors (the dry run): the host copy is the original fake tensor and an onload makes a new one,
so torch's MemTracker sees exactly the device bytes a GPU would hold at each moment.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor


class FrozenBaseResidency:
    """Keeps exactly one role's frozen parameters on `device`; the others' live only in host memory."""

    def __init__(self, modules: dict[str, torch.nn.Module], device: torch.device):
        self.device = torch.device(device)
        self.modules = dict(modules)
        self.params: dict[str, list[torch.nn.Parameter]] = {}
        self.hosts: dict[str, list[torch.Tensor]] = {}
        seen: set[int] = set()
        for name, module in modules.items():
            frozen = [p for p in module.parameters() if not p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in frozen)
            self.params[name] = frozen
            self.hosts[name] = [self._host_copy(p.data) for p in frozen]
        self.bytes = {name: sum(h.numel() * h.element_size() for h in hosts) for name, hosts in self.hosts.items()}
        self.resident: set[str] = set(modules)
        self.onloaded_bytes = 0  # host→device bytes since the last `take_onloaded_bytes`
        self.total_onloaded_bytes = 0  # since setup
        self.on_onload: Callable[[str], None] = lambda name: None  # observer (the dry run's memory tracker)
        for name in modules:
            self._offload(name)

    def _host_copy(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, FakeTensor):
            return t  # no data; never reachable from the module again once offloaded
        host = t.detach().to("cpu")  # a base loaded on the CPU is not copied: its tensor becomes the host copy
        return host.pin_memory() if self.device.type == "cuda" else host

    def _offload(self, name: str) -> None:
        for p in self.params[name]:
            p.data = p.data.new_empty((0,))  # frees the device copy; a use of it fails loudly
        self.resident.discard(name)

    def _onload(self, name: str) -> None:
        for p, host in zip(self.params[name], self.hosts[name]):
            dst = host.new_empty(host.shape, device=self.device)
            dst.copy_(host, non_blocking=True)
            p.data = dst
        self.resident.add(name)
        self.onloaded_bytes += self.bytes[name]
        self.total_onloaded_bytes += self.bytes[name]
        self.on_onload(name)

    def use(self, name: str) -> None:
        """Make `name`'s base resident; every other base is offloaded first (one base on the device at a time)."""
        if name not in self.params:
            raise KeyError(f"no frozen base registered for role {name!r} (have {sorted(self.params)})")
        for other in sorted(self.resident - {name}):
            self._offload(other)
        if name not in self.resident:
            self._onload(name)

    def take_onloaded_bytes(self) -> int:
        n, self.onloaded_bytes = self.onloaded_bytes, 0
        return n
