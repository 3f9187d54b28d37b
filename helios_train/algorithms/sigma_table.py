"""σ of a timestep the way the official training code looks it up: the nearest entry of a shifted table.

The official DMD and ODE-regression losses never compute σ from t in closed form. They build a
1000-entry σ table, apply the resolution's dynamic shift to it, scale it to timesteps, and for a
timestep t take σ at argmin |t_table − t| (helios/utils/utils_helios_post.py: `add_noise`,
`convert_flow_pred_to_x0`; the tables are built in `_generator_loss` / `_critic_loss` (global) and in
the few-step rollout and `_ode_regression_loss` (each pyramid level's own table)). For an integer t
the nearest entry differs from t / 1000 (or from the exact inverse of the level's shift) by up to
~1e-3 — small, but it is what the released weights were trained with, so we use the same lookup.

Two tables:
- global (`dmd_table`): σ = linspace(1, 1/1000, 1000) shifted by μ, t = 1000·σ — the DMD generator's
  and critic's noising and x0 (official `_generator_loss`, `_critic_loss`);
- per level (`level_table`): the pyramid scheduler's stage-local σ table shifted by the level's μ,
  t = t_min + σ·(t_max − t_min) on the stage's global timestep range — the rollout's x0 and re-noising
  and the ODE-regression target.
"""
from __future__ import annotations

import torch

# The distilled sampler's pyramid (official get_ode-pairs.py / stage_3 yamls): 3 levels, γ 1/3, linear dynamic shift.
PYRAMID = dict(stages=3, stage_range=[0, 1 / 3, 2 / 3, 1], gamma=1 / 3, use_dynamic_shifting=True,
               time_shift_type="linear")


def nearest_sigma(t: torch.Tensor, table_t: torch.Tensor, table_sigma: torch.Tensor) -> torch.Tensor:
    """σ[argmin |table_t − t|] per element of `t` (float64; ties go to the first entry, as torch.argmin)."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    index = (table_t.to(t.device, torch.float64)[None, :] - t[:, None]).abs().argmin(dim=1)
    return table_sigma.to(t.device, torch.float64)[index]


def linear_shift(sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """The linear dynamic shift μσ / (1 + (μ − 1)σ) (official `apply_schedule_shift`, time_shift_type linear)."""
    return mu * sigma / (1 + (mu - 1) * sigma)


def dmd_table(mu: float, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, σ) of the DMD losses' global table, shifted by μ of the full-resolution chunk."""
    sigma = linear_shift(torch.linspace(1.0, 1.0 / num_train_timesteps, num_train_timesteps, dtype=torch.float64), mu)
    return sigma * num_train_timesteps, sigma


def dmd_sigma(t: torch.Tensor, mu: float) -> torch.Tensor:
    return nearest_sigma(t, *dmd_table(mu))


def level_table(scheduler, level: int, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, σ) of pyramid level `level`'s own table on a diffusers Helios(DMD)Scheduler, shifted by μ
    with the scheduler's own shift function (what `set_timesteps(mu=...)` applies to the sampler's σ)."""
    stage_t = scheduler.timesteps_per_stage[level].to(torch.float64)
    sigma = scheduler.time_shift(mu, 1.0, scheduler.sigmas_per_stage[level].to(torch.float64))
    lo, hi = stage_t.min(), stage_t.max()
    return lo + sigma * (hi - lo), sigma


def level_sigma(t: torch.Tensor, scheduler, level: int, mu: float) -> torch.Tensor:
    return nearest_sigma(t, *level_table(scheduler, level, mu))


def sigma_of(timesteps: torch.Tensor, level: int, mu: float, scheduler=None) -> torch.Tensor:
    """σ of recorded ODE-pair timesteps as the official `_ode_regression_loss` takes it: the nearest entry of
    level `level`'s table shifted by μ of the level's resolution."""
    if scheduler is None:
        from diffusers import HeliosDMDScheduler

        scheduler = HeliosDMDScheduler(**PYRAMID)
    return level_sigma(timesteps, scheduler, level, mu)
