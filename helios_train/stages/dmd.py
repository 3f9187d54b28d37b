"""Stage 3, DMD (`stage=distilled stage.objective=dmd`; official stage_3_post*.yaml, helios/utils/utils_helios_post.py).

Roles (data, not branches in the trainer):
- generator: the student (model.path: the ODE / Mid export) + LoRA; rolls out one chunk with the few-step
  x0 pyramid sampler (helios_train/algorithms/rollout.py), random exit step per level;
- critic: the real-score base (stage.dmd.real_score_path: a Base export) + its own LoRA (B = 0, so it equals
  the teacher at init);
- teacher: frozen, the critic's module with its adapters disabled — one 14B copy for both.
Phases: every step the critic takes a flow-matching step on generator samples; on steps with
step % update_ratio == 0 the generator's DMD step runs first (5:1 critic:generator). History is the real,
corrupted ground-truth history of the batch (task dropout + anti-drift incl. saturation).

Hierarchical GAN (`stage.gan`, official stage_3_post_gan_version): helios_train/stages/dmd_gan.py.
EMA of the generator (`stage.ema`): a callback (helios_train/training/callbacks/ema.py).
Low VRAM (`stage.dmd.low_vram`, official dmd_is_low_vram_mode, helios_train/model/low_vram.py): the frozen base
not in use is offloaded — generator for the rollouts and the generator backward, critic for the scores, L_G and
the critic loss — so one 14B base is on the GPU at a time (not where the backend shards the bases).
Under sharded parameters (ZeRO-3) every rank must run the same forwards: the distribution's `lockstep`
(helios_train/backends/lockstep.py) agrees on the counts.
"""
from __future__ import annotations

import os

import torch
from omegaconf import OmegaConf

from helios_train.algorithms.dmd import critic_flow_loss, dmd_gradient, dmd_loss, sample_critic_t, sample_generator_t
from helios_train.algorithms.gan import gan_active
from helios_train.algorithms.rollout import pyramid_rollout, rollout_forwards
from helios_train.algorithms.timesteps import calculate_mu
from helios_train.model.gan_taps import attach_gan_heads
from helios_train.model.loading import encode_text
from helios_train.model.low_vram import FrozenBaseResidency
from helios_train.model.variants import NEGATIVE_PROMPT, make_scheduler
from helios_train.runtime.callbacks import Callback
from helios_train.runtime.roles import Calls, RoleSpec
from helios_train.runtime.seeding import shared_generator
from helios_train.stages.base import ConditionedStage
from helios_train.stages.dmd_gan import HierarchicalGan


def critic_section(batch: dict) -> dict:
    """The critic step's view of a batch: the video's secondary section when the loader gives one
    (`data.secondary_section`, official), else the same section as the generator. The primary target
    stays available as `primary_target` (official GAN real-sample pairing)."""
    if "secondary_target" not in batch:
        return {**batch, "primary_target": batch["target"]}
    return {**batch, "x0": batch["secondary_x0"], "history": batch["secondary_history"],
            "target": batch["secondary_target"], "primary_target": batch["target"]}


class ResidencyCallback(Callback):
    """stage.dmd.low_vram: after each step the generator's base is made resident (the next rollout, validation
    and export use it: no extra copy, every step starts with a rollout), and the step's onloaded bytes logged."""

    def __init__(self, residency: FrozenBaseResidency):
        self.residency = residency

    def on_step_end(self, trainer, step: int, updated: list[str]) -> dict:
        self.residency.use("generator")
        return {"low_vram/onloaded_gb": self.residency.take_onloaded_bytes() / 1e9}


