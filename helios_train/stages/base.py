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
from helios_train.algorithms.task_dropout import apply_task_dropout
from helios_train.algorithms.timesteps import add_noise, flow_target, sample_training_sigmas
from helios_train.config.stages import uses_history
from helios_train.model import adapter_for
from helios_train.model.loading import apply_speed_options
from helios_train.runtime.precision import mixed_precision
from helios_train.runtime.roles import RoleSpec
from helios_train.stages.stage import Stage


class ConditionedStage(Stage):
    """What every Helios stage shares: the generator (the model being trained), the run's precision, the
    history conditioning of a batch (task dropout, anti-drift) and raw-mode encoding on the device."""

    def __init__(self, cfg, device: torch.device, distribution=None):
        super().__init__(cfg, device, distribution)
        self.adapter = adapter_for(cfg.model)
        self.precision = mixed_precision(cfg)
        # A history-free stage (t2v) asks for the folder's architecture as it is; a family that has no such stage
        # never sees the keyword.
        no_history = {} if uses_history(cfg.stage) else {"history": False}
        self.transformer = self.adapter.load(cfg.model, cfg.stage.trainables, device="cpu", **no_history)
        self.trainable_names = self.adapter.add_trainables(self.transformer, cfg.stage.trainables)
        self.transformer.to(device)
        apply_speed_options(self.transformer, cfg.model)
        self.online_encoder = self._online_encoder() if cfg.data.mode == "raw" else None
        self._tokens = None

    def _online_encoder(self):
        """Raw-mode data: the VAE and text encoder encode each batch on the training device."""
        from helios_train.data.online_encoding import OnlineEncoder
        from helios_train.model.loading import load_text_stack, load_vae

        tok, enc = load_text_stack(self.cfg.model, self.device)
        return OnlineEncoder(load_vae(self.cfg.model, self.device), tok, enc, self.cfg.stage.history,
                             self.cfg.model.text_max_length, self.device, seed=self.cfg.trainer.seed)

    def prepare_batch(self, batch: dict) -> dict:
        batch = super().prepare_batch(batch)
        if "context_frames" in batch:  # raw mode: encode on the training device
            batch = self.online_encoder(batch)
        return batch

    def predict(self, model, noisy, x0, history, timestep, prompt_embeds, full_output: bool = False):
        """The model's prediction for a noisy chunk under the run's autocast (helios_train/model/adapter.py)."""
        return self.adapter.predict(model, noisy, x0, history, timestep, prompt_embeds, self.cfg.stage.history,
                                    self.precision, full_output)

    def velocity(self, model, x0, history, prompt_embeds):
        """(x_t, t) → fp32 velocity with the history bound: what the samplers call."""
        return self.adapter.velocity(model, x0, history, prompt_embeds, self.cfg.stage.history, self.precision)

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

    def token_counts(self, hw: tuple[int, int]) -> dict[str, int]:
        """The model's token counts of one sample at latent size `hw` (cached for the run's one size)."""
        if self._tokens is None or self._tokens[0] != hw:
            self._tokens = (hw, self.adapter.token_counts(self.transformer, hw, self.cfg.stage.history))
        return self._tokens[1]

    def tokens_per_sample(self, batch: dict) -> dict[str, int]:
        """Noisy and history token counts of one sample (one forward on the target chunk), from the model's own
        patch layers."""
        counts = self.token_counts(tuple(batch["target"].shape[-2:]))
        return {"noisy": counts["noisy"], "history": counts["history"]}


class BaseStage(ConditionedStage):
    name = "base"

    def role_specs(self) -> dict[str, RoleSpec]:
        return {"generator": RoleSpec(self.transformer, self.cfg.trainer.optim)}

    def loss(self, role: str, batch: dict, step: int, generator: torch.Generator):
        st = self.cfg.stage
        x0, history, logs = self.condition(batch, generator)
        clean = batch["target"]
        model_clean = corrupt_target(clean, st.anti_drift, generator) if st.anti_drift.corrupt_model_input else clean
        b = clean.shape[0]
        sigma, timestep = sample_training_sigmas(b, st.timesteps, generator,
                                                 seq_len=self.adapter.seq_len(self.transformer, clean.shape))
        sigma, timestep = sigma.to(self.device), timestep.to(self.device)
        noise = torch.randn(clean.shape, generator=generator, device=generator.device).to(self.device)
        noisy = add_noise(model_clean, noise, sigma)
        # The target stays ε − clean even when the input was degraded: the model learns to restore.
        target = flow_target(clean, noise)
        pred = self.predict(self.roles[role].model, noisy, x0, history, timestep, batch["prompt_embeds"])
        per_sample = ((pred.float() - target.float()) ** 2).flatten(1).mean(dim=1)
        loss = per_sample.mean()
        logs.update({"sigma_mean": float(sigma.float().mean())})
        return loss, logs
