"""Few-step x0 pyramid sampler (Helios-Distilled), differentiable, for training-time rollouts.

The DMD generator step and ODE-pair capture need the distilled sampler inside the training graph,
which diffusers' HeliosPyramidPipeline (a no-grad inference loop) cannot give. This module is that
sampler, built on diffusers' own HeliosDMDScheduler tables (timesteps, shifted σ) and on
helios_train/algorithms/pyramid.py's float64 block noise; under no_grad it reproduces the pipeline
(tests/test_rollout.py). Per chunk (official
helios/utils/utils_helios_post.py, the stage-2 loop of the generator rollout; HeliosPyramidPipeline in
diffusers / official helios/diffusers_version/pipeline_helios_diffusers.py):

- start: ε at full resolution, bilinear ×½ twice with ×2 amplitude (the level-0 start point; pyramid.noise_pyramid);
- level k > 0: nearest ×2, then α·x + β·block_noise (its start point; pyramid.renoise_coefficients);
- each step: x̂0 = x_t − σ·v (float64); next x = (1 − σ_next)·x̂0 + σ_next·start_k — re-noised towards
  the level's own start point, no fresh noise; the last step of a level returns x̂0;
- linear dynamic shift per level: μ from the level's token count. `mu_from="level"` uses the level
  being denoised (native training/ODE code); `"previous"` reproduces the diffusers pipeline, which
  computes μ before the ×2 upsample (official pipeline_helios_diffusers.py stage2_sample).
- training: `exit_steps[k]` picks the step whose x̂0 ends level k; earlier steps run without grad,
  the exit step with grad, later steps are skipped.
- `sampler="training"` (default) is the official training rollout (helios/utils/utils_helios_post.py,
  the stage-2 loop of the generator rollout): the model gets the float timestep (998.53: int64 ones
  times the float t) and σ of t and of the next t are the nearest entries of the level's μ-shifted
  1000-entry table (`convert_flow_pred_to_x0` / `add_noise`, helios_train/algorithms/sigma_table.py).
  `sampler="pipeline"` is diffusers' HeliosPyramidPipeline: int64 timesteps (998) and the
  scheduler's exact σ — what inference runs (tests/test_rollout.py checks both).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from helios_train.algorithms.pyramid import noise_pyramid, renoise_coefficients, renoised_upsample
from helios_train.algorithms.sigma_table import level_table, nearest_sigma
from helios_train.algorithms.timesteps import calculate_mu, seq_len_for

# transformer_fn(latents [B,C,9,h,w], timestep [B]) -> velocity [B,C,9,h,w]; history/prompt are bound in.
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class RolloutResult:
    x0: torch.Tensor  # final clean chunk [B, C, 9, H, W]
    level_outputs: list[torch.Tensor]  # x̂0 that ended each level (level resolution)
    nfe: int


def rollout_forwards(scheduler, steps=(2, 2, 2), amplify_first_chunk: bool = False) -> int:
    """Transformer forwards of a full (no exit step) rollout: the scheduler's timesteps per level."""
    total = 0
    for k in range(scheduler.config.stages):
        scheduler.set_timesteps(steps[k], k, mu=calculate_mu(1024), is_amplify_first_chunk=amplify_first_chunk)
        total += len(scheduler.timesteps)
    return total


def pyramid_rollout(velocity: VelocityFn, noise: torch.Tensor, scheduler, steps=(2, 2, 2),
                    amplify_first_chunk: bool = False, generator: Optional[torch.Generator] = None,
                    mu_from: str = "level", exit_steps: Optional[list[int]] = None,
                    sampler: str = "training", patch=(1, 2, 2),
                    lockstep: Optional[list[int]] = None) -> RolloutResult:
    """Run the x0 pyramid sampler on one chunk. `generator` draws the block noise between levels.

    `lockstep` (training under ZeRO-3, helios_train/backends/lockstep.py): per level, the number of no-grad
    forwards every rank runs before its exit forward (the max of the exit steps over ranks). This rank
    pads with discarded no-grad forwards up to it, gives every exit forward an input that requires grad
    and ties every level's exit output to the result with weight 0, so all ranks run the same sequence
    of forwards and backward passes. Values and gradients are unchanged."""
    if mu_from not in ("level", "previous"):
        raise ValueError(f"mu_from={mu_from!r}: expected level | previous")
    if sampler not in ("training", "pipeline"):
        raise ValueError(f"sampler={sampler!r}: expected training | pipeline")
    n_stages = scheduler.config.stages
    latents = noise_pyramid(noise.float(), n_stages)[0]  # the level-0 start point
    start = latents
    outputs, nfe = [], 0
    for k in range(n_stages):
        prev_tokens = seq_len_for(latents.shape, patch)
        if k > 0:
            gamma = scheduler.config.gamma
            latents = renoised_upsample(latents, *renoise_coefficients(float(scheduler.ori_start_sigmas[k]), gamma),
                                        gamma, generator)
            start = latents
        tokens = seq_len_for(latents.shape, patch)
        mu = calculate_mu(tokens if mu_from == "level" else prev_tokens)
        scheduler.set_timesteps(steps[k], k, device=latents.device, mu=mu, is_amplify_first_chunk=amplify_first_chunk)
        timesteps = scheduler.timesteps
        if sampler == "training":
            sigmas = nearest_sigma(timesteps.cpu(), *level_table(scheduler, k, mu)).tolist()
            model_t = timesteps.float()
        else:
            sigmas = scheduler.sigmas.double().tolist()
            model_t = timesteps.to(torch.int64)
        last = len(timesteps) - 1 if exit_steps is None else exit_steps[k]
        if lockstep is not None:
            with torch.no_grad():
                for _ in range(lockstep[k] - last):  # discarded: only the forward count matters
                    velocity(latents, model_t[0].expand(latents.shape[0]))
        for i in range(last + 1):
            grad = contextlib.nullcontext() if (exit_steps is None or i == last) else torch.no_grad()
            with grad:
                t = model_t[i].expand(latents.shape[0])
                if lockstep is not None and i == last and not latents.requires_grad:
                    latents = latents.detach().requires_grad_()  # same backward modules on every rank
                v = velocity(latents, t)
                nfe += 1
                x0 = (latents.double() - sigmas[i] * v.double()).float()
                if i < last:
                    latents = ((1 - sigmas[i + 1]) * x0.double() + sigmas[i + 1] * start.double()).float()
                else:
                    latents = x0
        outputs.append(latents)
    if lockstep is not None:  # every level's exit forward is backpropagated on every rank
        latents = latents + sum(0.0 * o.sum() for o in outputs[:-1])
    return RolloutResult(latents, outputs, nfe)
