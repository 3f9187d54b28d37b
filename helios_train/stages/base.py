"""Stage 1 (Helios-Base): autoregressive chunk prediction with unified history injection.

One micro-batch (official train_helios.py; `prepare_stage1_clean_input_from_latents`,
`prepare_stage1_noise_input` and `_flow_loss` in helios/utils/utils_helios_base.py):
  task dropout (T2V / I2V / V2V context) → Easy Anti-Drifting on the history (noise / blur,
  saturation) → logit-normal σ, x_t = (1−σ)·x0 + σ·ε → the transformer sees
  [long | mid | short | noisy] with history at t = 0 and predicts v for the noisy chunk only →
  loss = mean_samples mean_{C,T,H,W} (v̂ − (ε − x0))², in fp32.
"""
from __future__ import annotations

import torch

from helios_train.algorithms.anti_drift import add_saturation, corrupt_history, corrupt_target
from helios_train.algorithms.history import model_inputs, token_counts
from helios_train.model.loading import apply_speed_options, load_transformer
from helios_train.model.trainables import apply_trainable_policy
from helios_train.runtime.precision import autocast, mixed_precision
from helios_train.stages import RoleSpec, Stage
from helios_train.algorithms.task_dropout import apply_task_dropout
from helios_train.algorithms.timesteps import add_noise, flow_target, sample_training_sigmas, seq_len_for


class BaseStage(Stage):
    name = "base"

    def __init__(self, cfg, device: torch.device):
        super().__init__(cfg, device)
        self.transformer = load_transformer(cfg.model, cfg.stage.trainables, device="cpu")
        self.trainable_names = apply_trainable_policy(self.transformer, cfg.stage.trainables)
        self.transformer.to(device)
        apply_speed_options(self.transformer, cfg.model)
        self.online_encoder = None  # raw-mode data: built by the trainer (`attach_online_encoder`)
        self._tokens = None

    def role_specs(self) -> dict[str, RoleSpec]:
        return {"generator": RoleSpec(self.transformer, self.cfg.trainer.optim)}

    def phases(self, step: int) -> list[str]:
        return ["generator"]

    def prepare_batch(self, batch: dict) -> dict:
        batch = super().prepare_batch(batch)
        if "context_frames" in batch:  # raw mode: encode on the training device
            batch = self.online_encoder(batch)
        return batch

    def autocast(self):
        return autocast(self.device, mixed_precision(self.cfg))

    def condition(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Task dropout then anti-drift degradations on (x0, history); returns what was applied."""
        st = self.cfg.stage
        sizes, window = tuple(st.history.history_sizes), st.history.latent_window_size
        x0, history, tasks = apply_task_dropout(batch["x0"], batch["history"], st.task_dropout, generator, window)
        x0, history, applied = corrupt_history(x0, history, st.anti_drift, generator, sizes, window)
        x0, history, saturated = add_saturation(x0, history, st.anti_drift, generator, sizes, window)
        logs = {f"task/{t}": sum(1 for x in tasks if x == t) / len(tasks) for t in ("t2v", "i2v", "v2v", "none")}
        logs.update({f"degrade/{k}": float(v) for k, v in {**applied, **saturated}.items()})
        return x0, history, logs

    def loss(self, role: str, batch: dict, step: int, generator: torch.Generator):
        st = self.cfg.stage
        x0, history, logs = self.condition(batch, generator)
        clean = batch["target"]
        model_clean = corrupt_target(clean, st.anti_drift, generator) if st.anti_drift.corrupt_model_input else clean
        b = clean.shape[0]
        sigma, timestep = sample_training_sigmas(b, st.timesteps, generator, seq_len=seq_len_for(clean.shape))
        sigma, timestep = sigma.to(self.device), timestep.to(self.device)
        noise = torch.randn(clean.shape, generator=generator, device=generator.device).to(self.device)
        noisy = add_noise(model_clean, noise, sigma)
        # The target stays ε − clean even when the input was degraded: the model learns to restore.
        target = flow_target(clean, noise)
        inputs = model_inputs(noisy, x0, history, timestep, batch["prompt_embeds"], st.history)
        with self.autocast():
            pred = self.roles[role].model(**inputs, return_dict=False)[0]
        per_sample = ((pred.float() - target.float()) ** 2).flatten(1).mean(dim=1)
        loss = per_sample.mean()
        logs.update({"sigma_mean": float(sigma.float().mean())})
        return loss, logs

    def tokens_per_sample(self, batch: dict) -> dict[str, int]:
        """Noisy and history token counts of one sample, from the model's own patch layers."""
        h, w = batch["target"].shape[-2:]
        if self._tokens is None or self._tokens[0] != (h, w):
            self._tokens = ((h, w), token_counts(self.transformer, (h, w), self.cfg.stage.history))
        counts = self._tokens[1]
        return {"noisy": counts["noisy"], "history": counts["history"]}
