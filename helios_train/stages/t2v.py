"""Text-to-video pretraining on single chunks (`stage=t2v`): the analogue of Wan2.1-T2V, the model the official
stage 1 starts from. Not part of the Helios recipe: the miniature (helios_train/miniature/) has no pretrained
video model to download, so it makes one.

One micro-batch: a random 33-frame chunk of a video (the latent loader's target), logit-normal σ, x_t = (1−σ)·x +
σ·ε, the transformer sees the noisy chunk and the caption only — no history tokens, no anchor, no memory patches —
and predicts v = ε − x (the Base stage's loss, helios_train/stages/base.py, without the conditioning). Every weight
trains (`stage.trainables.full_model`). Its export is a Wan2.1-style folder: no memory patches, so `stage=base`
initialises them from the trained patch embedding as it does for Wan2.1 (helios_train/model/memory_patches.py).
"""
from __future__ import annotations

import torch

from helios_train.algorithms.timesteps import add_noise, flow_target, sample_training_sigmas
from helios_train.runtime.roles import RoleSpec
from helios_train.stages.base import ConditionedStage


class T2VStage(ConditionedStage):
    name = "t2v"

    def role_specs(self) -> dict[str, RoleSpec]:
        return {"generator": RoleSpec(self.transformer, self.cfg.trainer.optim)}

    def loss(self, role: str, batch: dict, step: int, generator: torch.Generator):
        clean = batch["target"]
        sigma, timestep = sample_training_sigmas(clean.shape[0], self.cfg.stage.timesteps, generator,
                                                 seq_len=self.adapter.seq_len(self.transformer, clean.shape))
        sigma, timestep = sigma.to(self.device), timestep.to(self.device)
        noise = torch.randn(clean.shape, generator=generator, device=generator.device).to(self.device)
        pred = self.predict(self.roles[role].model, add_noise(clean, noise, sigma), None, None, timestep,
                            batch["prompt_embeds"])
        loss = ((pred.float() - flow_target(clean, noise).float()) ** 2).flatten(1).mean(dim=1).mean()
        return loss, {"sigma_mean": float(sigma.float().mean())}

    def tokens_per_sample(self, batch: dict) -> dict[str, int]:
        return {"noisy": self.adapter.seq_len(self.transformer, batch["target"].shape), "history": 0}
