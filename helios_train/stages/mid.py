"""Stage 2 (Helios-Mid): Pyramid Unified Predictor Corrector training (official
`prepare_stage2_clean_input` / `prepare_stage2_noise_input`, helios/utils/utils_helios_base.py).

One micro-batch: the Base stage's history conditioning (task dropout + anti-drift, shared by every
segment, full resolution) → the target chunk's clean and noise pyramids (helios_train/algorithms/pyramid.py) →
`stage.pyramid.sample_ratios[k]` draws per level k (uniform table index; stage-local σ, global t) →
x = σ·start + (1−σ)·end, v = start − end → loss = mean over segments of the per-sample MSE.

Execution (`stage.pyramid.execution`); all three give the same loss and attention never crosses
segments, as in the official block-diagonal NaViT packing:
- "separate": one stock diffusers forward per segment (4 in 2-init, 3 in 2-post);
- "batch_levels": one stock forward per level, same-level segments stacked on the batch axis;
- "packed": one pass through the blocks over all segments ([history copy | level tokens] each),
  the official layout, with per-segment self-attention (helios_train/model/packed_forward.py). The stock
  model has no varlen attention and no way to pass a mask to its blocks, so this drives the model's
  submodules itself: the role declares `Calls.SUBMODULES` and the backend decides what that needs (DDP
  averages the gradients itself; DeepSpeed's hooks work unchanged). Tests check every launcher against one
  process.
"""
from __future__ import annotations

import torch

from helios_train.algorithms.pyramid import PyramidSchedule, build_levels, level_token_counts, sample_all_levels
from helios_train.model.packed_forward import packed_forward
from helios_train.runtime.precision import autocast
from helios_train.runtime.roles import Calls, RoleSpec
from helios_train.stages.base import BaseStage


class MidStage(BaseStage):
    name = "mid"

    def __init__(self, cfg, device: torch.device, distribution=None):
        super().__init__(cfg, device, distribution)
        self.schedule = PyramidSchedule(cfg.stage.pyramid)
        self.execution = cfg.stage.pyramid.execution

    def role_specs(self) -> dict[str, RoleSpec]:
        calls = Calls.SUBMODULES if self.execution == "packed" else Calls.ONCE
        return {"generator": RoleSpec(self.transformer, self.cfg.trainer.optim, calls=calls)}

    def segments(self, clean: torch.Tensor, generator: torch.Generator):
        noise = torch.randn(clean.shape, generator=generator, device=generator.device).to(clean.device)
        levels = build_levels(clean.float(), noise, self.schedule)
        return sample_all_levels(levels, self.schedule, generator)

    def _forward(self, role: str, x, timestep, x0, history, embeds):
        return self.predict(self.roles[role].model, x, x0, history, timestep.to(self.device, torch.float32), embeds)

    def predict_segments(self, role: str, segs, x0, history, embeds) -> list[torch.Tensor]:
        """The model's v-prediction for every segment, by the configured execution."""
        if self.execution == "separate":
            return [self._forward(role, s.x, s.timestep, x0, history, embeds) for s in segs]
        if self.execution == "packed":
            with autocast(self.device, self.precision):
                return packed_forward(self.roles[role].module, [s.x for s in segs],
                                      [s.timestep.to(self.device, torch.float32) for s in segs],
                                      x0, history, embeds, self.cfg.stage.history)
        b, preds = x0.shape[0], [None] * len(segs)
        for level in sorted({s.level for s in segs}):
            group = [i for i, s in enumerate(segs) if s.level == level]
            n = len(group)
            pred = self._forward(role, torch.cat([segs[i].x for i in group]),
                                 torch.cat([segs[i].timestep for i in group]),
                                 x0.repeat(n, 1, 1, 1, 1), history.repeat(n, 1, 1, 1, 1), embeds.repeat(n, 1, 1))
            for i, p in zip(group, pred.split(b)):
                preds[i] = p
        return preds

    def loss(self, role: str, batch: dict, step: int, generator: torch.Generator):
        x0, history, logs = self.condition(batch, generator)
        segs = self.segments(batch["target"], generator)
        preds = self.predict_segments(role, segs, x0, history, batch["prompt_embeds"])
        # per segment: mean over samples of the per-sample MSE; official: uniform mean over segments
        per_segment = torch.stack([((p.float() - s.target.float()) ** 2).flatten(1).mean(1).mean()
                                   for p, s in zip(preds, segs)])
        for seg, value in zip(segs, per_segment):
            logs[f"loss_level{seg.level}"] = float(value.detach())
        logs["segments"] = len(segs)
        return per_segment.mean(), logs

    def tokens_per_sample(self, batch: dict) -> dict[str, int]:
        """Noisy tokens over all segments and history tokens (one copy per segment, as every
        execution attends each segment with its own history — the official packing too)."""
        hw = tuple(batch["target"].shape[-2:])
        hist = self.token_counts(hw)["history"]
        per_level = level_token_counts(hw, self.cfg.stage.history.latent_window_size,
                                       patch=self.adapter.patch_size(self.transformer), num_stages=self.schedule.num_stages)
        ratios = self.cfg.stage.pyramid.sample_ratios
        return {"noisy": sum(n * r for n, r in zip(per_level, ratios)), "history": hist * sum(ratios)}
