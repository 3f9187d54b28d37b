"""ODE pairs: the Mid teacher's trajectories, recorded at the distilled sampler's timesteps (official
tools/offload_data/get_ode-pairs.py, helios/pipelines/pipeline_helios_ode.py).

The Distilled stage starts with an ODE-regression phase (official `_ode_regression_loss`): the student
learns to jump from a state of the *teacher's* [20, 20, 20] CFG trajectory straight to the end of that
pyramid level. For
that the teacher must pass exactly through the student's timesteps (998.5/834.0, 742.8/547.2,
385.4/254.0; four per level for the amplified first chunk). The official ODE pipeline inserts those
timesteps into each level's schedule before shifting; we do the same with a scheduler subclass that
diffusers' own `HeliosPyramidPipeline` drives — no second teacher sampler:

- `set_timesteps` (called once per level per chunk) merges the student's σ's (from a
  `HeliosDMDScheduler` with the same stage table and the same μ) into the teacher's 20 UniPC σ's.
  Both are shifted with the same μ and the shift is monotone, so merging after the shift is the
  same as inserting before it. UniPC handles the uneven step sizes.
- `step` keeps the states x_t (the sampler input at each step) of the current level and, after the
  level's last step, its end state; the states nearest the student's timesteps are kept, the rest
  dropped (memory: a 14B level has 20+ states of 2.2 MB each).
- μ: the pipeline computes the linear shift from the *previous* level's token count (official
  pipeline_helios_diffusers.py stage2_sample, as diffusers); the native ODE code uses the level being
  denoised, which is what gives the quoted timesteps. `mu_from="level"` (default) corrects the pipeline's μ to the level's, `"previous"`
  keeps the pipeline's.

Recorded per chunk c and level k: `latents` [n+1, B, C, 9, h_k, w_k] (n states, then the level's end
state) and `timesteps` [n] — the official `ode_latents` layout.
"""
from __future__ import annotations

import torch
from diffusers import HeliosDMDScheduler, HeliosScheduler

from helios_train.algorithms.sigma_table import PYRAMID
from helios_train.algorithms.timesteps import calculate_mu

# calculate_mu is linear in the token count: mu = m·seq + b
_MU_SLOPE = calculate_mu(1) - calculate_mu(0)
_MU_OFFSET = calculate_mu(0)


class LevelMu:
    """Correct the μ that HeliosPyramidPipeline passes to `set_timesteps` (computed from the previous
    level's token count) to the level's own, as the native Helios code does."""

    mu_from = "level"

    def _level_mu(self, mu: float, stage_index: int) -> float:
        if self.mu_from == "previous" or stage_index == 0:
            return mu
        previous_tokens = (mu - _MU_OFFSET) / _MU_SLOPE
        return calculate_mu(round(previous_tokens) * 4)  # ×2 in height and width


class LevelMuDMDScheduler(LevelMu, HeliosDMDScheduler):
    """The distilled sampler's scheduler with the native per-level μ: the timesteps the ODE pairs and the
    DMD rollout (helios_train/algorithms/rollout.py, mu_from="level") train the student on."""

    def set_timesteps(self, num_inference_steps, stage_index=None, device=None, sigmas=None, mu=None,
                      is_amplify_first_chunk=False):
        super().set_timesteps(num_inference_steps, stage_index, device=device, sigmas=sigmas,
                              mu=self._level_mu(mu, stage_index), is_amplify_first_chunk=is_amplify_first_chunk)


