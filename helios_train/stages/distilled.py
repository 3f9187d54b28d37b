"""Stage 3 (Helios-Distilled): ODE regression, then DMD with a critic/teacher sharing one base (official
stage_3_ode.yaml / stage_3_post*.yaml, helios/utils/utils_helios_post.py).

`stage.objective=ode` (official stage_3_ode): the generator alone regresses teacher ODE pairs onto
each pyramid level's end state (helios_train/algorithms/ode_regression.py, data=ode_pairs); no critic is built.
`stage.objective=dmd` (stage_3_post):

Roles (data, not branches in the trainer):
- generator: the student (model.path: the ODE / Mid export) + LoRA; rolls out one chunk with the
  few-step x0 pyramid sampler (helios_train/algorithms/rollout.py), random exit step per level;
- critic: the real-score base (stage.dmd.real_score_path: a Base export) + its own LoRA (B = 0, so it
  equals the teacher at init); the teacher is the same module with adapters disabled — one 14B copy.
Phases: every step the critic takes a flow-matching step on generator samples; on steps with
step % update_ratio == 0 the generator's DMD step runs first (5:1 critic:generator). History is the
real, corrupted ground-truth history of the batch (task dropout + anti-drift incl. saturation).

Hierarchical GAN (`stage.gan`, official stage_3_post_gan_version, helios_train/algorithms/gan.py): discriminator
heads on the critic's noisy-token hidden states (blocks scaled from 5/15/25/35 of 40) + its output;
from `stage.gan.start_step` the critic adds L_D + approximate R1 on [fake, real, real + σ·N] and the
generator adds L_G (only ∂L_G/∂x flows back, the critic keeps no graph).

EMA of the generator's trainables (`stage.ema`, official decay 0.99 from step 750; 1/N per rank with
`stage.ema.sharded`, helios_train/training/ema_shards.py) is kept with the checkpoints (`generator.ema.safetensors`);
`python -m helios_train.sampling.export --ema` exports it.

Low VRAM (`stage.dmd.low_vram`, official dmd_is_low_vram_mode, helios_train/model/low_vram.py): the frozen base
not in use is offloaded — generator for the rollouts and the generator backward, critic for the scores,
L_G and the critic loss — so one 14B base is on the GPU at a time (not under ZeRO-3, which shards them).
"""
from __future__ import annotations

import os

import torch
from omegaconf import OmegaConf

from helios_train.algorithms.dmd import critic_flow_loss, dmd_gradient, dmd_loss, sample_critic_t, sample_generator_t
from helios_train.algorithms.ema import EMA
from helios_train.training.ema_shards import layout_for
from helios_train.algorithms.gan import (approximate_r1, attach_gan_heads, critic_gan_logits, discriminator_gan_loss, gan_active,
                              generator_gan_loss, input_gradient_loss, perturb, random_spatial_crop, unwrap)
from helios_train.algorithms.history import model_inputs, token_counts
from helios_train.backends.lockstep import max_over_ranks, pad_forwards, params_sharded
from helios_train.model.low_vram import FrozenBaseResidency
from helios_train.model.loading import encode_text, load_transformer
from helios_train.model.trainables import apply_trainable_policy
from helios_train.algorithms.ode_regression import ode_regression_loss
from helios_train.algorithms.rollout import calculate_mu, pyramid_rollout, rollout_forwards
from helios_train.runtime.seeding import shared_generator
from helios_train.stages import RoleSpec
from helios_train.stages.base import BaseStage
from helios_train.algorithms.timesteps import seq_len_for
from helios_train.sampling.variants import NEGATIVE_PROMPT, make_scheduler


def critic_section(batch: dict) -> dict:
    """The critic step's view of a batch: the video's secondary section when the loader gives one
    (`data.secondary_section`, official), else the same section as the generator. The primary target
    stays available as `primary_target` (official GAN real-sample pairing)."""
    if "secondary_target" not in batch:
        return {**batch, "primary_target": batch["target"]}
    return {**batch, "x0": batch["secondary_x0"], "history": batch["secondary_history"],
            "target": batch["secondary_target"], "primary_target": batch["target"]}


