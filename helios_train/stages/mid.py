"""Stage 2 (Helios-Mid): Pyramid Unified Predictor Corrector training (spec §7).

One micro-batch: the Base stage's history conditioning (task dropout + anti-drift, shared by every
segment, full resolution) → the target chunk's clean and noise pyramids (helios_train/pyramid.py) →
`stage.pyramid.sample_ratios[k]` draws per level k (uniform table index; stage-local σ, global t) →
x = σ·start + (1−σ)·end, v = start − end → loss = mean over segments of the per-sample MSE.

Execution (`stage.pyramid.execution`): the official code packs all segments into one NaViT varlen
forward; diffusers' HeliosTransformer3DModel has no varlen attention, so we run one forward per
segment ("separate") or one per level with same-level segments stacked on the batch axis
("batch_levels"). Both give the same loss; attention never crosses segments, as in the official
block-diagonal packing.
"""
from __future__ import annotations

import torch

from helios_train.history import model_inputs, token_counts
from helios_train.pyramid import PyramidSchedule, build_levels, level_token_counts, sample_all_levels
from helios_train.stages.base import BaseStage


class MidStage(BaseStage):
    name = "mid"

    def __init__(self, cfg, device: torch.device):
        super().__init__(cfg, device)
        self.schedule = PyramidSchedule(cfg.stage.pyramid)
        if cfg.stage.pyramid.execution not in ("separate", "batch_levels"):
            raise ValueError(f"stage.pyramid.execution={cfg.stage.pyramid.execution!r}: expected separate | batch_levels")

    def segments(self, clean: torch.Tensor, generator: torch.Generator):
        noise = torch.randn(clean.shape, generator=generator, device=generator.device).to(clean.device)
        levels = build_levels(clean.float(), noise, self.schedule)
        return sample_all_levels(levels, self.schedule, generator)

    def _forward(self, role: str, x, timestep, x0, history, embeds):
        inputs = model_inputs(x, x0, history, timestep.to(self.device, torch.float32), embeds, self.cfg.stage.history)
        with self.autocast():
            return self.roles[role].model(**inputs, return_dict=False)[0]

    def loss(self, role: str, batch: dict, step: int, generator: torch.Generator):
        x0, history, logs = self.condition(batch, generator)
        segs = self.segments(batch["target"], generator)
        embeds = batch["prompt_embeds"]
        losses = []
        if self.cfg.stage.pyramid.execution == "separate":
            for seg in segs:
                pred = self._forward(role, seg.x, seg.timestep, x0, history, embeds)
                losses.append(((pred.float() - seg.target.float()) ** 2).flatten(1).mean(1))
        else:
            b = x0.shape[0]
            for level in sorted({s.level for s in segs}):
                group = [s for s in segs if s.level == level]
                n = len(group)
                pred = self._forward(role, torch.cat([s.x for s in group]), torch.cat([s.timestep for s in group]),
                                     x0.repeat(n, 1, 1, 1, 1), history.repeat(n, 1, 1, 1, 1), embeds.repeat(n, 1, 1))
                target = torch.cat([s.target for s in group])
                per = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
                losses.extend(per.split(b))
        per_segment = torch.stack([l.mean() for l in losses])  # official: uniform mean over segments
        for seg, value in zip(segs, per_segment):
            logs[f"loss_level{seg.level}"] = float(value.detach())
        logs["segments"] = len(segs)
        return per_segment.mean(), logs

    def tokens_per_sample(self, batch: dict) -> dict[str, int]:
        h, w = batch["target"].shape[-2:]
        if self._tokens is None or self._tokens[0] != (h, w):
            hist = token_counts(self.transformer, (h, w), self.cfg.stage.history)["history"]
            window = self.cfg.stage.history.latent_window_size
            per_level = level_token_counts((h, w), window, num_stages=self.schedule.num_stages)
            ratios = self.cfg.stage.pyramid.sample_ratios
            noisy = sum(n * r for n, r in zip(per_level, ratios))
            self._tokens = ((h, w), {"noisy": noisy, "history": hist * sum(ratios)})
        return self._tokens[1]
