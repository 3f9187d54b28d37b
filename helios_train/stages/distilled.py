"""Stage 3 (Helios-Distilled): ODE regression, then DMD with a critic/teacher sharing one base (spec §8).

`stage.objective=ode` (official stage_3_ode): the generator alone regresses teacher ODE pairs onto
each pyramid level's end state (helios_train/ode_regression.py, data=ode_pairs); no critic is built.
`stage.objective=dmd` (stage_3_post):

Roles (data, not branches in the trainer):
- generator: the student (model.path: the ODE / Mid export) + LoRA; rolls out one chunk with the
  few-step x0 pyramid sampler (helios_train/rollout.py), random exit step per level;
- critic: the real-score base (stage.dmd.real_score_path: a Base export) + its own LoRA (B = 0, so it
  equals the teacher at init); the teacher is the same module with adapters disabled — one 14B copy.
Phases: every step the critic takes a flow-matching step on generator samples; on steps with
step % update_ratio == 0 the generator's DMD step runs first (5:1 critic:generator). History is the
real, corrupted ground-truth history of the batch (task dropout + anti-drift incl. saturation).

EMA of the generator's trainables (`stage.ema`, official decay 0.99 from step 750) is kept with the
checkpoints (`generator.ema.safetensors`); `python -m helios_train.export --ema` exports it.
"""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from helios_train.dmd import critic_flow_loss, dmd_gradient, dmd_loss, sample_critic_t, sample_generator_t
from helios_train.ema import EMA
from helios_train.history import model_inputs, token_counts
from helios_train.model.loading import load_text_stack, load_transformer
from helios_train.model.text_codec import encode_prompts
from helios_train.model.trainables import apply_trainable_policy
from helios_train.ode_regression import ode_regression_loss
from helios_train.rollout import calculate_mu, pyramid_rollout
from helios_train.stages import RoleSpec
from helios_train.stages.base import BaseStage
from helios_train.variants import NEGATIVE_PROMPT, make_scheduler