class TrajectoryRecorder(LevelMu, HeliosScheduler):
    """UniPC pyramid scheduler (the Mid teacher's) that passes through, and records, the student's timesteps."""

    def configure(self, student_steps=(2, 2, 2), amplify_first_chunk: bool = True, mu_from: str = "level"):
        if mu_from not in ("level", "previous"):
            raise ValueError(f"mu_from={mu_from!r}: expected level | previous")
        if len(student_steps) != self.config.stages:
            raise ValueError(f"student_steps {list(student_steps)}: need one count per pyramid level "
                             f"({self.config.stages})")
        self.student = HeliosDMDScheduler(**PYRAMID)
        self.student_steps = [int(n) for n in student_steps]
        self.amplify_first_chunk = amplify_first_chunk
        self.mu_from = mu_from
        self.chunks: list[list[dict]] = []  # per chunk, per level: {"latents", "timesteps"}
        self._level = None
        return self

    def set_timesteps(self, num_inference_steps, stage_index=None, device=None, sigmas=None, mu=None,
                      is_amplify_first_chunk=False):
        if stage_index == 0:
            self.chunks.append([])
        mu = self._level_mu(mu, stage_index)
        super().set_timesteps(num_inference_steps, stage_index, device=device, sigmas=sigmas, mu=mu)
        amplified = self.amplify_first_chunk and len(self.chunks) == 1
        self.student.set_timesteps(self.student_steps[stage_index], stage_index, device=device, mu=mu,
                                   is_amplify_first_chunk=amplified)
        stage_t = self.timesteps_per_stage[stage_index]
        if not torch.allclose(self.student.timesteps_per_stage[stage_index], stage_t):
            raise RuntimeError("teacher and student pyramid tables differ; check the scheduler configs")
        teacher = self.sigmas[:-1].double().cpu()
        targets = self.student.sigmas[:-1].double().cpu()
        extra = [s for s in targets if (teacher - s).abs().min() > 1e-6]
        merged = torch.sort(torch.cat([teacher, torch.stack(extra)]) if extra else teacher, descending=True).values
        lo, hi = stage_t.min().double(), stage_t.max().double()
        self.sigmas = torch.cat([merged, torch.zeros(1, dtype=merged.dtype)]).float().to(device)
        self.timesteps = (lo + merged * (hi - lo)).float().to(device)
        self.num_inference_steps = len(merged)
        self._level = {"targets": self.student.timesteps.float().cpu(), "states": [], "t": []}

    def step(self, model_output, timestep=None, sample=None, generator=None, return_dict=True, **kwargs):
        level = self._level
        level["states"].append(sample.detach().float().cpu().clone())
        level["t"].append(float(timestep))
        out = super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        if self.step_index == len(self.timesteps):  # the level's last step: keep what the student needs
            end = (out.prev_sample if return_dict else out[0]).detach().float().cpu()
            recorded = torch.tensor(level["t"])
            picks = [int((recorded - t).abs().argmin()) for t in level["targets"]]
            self.chunks[-1].append({
                "latents": torch.stack([level["states"][i] for i in picks] + [end]),
                "timesteps": recorded[picks].clone(),
            })
            self._level = None
        return out


def recording_scheduler(student_steps=(2, 2, 2), amplify_first_chunk: bool = True,
                        mu_from: str = "level") -> TrajectoryRecorder:
    """The ODE teacher's scheduler (official get_ode-pairs.py: UniPC, linear dynamic shift, pyramid table)."""
    return TrajectoryRecorder(scheduler_type="unipc", **PYRAMID).configure(student_steps, amplify_first_chunk,
                                                                          mu_from)


class skip_pixel_decode:
    """HeliosPyramidPipeline VAE-decodes every chunk even with output_type="latent"; latent-only users
    (ODE capture, teacher-distance checks) never look at those pixels, and at toy size the decode
    costs more than the 60 teacher steps. Inside this block `pipe.vae.decode` returns a 1-pixel
    placeholder that the pipeline concatenates and discards."""

    def __init__(self, pipe):
        self.vae = pipe.vae

    def __enter__(self):
        def placeholder(z, return_dict=True):
            video = z.new_zeros(z.shape[0], 3, 1, 1, 1)
            return (video,) if not return_dict else type("Decoded", (), {"sample": video})()
        self.vae.decode = placeholder
        return self

    def __exit__(self, *exc):
        del self.vae.decode  # back to the class method
        return False