class DmdStage(HierarchicalGan, ConditionedStage):
    name = "distilled"

    def __init__(self, cfg, device: torch.device, distribution=None):
        super().__init__(cfg, device, distribution)  # the generator: student + LoRA (stage.trainables)
        self.scheduler = make_scheduler("distilled")
        self.residency = None  # stage.dmd.low_vram: one frozen base on the device at a time
        self._rollout_kinds: list[str] = []  # this step's rollouts: "a" amplified first-chunk sampler, "n" normal
        self._build_critic(cfg, device)

    def _build_critic(self, cfg, device) -> None:
        """Teacher + critic: one real-score base (a Base export) with the critic's LoRA (official train_helios.py
        `real_score_model` + the critic LoRA)."""
        d = cfg.stage.dmd
        if not d.real_score_path:
            raise ValueError("stage.dmd.real_score_path: give the teacher (Helios-Base export) folder")
        real_cfg = OmegaConf.merge(cfg.model, {"path": d.real_score_path, "transformer_path": None})
        self.critic = self.adapter.load(real_cfg, cfg.stage.trainables)
        critic_policy = OmegaConf.merge(cfg.stage.trainables, {"lora": {"rank": d.critic_lora_rank},
                                                                "patch_embedding": "frozen", "memory_patches": "frozen"})
        self.adapter.add_trainables(self.critic, critic_policy)
        if cfg.stage.gan.enabled:
            # After the trainable policy (which freezes everything and LoRA-wraps every Linear) and
            # before the optimizer: the heads are plain trainable modules of the critic, so its
            # optimizer, DDP/DeepSpeed engine and checkpoint pick them up by name from step 0.
            attach_gan_heads(self.critic, cfg.stage.gan)
        sharded = self.distribution.shards_parameters
        if d.low_vram and sharded and int(os.environ.get("RANK", "0")) == 0:
            print("[helios-train] stage.dmd.low_vram=true is not used under ZeRO-3: every base is already "
                  "partitioned 1/N per GPU (set stage.dmd.low_vram=false to silence this)", flush=True)
        if d.low_vram and not sharded:
            # Registered while the critic is still on the CPU, so its frozen base never reaches the device
            # at setup; the generator's (already there) is copied to pinned host memory once.
            self.residency = FrozenBaseResidency({"generator": self.transformer, "critic": self.critic}, device)
        self.critic.to(device)  # trainables and buffers (and, without low_vram, the frozen base)
        if self.residency is not None:
            self.residency.use("generator")
            self.residency.take_onloaded_bytes()  # setup traffic is not a step's
        self.negative = encode_text(cfg.model, [NEGATIVE_PROMPT], device)  # the teacher's guidance

    def role_specs(self) -> dict[str, RoleSpec]:
        d, o = self.cfg.stage.dmd, self.cfg.trainer.optim
        critic_optim = OmegaConf.merge(o, {"lr": d.critic_lr, "betas": list(d.critic_betas),
                                           "weight_decay": d.critic_weight_decay})
        generator = RoleSpec(self.transformer, o, calls=Calls.SEVERAL)  # several forwards per loss (the rollout)
        if d.generator_schedule == "own_updates":  # else "official": one schedule step per update, max_steps long
            generator.update_every = d.update_ratio
        # With the GAN the critic loss runs two forwards with grad (denoising, then the GAN batch).
        critic = RoleSpec(self.critic, critic_optim, calls=Calls.SEVERAL if self.cfg.stage.gan.enabled else Calls.ONCE)
        teacher = RoleSpec(self.critic, shares="critic", adapters=False)
        return {"generator": generator, "critic": critic, "teacher": teacher}

    def callbacks(self) -> list:
        return [ResidencyCallback(self.residency)] if self.residency is not None else []

    def _use(self, role: str) -> None:
        """stage.dmd.low_vram: make `role`'s frozen base the resident one (no-op otherwise)."""
        if self.residency is not None:
            self.residency.use(role)

    def phases(self, step: int) -> list[str]:
        return ["generator", "critic"] if step % self.cfg.stage.dmd.update_ratio == 0 else ["critic"]

    def work_key(self, step: int) -> str:
        self._rollout_kinds = []
        phases = self.phases(step)
        key = "+".join(phases) + f" gan={int(gan_active(self.cfg.stage.gan, step))}"
        if "generator" in phases:  # the generator's rollout stops at its exit step of each level
            key += " u=" + ",".join(f"{u:.6f}" for u in self._exit_draws(step))
        return key

    def work_variant(self) -> str:
        return "".join(self._rollout_kinds)

    def before_optimizer_step(self, role: str, step: int) -> None:
        g = self.cfg.stage.gan
        if role == "critic" and g.enabled and not gan_active(g, step) and g.idle_head_updates:
            # Official (stage.gan.idle_head_updates): idle heads step on zero gradients, as under DeepSpeed,
            # so every backend trains them identically (tests/test_distilled_stage.py, ZeRO-3 vs DDP).
            self.distribution.zero_untouched_gradients(self.gan_heads().parameters())

    # -- the generator's rollout --------------------------------------------------------------------
    def _amplified(self, x0, history) -> bool:
        """The amplified first-chunk sampler (4 steps per level) when the whole batch has no history and no
        anchor after task dropout and corruption — the official rule (utils_helios_post.py, the generator
        rollout: `is_amplify_first_chunk` and every history tensor, the x0 prefix included, sums to 0), one
        decision per batch. Ours tests |·| sums, so a nonzero history summing to exactly 0 is not mistaken."""
        return self.cfg.stage.dmd.amplify_first_chunk and bool((x0.abs().sum() == 0) and (history.abs().sum() == 0))

    def _rollout(self, batch, x0, history, generator, exit_steps):
        d, lockstep = self.cfg.stage.dmd, self.distribution.lockstep
        noise = torch.randn(batch["target"].shape, generator=generator).to(self.device)
        model = self.roles["generator"].model if exit_steps is not None else self.roles["generator"].module
        velocity = self.velocity(model, x0, history, batch["prompt_embeds"])
        amplified = self._amplified(x0, history)
        self._rollout_kinds.append("a" if amplified else "n")
        # Sharded parameters: every rank must run the same forward/backward sequence. The counts are agreed
        # BEFORE the first forward: the forwards' own parameter gathers are collectives, so a rank still
        # sampling would pair its gather with the others' count exchange and hang.
        agreed = lockstep.agree(exit_steps) if (lockstep is not None and exit_steps is not None) else None
        target = None
        if lockstep is not None and exit_steps is None:
            target = lockstep.agree([rollout_forwards(self.scheduler, d.rollout_steps, amplified)])[0]
        result = pyramid_rollout(velocity, noise, self.scheduler, d.rollout_steps, amplified, generator, "level",
                                 exit_steps, patch=self.adapter.patch_size(self.transformer), lockstep=agreed)
        if target is not None:
            t0 = torch.zeros(noise.shape[0], dtype=torch.int64, device=self.device)
            lockstep.pad(result.nfe, lambda: velocity(result.x0, t0), target)
        return result

    def _exit_steps(self, step: int, amplified: bool) -> list[int]:
        """One exit step per pyramid level, uniform in [0, steps of the level).

        Official: the same on every rank (`generate_and_sync_flag`, utils_helios_post.py), except for the
        amplified first chunk under ground-truth history, which the official code draws per rank
        (is_sync=False). Ours is drawn from (seed, step) only, so it is also the same for every accumulated
        micro-batch — 2 ranks × 1 micro-batch still train exactly like 1 rank × 2 — and a rank with the
        amplified first-chunk sampler (twice the steps per level) maps the same uniform draw onto its
        longer level."""
        u = self._exit_draws(step)
        return [int(u_k * n * (2 if amplified else 1)) for u_k, n in zip(u, self.cfg.stage.dmd.rollout_steps)]

    def _exit_draws(self, step: int) -> list[float]:
        return torch.rand(len(self.cfg.stage.dmd.rollout_steps),
                          generator=shared_generator(self.cfg.trainer.seed, step, "dmd-exit-steps")).tolist()

    def _mu(self, target) -> float:
        return calculate_mu(self.adapter.seq_len(self.transformer, target.shape))

    # -- losses ----------------------------------------------------------------------------------
    def loss(self, role: str, batch: dict, step: int, generator: torch.Generator):
        if role == "critic":
            batch = critic_section(batch)
        x0, history, logs = self.condition(batch, generator)
        return self._generator_loss(batch, x0, history, step, generator, logs) if role == "generator" \
            else self._critic_loss(batch, x0, history, step, generator, logs)

    def _scores(self, x_t, t, s, x0, history, embeds):
        """x0 of the critic (fake score) and of the guided teacher (real score) at x_t (no grad)."""
        b = x_t.shape[0]
        fake = x_t - s * self.velocity(self.critic, x0, history, embeds)(x_t, t)
        with self.roles["teacher"].active() as teacher:  # the critic's base with its adapters off
            cond = x_t - s * self.velocity(teacher, x0, history, embeds)(x_t, t)
            neg = x_t - s * self.velocity(teacher, x0, history, self.negative.expand(b, -1, -1))(x_t, t)
        return fake, cond + self.cfg.stage.dmd.real_guidance_scale * (cond - neg)

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
            fake, real = self._scores(x_t, t, s, x0, history, batch["prompt_embeds"])
            grad = dmd_gradient(x0_gen.detach(), fake, real)
        logs.update({"dmd_gradient_norm": float(grad.abs().mean()), "t_mean": float(t.mean()),
                     "exit_steps": float(sum(exits)), "amplified_share": float(amplified)})
        loss = dmd_loss(x0_gen, grad)
        if gan_active(self.cfg.stage.gan, step):
            loss = loss + self._gan_generator_loss(batch, x0_gen, x0, history, t, s, generator, logs)
        self._use("generator")  # the backward recomputes the generator's checkpointed blocks
        return loss, logs

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
        v = self.velocity(self.roles["critic"].model, x0, history, batch["prompt_embeds"])(x_t, t)
        loss = critic_flow_loss(v, eps, x0_gen)
        logs["gan/active"] = float(gan_active(self.cfg.stage.gan, step))
        if gan_active(self.cfg.stage.gan, step):
            # One critic step for denoise + GAN + R1 (gradients summed). Official DeepSpeed runs stepped twice.
            loss = loss + self._gan_discriminator_loss(batch, x_t, x0, history, t, s, eps, generator, logs)
        return loss, logs