class DistilledStage(BaseStage):
    name = "distilled"

    def __init__(self, cfg, device: torch.device):
        super().__init__(cfg, device)  # the generator: student + LoRA (stage.trainables)
        self.objective = cfg.stage.objective
        if self.objective not in ("dmd", "ode"):
            raise ValueError(f"stage.objective={self.objective!r}: expected dmd | ode")
        self.scheduler = make_scheduler("distilled")
        self.ema = EMA(self.transformer, cfg.stage.ema) if cfg.stage.ema.enabled else None
        if self.objective == "dmd":
            self._build_critic(cfg, device)

    def _build_critic(self, cfg, device) -> None:
        """Teacher + critic: one real-score base (a Base export) with the critic's LoRA (spec §8.3)."""
        d = cfg.stage.dmd
        if not d.real_score_path:
            raise ValueError("stage.dmd.real_score_path: give the teacher (Helios-Base export) folder")
        real_cfg = OmegaConf.merge(cfg.model, {"path": d.real_score_path, "transformer_path": None})
        self.critic = load_transformer(real_cfg, cfg.stage.trainables)
        critic_policy = OmegaConf.merge(cfg.stage.trainables, {"lora": {"rank": d.critic_lora_rank},
                                                                "patch_embedding": "frozen", "memory_patches": "frozen"})
        apply_trainable_policy(self.critic, critic_policy)
        self.critic.to(device)
        tok, enc = load_text_stack(cfg.model, device)  # the negative prompt for the teacher's guidance
        self.negative = encode_prompts(tok, enc, [NEGATIVE_PROMPT], cfg.model.text_max_length, device)
        del tok, enc

    # -- EMA of the generator (spec §1.5) ------------------------------------------------------------
    def after_step(self, step: int, updated: list[str]) -> dict:
        # Official: EMA steps on every step before its start, then only on generator-update steps.
        if self.ema is None or ("generator" not in updated and step > self.cfg.stage.ema.update_after_step):
            return {}
        return {"ema_decay": self.ema.update(self.transformer, step + 1)}

    def save_extra(self, directory, is_main: bool) -> None:
        if self.ema is not None and is_main:
            from safetensors.torch import save_file

            save_file(self.ema.state_dict(), str(directory / "generator.ema.safetensors"))

    def load_extra(self, directory) -> None:
        if self.ema is not None:
            from safetensors.torch import load_file

            self.ema.load_state_dict(load_file(str(directory / "generator.ema.safetensors")))

    def role_specs(self) -> dict[str, RoleSpec]:
        d, o = self.cfg.stage.dmd, self.cfg.trainer.optim
        critic_optim = OmegaConf.merge(o, {"lr": d.critic_lr, "betas": list(d.critic_betas),
                                           "weight_decay": d.critic_weight_decay})
        generator = RoleSpec(self.transformer, o, multi_forward=True)  # several forwards per loss
        if self.objective == "ode":
            return {"generator": generator}
        return {"generator": generator, "critic": RoleSpec(self.critic, critic_optim)}

    def phases(self, step: int) -> list[str]:
        if self.objective == "ode":
            return ["generator"]
        return ["generator", "critic"] if step % self.cfg.stage.dmd.update_ratio == 0 else ["critic"]

    # -- model calls -----------------------------------------------------------------------------
    def _velocity(self, model, x0, history, embeds):
        def fn(x, t):
            with self.autocast():
                inputs = model_inputs(x, x0, history, t, embeds, self.cfg.stage.history)
                return model(**inputs, return_dict=False)[0].float()
        return fn

    def _rollout(self, batch, x0, history, generator, exit_steps):
        d = self.cfg.stage.dmd
        empty = bool((x0.abs().sum() == 0) and (history.abs().sum() == 0))  # first chunk: amplified sampler
        noise = torch.randn(batch["target"].shape, generator=generator).to(self.device)
        model = self.roles["generator"].model if exit_steps is not None else self.roles["generator"].module
        return pyramid_rollout(self._velocity(model, x0, history, batch["prompt_embeds"]), noise, self.scheduler,
                               d.rollout_steps, d.amplify_first_chunk and empty, generator, "level", exit_steps)

    def _exit_steps(self, x0, history, generator) -> list[int]:
        d = self.cfg.stage.dmd
        amplify = d.amplify_first_chunk and bool((x0.abs().sum() == 0) and (history.abs().sum() == 0))
        return [int(torch.randint(n * (2 if amplify else 1), (1,), generator=generator)) for n in d.rollout_steps]

    def _mu(self, target) -> float:
        t, h, w = target.shape[-3:]
        return calculate_mu(t * h * w // 4)

    # -- losses ----------------------------------------------------------------------------------
    def loss(self, role: str, batch: dict, step: int, generator: torch.Generator):
        if self.objective == "ode":
            return self._ode_loss(batch, generator)
        x0, history, logs = self.condition(batch, generator)
        return self._generator_loss(batch, x0, history, step, generator, logs) if role == "generator" \
            else self._critic_loss(batch, x0, history, generator, logs)

    def _ode_loss(self, batch, generator):
        model, embeds = self.roles["generator"].model, batch["prompt_embeds"].to(self.device)

        def velocity(x_t, t, x0, history):
            return self._velocity(model, x0, history, embeds)(x_t, t)
        return ode_regression_loss(velocity, batch, self.cfg.stage.ode, self.cfg.stage.history, generator,
                                   self.scheduler, self.device)

    def tokens_per_sample(self, batch: dict) -> dict[str, int]:
        if self.objective == "dmd":
            return super().tokens_per_sample(batch)
        # ODE: num_chunks × (one forward per pyramid level, each with the full history)
        terms = {"noisy": 0, "history": 0}
        for k in range(self.cfg.stage.ode.levels):
            h, w = batch[f"ode_c0_s{k}_latents"].shape[-2:]
            counts = token_counts(self.transformer, (h, w), self.cfg.stage.history)
            terms["noisy"] += counts["noisy"] * self.cfg.stage.ode.num_chunks
            terms["history"] += counts["history"] * self.cfg.stage.ode.num_chunks
        return terms

    def _generator_loss(self, batch, x0, history, step, generator, logs):
        exits = self._exit_steps(x0, history, generator)
        x0_gen = self._rollout(batch, x0, history, generator, exits).x0
        b = x0_gen.shape[0]
        t, sigma = sample_generator_t(b, step, self.cfg.stage.dmd, self._mu(x0_gen), generator)
        t, s = t.to(self.device).float(), sigma.to(self.device).float().view(-1, 1, 1, 1, 1)
        eps = torch.randn(x0_gen.shape, generator=generator).to(self.device)
        x_t = (1 - s) * x0_gen.detach() + s * eps
        with torch.no_grad():
            fake = x_t - s * self._velocity(self.critic, x0, history, batch["prompt_embeds"])(x_t, t)
            self.critic.disable_adapters()  # teacher = the same base without the critic LoRA
            try:
                cond = x_t - s * self._velocity(self.critic, x0, history, batch["prompt_embeds"])(x_t, t)
                neg = x_t - s * self._velocity(self.critic, x0, history, self.negative.expand(b, -1, -1))(x_t, t)
            finally:
                self.critic.enable_adapters()
            real = cond + self.cfg.stage.dmd.real_guidance_scale * (cond - neg)
            grad = dmd_gradient(x0_gen.detach(), fake, real)
        logs.update({"dmd_gradient_norm": float(grad.abs().mean()), "t_mean": float(t.mean()),
                     "exit_steps": float(sum(exits))})
        return dmd_loss(x0_gen, grad), logs

    def _critic_loss(self, batch, x0, history, generator, logs):
        with torch.no_grad():
            x0_gen = self._rollout(batch, x0, history, generator, None).x0
        b = x0_gen.shape[0]
        t, sigma = sample_critic_t(b, self.cfg.stage.dmd, self._mu(x0_gen), generator)
        t, s = t.to(self.device).float(), sigma.to(self.device).float().view(-1, 1, 1, 1, 1)
        eps = torch.randn(x0_gen.shape, generator=generator).to(self.device)
        x_t = (1 - s) * x0_gen + s * eps
        v = self._velocity(self.roles["critic"].model, x0, history, batch["prompt_embeds"])(x_t, t)
        return critic_flow_loss(v, eps, x0_gen), logs