class DistilledStage(BaseStage):
    name = "distilled"

    def __init__(self, cfg, device: torch.device):
        super().__init__(cfg, device)  # the generator: student + LoRA (stage.trainables)
        self.objective = cfg.stage.objective
        self.scheduler = make_scheduler("distilled")
        self.sharded = params_sharded(cfg)  # ZeRO-3: every rank must run the same number of forwards
        self.ema = None  # built in `bind`, once the backend has wrapped (ZeRO-3: partitioned) the generator
        self.residency = None  # stage.dmd.low_vram: one frozen base on the device at a time
        self._rollout_kinds: list[str] = []  # this step's rollouts: "a" amplified first-chunk sampler, "n" normal
        if self.objective == "dmd":
            self._build_critic(cfg, device)

    def _build_critic(self, cfg, device) -> None:
        """Teacher + critic: one real-score base (a Base export) with the critic's LoRA (official train_helios.py
        `real_score_model` + the critic LoRA)."""
        d = cfg.stage.dmd
        if not d.real_score_path:
            raise ValueError("stage.dmd.real_score_path: give the teacher (Helios-Base export) folder")
        real_cfg = OmegaConf.merge(cfg.model, {"path": d.real_score_path, "transformer_path": None})
        self.critic = load_transformer(real_cfg, cfg.stage.trainables)
        critic_policy = OmegaConf.merge(cfg.stage.trainables, {"lora": {"rank": d.critic_lora_rank},
                                                                "patch_embedding": "frozen", "memory_patches": "frozen"})
        apply_trainable_policy(self.critic, critic_policy)
        if cfg.stage.gan.enabled:
            # After the trainable policy (which freezes everything and LoRA-wraps every Linear) and
            # before the optimizer: the heads are plain trainable modules of the critic, so its
            # optimizer, DDP/DeepSpeed engine and checkpoint pick them up by name from step 0.
            attach_gan_heads(self.critic, cfg.stage.gan)
        if d.low_vram and self.sharded and int(os.environ.get("RANK", "0")) == 0:
            print("[helios-train] stage.dmd.low_vram=true is not used under ZeRO-3: every base is already "
                  "partitioned 1/N per GPU (set stage.dmd.low_vram=false to silence this)", flush=True)
        if d.low_vram and not self.sharded:
            # Registered while the critic is still on the CPU, so its frozen base never reaches the device
            # at setup; the generator's (already there) is copied to pinned host memory once.
            self.residency = FrozenBaseResidency({"generator": self.transformer, "critic": self.critic}, device)
        self.critic.to(device)  # trainables and buffers (and, without low_vram, the frozen base)
        if self.residency is not None:
            self.residency.use("generator")
            self.residency.take_onloaded_bytes()  # setup traffic is not a step's
        self.negative = encode_text(cfg.model, [NEGATIVE_PROMPT], device)  # the teacher's guidance

    def bind(self, prepared: dict) -> None:
        super().bind(prepared)
        if self.cfg.stage.ema.enabled:
            self.ema = EMA(self.transformer, self.cfg.stage.ema, layout_for(self.cfg, zero3=self.sharded))

    def _use(self, role: str) -> None:
        """stage.dmd.low_vram: make `role`'s frozen base the resident one (no-op otherwise)."""
        if self.residency is not None:
            self.residency.use(role)

    # -- EMA of the generator (official use_ema, ema_start_step) --------------------------------------
    def after_step(self, step: int, updated: list[str]) -> dict:
        # The generator's base is what comes next (the next rollout, validation, export), so it is made
        # resident here: this costs no extra copy, since every step starts with a rollout.
        self._use("generator")
        logs = {}
        if self.residency is not None:
            logs["low_vram/onloaded_gb"] = self.residency.take_onloaded_bytes() / 1e9
        # Official: EMA steps on every step before its start, then only on generator-update steps.
        if self.ema is not None and ("generator" in updated or step <= self.cfg.stage.ema.update_after_step):
            logs["ema_decay"] = self.ema.update(self.transformer, step + 1)
        return logs

    def save_extra(self, directory, is_main: bool) -> None:
        if self.ema is not None:
            state = self.ema.state_dict()  # collective when the EMA is sharded: every rank calls it
            if is_main:
                from safetensors.torch import save_file

                save_file(state, str(directory / "generator.ema.safetensors"))

    def load_extra(self, directory) -> None:
        if self.ema is not None:
            from safetensors.torch import load_file

            self.ema.load_state_dict(load_file(str(directory / "generator.ema.safetensors")))

    def before_optimizer_step(self, role: str, step: int) -> None:
        g = self.cfg.stage.gan
        if role != "critic" or not g.enabled or gan_active(g, step) or not g.idle_head_updates:
            return
        if self.cfg.launcher.name == "deepspeed":
            return  # ZeRO already holds zero gradients for parameters the backward did not reach
        # Official (stage.gan.idle_head_updates): idle heads step on zero gradients, as under DeepSpeed,
        # so every backend trains them identically (tests/test_distilled_stage.py, ZeRO-3 vs DDP).
        for p in unwrap(self.critic).gan_heads.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def role_specs(self) -> dict[str, RoleSpec]:
        d, o = self.cfg.stage.dmd, self.cfg.trainer.optim
        critic_optim = OmegaConf.merge(o, {"lr": d.critic_lr, "betas": list(d.critic_betas),
                                           "weight_decay": d.critic_weight_decay})
        generator = RoleSpec(self.transformer, o, multi_forward=True)  # several forwards per loss
        if self.objective == "ode":
            return {"generator": generator}
        if d.generator_schedule == "own_updates":  # else "official": one schedule step per update, max_steps long
            generator.update_every = d.update_ratio
        # With the GAN the critic loss runs two forwards with grad (denoising, then the GAN batch).
        critic = RoleSpec(self.critic, critic_optim, multi_forward=self.cfg.stage.gan.enabled)
        return {"generator": generator, "critic": critic}

    def phases(self, step: int) -> list[str]:
        if self.objective == "ode":
            return ["generator"]
        return ["generator", "critic"] if step % self.cfg.stage.dmd.update_ratio == 0 else ["critic"]

    def work_key(self, step: int) -> str:
        self._rollout_kinds = []
        if self.objective == "ode":
            return ""
        phases = self.phases(step)
        key = "+".join(phases) + f" gan={int(gan_active(self.cfg.stage.gan, step))}"
        if "generator" in phases:  # the generator's rollout stops at its exit step of each level
            key += " u=" + ",".join(f"{u:.6f}" for u in self._exit_draws(step))
        return key

    def work_variant(self) -> str:
        return "".join(self._rollout_kinds)

    # -- model calls -----------------------------------------------------------------------------
    def _velocity(self, model, x0, history, embeds):
        def fn(x, t):
            with self.autocast():
                inputs = model_inputs(x, x0, history, t, embeds, self.cfg.stage.history)
                return model(**inputs, return_dict=False)[0].float()
        return fn

    def _amplified(self, x0, history) -> bool:
        """The amplified first-chunk sampler (4 steps per level) when the whole batch has no history and no
        anchor after task dropout and corruption — the official rule (utils_helios_post.py, the generator
        rollout: `is_amplify_first_chunk` and every history tensor, the x0 prefix included, sums to 0), one
        decision per batch. Ours tests |·| sums, so a nonzero history summing to exactly 0 is not mistaken."""
        return self.cfg.stage.dmd.amplify_first_chunk and bool((x0.abs().sum() == 0) and (history.abs().sum() == 0))

    def _rollout(self, batch, x0, history, generator, exit_steps):
        d = self.cfg.stage.dmd
        noise = torch.randn(batch["target"].shape, generator=generator).to(self.device)
        model = self.roles["generator"].model if exit_steps is not None else self.roles["generator"].module
        velocity = self._velocity(model, x0, history, batch["prompt_embeds"])
        amplified = self._amplified(x0, history)
        self._rollout_kinds.append("a" if amplified else "n")
        # ZeRO-3: every rank must run the same forward/backward sequence (helios_train/backends/lockstep.py). The
        # counts are agreed BEFORE the first forward: the forwards' own parameter gathers are collectives,
        # so a rank still sampling would pair its gather with the others' count exchange and hang.
        lockstep = max_over_ranks(exit_steps, self.device) if (self.sharded and exit_steps is not None) else None
        target = None
        if self.sharded and exit_steps is None:
            planned = rollout_forwards(self.scheduler, d.rollout_steps, amplified)
            target = max_over_ranks([planned], self.device)[0]
        result = pyramid_rollout(velocity, noise, self.scheduler, d.rollout_steps, amplified,
                                 generator, "level", exit_steps, lockstep=lockstep)
        if target is not None:
            t0 = torch.zeros(noise.shape[0], dtype=torch.int64, device=self.device)
            pad_forwards(result.nfe, lambda: velocity(result.x0, t0), target)
        return result

    def _exit_steps(self, step: int, amplified: bool) -> list[int]:
        """One exit step per pyramid level, uniform in [0, steps of the level).

        Official: the same on every rank (`generate_and_sync_flag`, utils_helios_post.py), except for the
        amplified first chunk under ground-truth history, which the official code draws per rank
        (is_sync=False). Ours is drawn from (seed, step) only, so it is also the same for every accumulated
        micro-batch — 2 ranks × 1 micro-batch still train exactly like
        1 rank × 2 — and a rank with the amplified first-chunk sampler (twice the steps per level)
        maps the same uniform draw onto its longer level."""
        u = self._exit_draws(step)
        return [int(u_k * n * (2 if amplified else 1)) for u_k, n in zip(u, self.cfg.stage.dmd.rollout_steps)]

    def _exit_draws(self, step: int) -> list[float]:
        return torch.rand(len(self.cfg.stage.dmd.rollout_steps),
                          generator=shared_generator(self.cfg.trainer.seed, step, "dmd-exit-steps")).tolist()

    def _mu(self, target) -> float:
        return calculate_mu(seq_len_for(target.shape))

    # -- losses ----------------------------------------------------------------------------------
    def loss(self, role: str, batch: dict, step: int, generator: torch.Generator):
        if self.objective == "ode":
            return self._ode_loss(batch, generator)
        if role == "critic":
            batch = critic_section(batch)
        x0, history, logs = self.condition(batch, generator)
        return self._generator_loss(batch, x0, history, step, generator, logs) if role == "generator" \
            else self._critic_loss(batch, x0, history, step, generator, logs)

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
        amplified = self._amplified(x0, history)
        exits = self._exit_steps(step, amplified)
        self._use("generator")
        x0_gen = self._rollout(batch, x0, history, generator, exits).x0
        self._use("critic")  # teacher and critic scores (+ L_G): the generator's graph stays, its base goes
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
                     "exit_steps": float(sum(exits)), "amplified_share": float(amplified)})
        loss = dmd_loss(x0_gen, grad)
        if gan_active(self.cfg.stage.gan, step):
            loss = loss + self._gan_generator_loss(batch, x0_gen, x0, history, t, s, generator, logs)
        self._use("generator")  # the backward recomputes the generator's checkpointed blocks
        return loss, logs

    # -- hierarchical GAN (official _generator_loss / _critic_loss; stage.gan, from its start step) ---
    def _gan_call(self, model, x0, history, embeds, t, copies: int):
        """call(x) → one critic forward on x with the history/prompt/t repeated for `copies` stacked inputs."""
        rep = lambda z: None if z is None else z.repeat(copies, *([1] * (z.dim() - 1)))  # noqa: E731

        def call(x):
            with self.autocast():
                inputs = model_inputs(x, rep(x0), rep(history), rep(t), rep(embeds), self.cfg.stage.history)
                return model(**inputs, return_dict=False)
        return call

    def _gan_crop(self, tensors, generator):
        """One random spatial box (a multiple of the patch) for every tensor; None (no x0 anchor) passes through."""
        patch = self.critic.config.patch_size[1]
        present = [x for x in tensors if x is not None]
        cropped = iter(random_spatial_crop(present, self.cfg.stage.gan.crop_fraction, generator, multiple=patch))
        return [None if x is None else next(cropped) for x in tensors]

    def _gan_generator_loss(self, batch, x0_gen, x0, history, t, s, generator, logs):
        """L_G: the generator's sample re-noised at the same t with fresh noise, cropped, scored by the critic
        (adapters on). Only ∂L_G/∂x reaches the generator; the critic's parameters get no gradient."""
        g = self.cfg.stage.gan
        eps = torch.randn(x0_gen.shape, generator=generator).to(self.device)
        x_gan = (1 - s) * x0_gen + s * eps
        x_gan, hist_c, x0_c = self._gan_crop([x_gan, history, x0], generator)
        call = self._gan_call(self.critic, x0_c, hist_c, batch["prompt_embeds"], t, 1)
        loss = input_gradient_loss(lambda z: generator_gan_loss(critic_gan_logits(self.critic, None, call, z), g), x_gan)
        logs["gan/g_loss"] = float(loss.detach())
        return loss

    def _gan_discriminator_loss(self, batch, x_t, x0, history, t, s, eps, generator, logs):
        """L_D + approximate R1 on one batched critic forward of [fake, real, real + σ_R1·N] (same t, noise, crop).
        Real = the critic section's ground-truth chunk noised like the fake (stage.gan.real_from_primary: the
        generator section's chunk, official)."""
        g = self.cfg.stage.gan
        real = batch["primary_target"] if g.real_from_primary else batch["target"]
        real_t = (1 - s) * real.to(self.device) + s * eps
        fake_c, real_c, hist_c, x0_c = self._gan_crop([x_t, real_t, history, x0], generator)
        perturbed = perturb(real_c, g.r1_sigma, generator)
        call = self._gan_call(self.roles["critic"].model, x0_c, hist_c, batch["prompt_embeds"], t, 3)
        logits = critic_gan_logits(self.critic, None, call, torch.cat([fake_c, real_c, perturbed]))
        lf, lr, lp = logits.chunk(3)
        d_loss, r1 = discriminator_gan_loss(lf, lr, g), approximate_r1(lr, lp, g)
        logs.update({"gan/d_loss": float(d_loss.detach()), "gan/r1": float(r1.detach()),
                     "gan/logit_fake": float(lf.detach().mean()), "gan/logit_real": float(lr.detach().mean())})
        return d_loss + r1

    def _critic_loss(self, batch, x0, history, step, generator, logs):
        self._use("generator")
        with torch.no_grad():
            x0_gen = self._rollout(batch, x0, history, generator, None).x0
        self._use("critic")  # the critic's loss and backward
        b = x0_gen.shape[0]
        t, sigma = sample_critic_t(b, self.cfg.stage.dmd, self._mu(x0_gen), generator)
        t, s = t.to(self.device).float(), sigma.to(self.device).float().view(-1, 1, 1, 1, 1)
        eps = torch.randn(x0_gen.shape, generator=generator).to(self.device)
        x_t = (1 - s) * x0_gen + s * eps
        v = self._velocity(self.roles["critic"].model, x0, history, batch["prompt_embeds"])(x_t, t)
        loss = critic_flow_loss(v, eps, x0_gen)
        logs["gan/active"] = float(gan_active(self.cfg.stage.gan, step))
        if gan_active(self.cfg.stage.gan, step):
            # One critic step for denoise + GAN + R1 (gradients summed). Official DeepSpeed runs stepped twice.
            loss = loss + self._gan_discriminator_loss(batch, x_t, x0, history, t, s, eps, generator, logs)
        return loss, logs
