"""Hardware-efficiency metrics: tokens/s (noisy vs history), achieved TFLOP/s, MFU, peak memory.

FLOPs per step come from torch's own FlopCounterMode run once on a real step (shapes are fixed per
run, so one count serves every later step) — not from a hand formula that drifts from the model.
MFU = achieved FLOP/s ÷ (`trainer.perf.peak_tflops` × world size); the default 989 TFLOP/s is the
H100 SXM dense bf16 peak. On CPU the number is still computed and logged (against the same peak it
is tiny, which is the honest answer).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class PerfConfig:
    peak_tflops: float = 989.0  # per device; H100 SXM bf16 dense
    count_flops: bool = True


class Throughput:
    def __init__(self, cfg: PerfConfig, device: torch.device, world_size: int):
        self.cfg = cfg
        self.device = device
        self.world_size = world_size
        self.flops_per_step: float | None = None
        self._counter: FlopCounterMode | None = None

    def measuring(self):
        """Context for the step whose FLOPs are counted: the run's first step (a resumed run takes the count
        from its checkpoint, so counting never perturbs a step an uninterrupted run did not count)."""
        if not self.cfg.count_flops or self.flops_per_step is not None:
            return contextlib.nullcontext()
        self._counter = FlopCounterMode(display=False)
        return self._counter

    def after_step(self) -> None:
        if self._counter is not None:
            self.flops_per_step = float(self._counter.get_total_flops())
            self._counter = None

    def metrics(self, step_time: float, tokens: dict[str, int], samples: int) -> dict[str, float]:
        """`tokens`: per-sample counts by kind; `samples`: samples this rank processed in the step."""
        out = {}
        for kind, n in tokens.items():
            out[f"perf/tokens_per_s_{kind}"] = n * samples * self.world_size / max(step_time, 1e-9)
        if self.flops_per_step is not None:
            tflops = self.flops_per_step / max(step_time, 1e-9) / 1e12  # this rank
            out["perf/tflops_per_device"] = tflops
            out["perf/mfu"] = tflops / self.cfg.peak_tflops
        if self.device.type == "cuda":
            out["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            import resource

            out["perf/peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return out
