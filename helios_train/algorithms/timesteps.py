"""Training timesteps for the flow-matching stages 1–2 (official ``prepare_stage1_noise_input``,
helios/utils/utils_helios_base.py; ``calculate_shift`` / ``apply_schedule_shift``, helios/utils/utils_base.py).

Rectified flow: x_t = (1 − σ)·x0 + σ·ε, the model predicts v = ε − x0 and sees t = 1000·σ.
σ is read from the 1000-entry table of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=1)``
(1.0 → 0.001) at index ⌊1000·u⌋, u drawn from the weighting scheme — exactly the official
``prepare_stage1_noise_input`` recipe. We reuse the scheduler's own table instead of re-deriving it
so a diffusers change to the table would show up here too.

Every draw comes from an explicit ``torch.Generator`` (exact resume); the global RNG is never used.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence, Union

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from helios_train.config.choices import TimeShift, WeightingScheme
from helios_train.config.mechanisms import TimestepConfig  # noqa: F401  (the schema's; re-exported)

# Cap of the exponential shift factor, s = exp(min(μ, ln 7)) ≤ 7: the official *native* helper
# (helios/utils/utils_base.py `apply_schedule_shift`, exp_max=7) clamps like this. The
# diffusers-style scheduler in the official repo (`_time_shift_exponential`) does not clamp;
# at 384×640 (μ = 1.919 < ln 7 = 1.946) the two agree.
_EXP_MAX = 7.0


def calculate_mu(seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                 max_shift: float = 1.15) -> float:
    """The dynamic shift's μ of a token count: base_shift + (L − base_seq_len)·(max_shift − base_shift)/(max_seq_len −
    base_seq_len) (official calculate_shift; the defaults are every official schedule's). The one implementation:
    training timesteps, the few-step rollout, ODE pairs and the DMD losses all take μ from here."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + (seq_len - base_seq_len) * slope


def compute_mu(seq_len: int, cfg: TimestepConfig) -> float:
    """μ with the shift constants of `stage.timesteps`."""
    return calculate_mu(seq_len, cfg.base_seq_len, cfg.max_seq_len, cfg.base_shift, cfg.max_shift)


def shift_factor(mu: float, time_shift_type: str = "linear") -> float:
    """The SD3/Flux shift factor s for μ: μ itself ("linear") or exp(min(μ, ln 7)) ("exponential")."""
    if TimeShift(time_shift_type) == TimeShift.linear:  # (an unknown name raises ValueError)
        return float(mu)
    return math.exp(min(float(mu), math.log(_EXP_MAX)))


Number = Union[float, torch.Tensor]


def time_shift(sigma: Number, mu: float, time_shift_type: str = "linear") -> Number:
    """σ' = s·σ / (1 + (s − 1)·σ): keeps 0 and 1 fixed, s > 1 pushes σ toward more noise (official
    apply_schedule_shift)."""
    s = shift_factor(mu, time_shift_type)
    return s * sigma / (1 + (s - 1) * sigma)


def seq_len_for(latent_shape: Sequence[int], patch: Sequence[int] = (1, 2, 2)) -> int:
    """Token count of a latent [.., T, H, W] under a (pt, ph, pw) patch; official: T·H·W // 4.

    Takes the last three dims, so [B, C, T, H, W], [C, T, H, W] and (T, H, W) all work.
    """
    t, h, w = (int(d) for d in tuple(latent_shape)[-3:])
    pt, ph, pw = patch
    return (t * h * w) // (pt * ph * pw)


@lru_cache(maxsize=8)
def _flow_table(num_train_timesteps: int) -> torch.Tensor:
    """diffusers' training σ table for shift = 1 (index 0 = σ 1.0, last = 1/N). Do not mutate."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0)
    return sched.sigmas.detach().to(torch.float32).cpu()


def sample_training_sigmas(
    batch: int, cfg: TimestepConfig, generator: torch.Generator, seq_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (σ, t) per sample for stages 1–2 (official ``prepare_stage1_noise_input``); both float32 [B] on
    ``generator.device``.

    Same timestep for every frame of the chunk; history tokens are at t = 0 inside the model.
    ``seq_len`` (see ``seq_len_for``) is needed only when ``cfg.use_dynamic_shifting``.
    """
    WeightingScheme(cfg.weighting_scheme)  # a config built without the schema: an unknown name raises ValueError
    n = int(cfg.num_train_timesteps)
    # diffusers' helper treats every scheme but logit_normal/mode as uniform, as the official code does.
    u = compute_density_for_timestep_sampling(
        weighting_scheme=cfg.weighting_scheme,
        batch_size=batch,
        logit_mean=cfg.logit_mean,
        logit_std=cfg.logit_std,
        device=generator.device,
        generator=generator,
    )
    # Deliberate difference: clamp to the last index. sigmoid() can round to exactly 1.0 in fp32
    # (|N| > ~17), where the official ⌊1000u⌋ would index past the table.
    index = (u * n).long().clamp_(0, n - 1)
    table = _flow_table(n).to(u.device)
    if cfg.use_dynamic_shifting:
        if seq_len is None:
            raise ValueError("use_dynamic_shifting needs seq_len (see seq_len_for)")
        table = time_shift(table, compute_mu(seq_len, cfg), cfg.time_shift_type)
    sigma = table[index]
    # t = N·σ equals the scheduler's own `timesteps` entry for shift = 1, and the official
    # shifted path sets timesteps = 1000·σ' as well.
    return sigma, sigma * n


def _broadcast(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=like.device, dtype=like.dtype)
    if sigma.ndim == 1:
        sigma = sigma.view(-1, *([1] * (like.ndim - 1)))
    return sigma


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − σ)·x0 + σ·ε; σ is [B] (broadcast over the rest) or already broadcastable."""
    s = _broadcast(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = ε − x0 = d x_t / dσ: the regression target (official ``prepare_stage1_noise_input``)."""
    return noise - x0
