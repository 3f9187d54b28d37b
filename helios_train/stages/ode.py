"""Stage 3, first phase (`stage=distilled stage.objective=ode`, official stage_3_ode.yaml): the generator alone
regresses teacher ODE pairs onto each pyramid level's end state (helios_train/algorithms/ode_regression.py,
data=ode_pairs; the pairs come from helios_train/sampling/ode_pair_capture.py). The student starts from the Mid
export (model.path) + LoRA; no critic, no teacher in memory. EMA of the generator (`stage.ema`) is a callback
(helios_train/training/callbacks/ema.py)."""
from __future__ import annotations

import torch

from helios_train.algorithms.ode_regression import ode_regression_loss
from helios_train.model.variants import make_scheduler
from helios_train.runtime.roles import Calls, RoleSpec
from helios_train.stages.base import ConditionedStage


class OdeStage(ConditionedStage):
    name = "distilled"

    def __init__(self, cfg, device: torch.device, distribution=None):
        super().__init__(cfg, device, distribution)
        self.scheduler = make_scheduler("distilled")  # the student's level tables (σ lookup of the targets)

    def role_specs(self) -> dict[str, RoleSpec]:
        # One loss runs a forward per (chunk, level) term before its backward.
        return {"generator": RoleSpec(self.transformer, self.cfg.trainer.optim, calls=Calls.SEVERAL)}

    def loss(self, role: str, batch: dict, step: int, generator: torch.Generator):
        model, embeds = self.roles["generator"].model, batch["prompt_embeds"].to(self.device)

        def velocity(x_t, t, x0, history):
            return self.velocity(model, x0, history, embeds)(x_t, t)
        return ode_regression_loss(velocity, batch, self.cfg.stage.ode, self.cfg.stage.history, generator,
                                   self.scheduler, self.device, patch=self.adapter.patch_size(self.transformer))

    def tokens_per_sample(self, batch: dict) -> dict[str, int]:
        """num_chunks × (one forward per pyramid level, each with the full history)."""
        terms = {"noisy": 0, "history": 0}
        for k in range(self.cfg.stage.ode.levels):
            hw = tuple(batch[f"ode_c0_s{k}_latents"].shape[-2:])
            counts = self.adapter.token_counts(self.transformer, hw, self.cfg.stage.history)
            terms["noisy"] += counts["noisy"] * self.cfg.stage.ode.num_chunks
            terms["history"] += counts["history"] * self.cfg.stage.ode.num_chunks
        return terms
