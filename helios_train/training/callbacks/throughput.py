"""Hardware-efficiency metrics: tokens/s (noisy vs history), achieved TFLOP/s, MFU, peak memory.

FLOPs come from torch's own FlopCounterMode run on real steps — not from a hand formula that drifts
from the model. Steps of one run do not all cost the same: a DMD step runs the generator and the
critic or the critic alone, the GAN adds its terms from its start step, the generator's rollout
exits at a random step per level and the first chunk of a video gets twice the sampler steps. So
each step has a *work key* (the stage's `work_key(step)`, known before the step: phases, GAN, exit
steps) and a *variant* (the stage's `work_variant()`, known after it: e.g. which rollouts were the
amplified first-chunk sampler). The first step of every key is counted; a step whose key was counted
but whose variant was not arms its key, and the next step with that key is counted too. A step whose
(key, variant) has no count yet logs no TFLOP/s or MFU rather than a wrong one.
MFU = achieved FLOP/s ÷ `trainer.perf.peak_tflops` (per device); the default 989 TFLOP/s is the
H100 SXM dense bf16 peak. On CPU the number is still computed and logged (against the same peak it
is tiny, which is the honest answer).
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.flop_counter import FlopCounterMode

from helios_train.config.mechanisms import PerfConfig  # noqa: F401  (the schema's; re-exported)
from helios_train.runtime.callbacks import Callback


class Throughput:
    def __init__(self, cfg: PerfConfig, device: torch.device, world_size: int):
        self.cfg = cfg
        self.device = device
        self.world_size = world_size
        self.flops: dict[str, float] = {}  # "key|variant" → FLOPs of one such step on this rank
        self.armed: set[str] = set()  # keys whose last step had an uncounted variant
        self.step_flops: float | None = None  # of the step just finished (None: not known)
        self._counter: FlopCounterMode | None = None

    def _seen(self, key: str) -> bool:
        return any(k.split("|", 1)[0] == key for k in self.flops)

    def measuring(self, key: str = ""):
        """Context for one step's phases: a FlopCounterMode when this step's key needs a count. Counts are
        kept in the checkpoint, so a resumed run counts exactly the steps the uninterrupted run counted
        (the counter's dispatch changes kernel choices at the 1e-9 level)."""
        if not self.cfg.count_flops or (self._seen(key) and key not in self.armed):
            return contextlib.nullcontext()
        self._counter = FlopCounterMode(display=False)
        return self._counter

    def after_step(self, key: str = "", variant: str = "") -> None:
        full = f"{key}|{variant}"
        if self._counter is not None:
            self.flops[full] = float(self._counter.get_total_flops())
            self.armed.discard(key)
            self._counter = None
        elif self.cfg.count_flops and full not in self.flops:
            self.armed.add(key)
        self.step_flops = self.flops.get(full)

    def state_dict(self) -> dict:
        return {"flops": dict(self.flops), "armed": sorted(self.armed)}

    def load_state_dict(self, state: dict) -> None:
        self.flops, self.armed = dict(state["flops"]), set(state["armed"])

    def metrics(self, step_time: float, tokens: dict[str, int], samples: int) -> dict[str, float]:
        """`tokens`: per-sample counts by kind; `samples`: samples this rank processed in the step."""
        out = {}
        for kind, n in tokens.items():
            out[f"perf/tokens_per_s_{kind}"] = n * samples * self.world_size / max(step_time, 1e-9)
        if self.step_flops is not None:
            tflops = self.step_flops / max(step_time, 1e-9) / 1e12  # this rank
            out["perf/step_tflop"] = self.step_flops / 1e12
            out["perf/tflops_per_device"] = tflops
            out["perf/mfu"] = tflops / self.cfg.peak_tflops
        if self.device.type == "cuda":
            out["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            import resource

            out["perf/peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return out


class ThroughputCallback(Callback):
    """Counts each kind of step's FLOPs (around the phases) and logs tokens/s, TFLOP/s, MFU and peak memory.

    The counts are kept in the checkpoint (`flops`), with the per-rank work they were counted for: a resume
    after a change of accumulation or batch size counts again (a rank's step does other work)."""

    name = "flops"

    def __init__(self, cfg: PerfConfig, device: torch.device, data_world: int, work: tuple[int, int]):
        self.meter = Throughput(cfg, device, data_world)
        self.work = list(work)  # (accumulation steps, batch size): what one rank's step processes
        self._key = ""

    def step_context(self, trainer, step: int):
        self._key = trainer.stage.work_key(step)  # once at the start of each step (the stage's contract)
        return self.meter.measuring(self._key)

    def on_step_end(self, trainer, step: int, updated: list[str]) -> dict:
        self.meter.after_step(self._key, trainer.stage.work_variant())
        return {}

    def metrics(self, trainer, step_time_s: float, batches: list[dict]) -> dict:
        samples = sum(len(x["keys"]) for x in batches)
        return self.meter.metrics(step_time_s, trainer.stage.tokens_per_sample(batches[0]), samples)

    def state_dict(self) -> dict:
        return {**self.meter.state_dict(), "work": self.work}

    def load_state_dict(self, state: dict) -> None:
        if state.get("work", self.work) == self.work:  # counted for another per-rank work: count again
            self.meter.load_state_dict(state)
