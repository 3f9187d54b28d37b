"""Distribution Matching Distillation losses for Helios-Distilled (official
helios/utils/utils_helios_post.py: compute_distribution_matching_loss, compute_kl_grad, _critic_loss).

Generator: x̂0 from the few-step rollout is re-noised at t, the critic ("fake score", its own LoRA)
and the teacher ("real score", the same base with adapters off, guidance cond + 3·(cond − neg)) both
predict x0; grad = (fake − real) / mean|x̂0 − real|; L = 0.5·mean((x̂0 − sg(x̂0 − grad))²) in float64,
whose gradient w.r.t. x̂0 is grad / numel. Critic: flow matching on generator samples.

Timesteps: generator u ~ Beta(1 + 3c, 1 + 0.5c), c = ½(1 + cos(π·min(step / anneal, 1))) — Beta(4, 1.5)
biased to high noise at the start, uniform after `anneal` (500) steps; critic u ~ U(0.001, 1). Both
are shifted with the linear dynamic shift of the full-resolution chunk (μ = 1.919 at 48×80), scaled to
t = 1000·σ', rounded and clamped to [20, 980] — but, as the official `sample_dynamic_timestep` does
(`if timestep_shift > 1:`, with timestep_shift = μ under dynamic shifting), only while μ > 1: a chunk under
~3,200 noisy tokens (μ ≤ 1, e.g. 16×24 latents, μ 0.603) takes t = round(clamp(1000·u)) unshifted.
`stage.dmd.shift_rule=always` shifts at every μ instead (our earlier rule). σ(t) is then the nearest entry
of the μ-shifted 1000-entry table (helios_train/algorithms/sigma_table.py) under either rule — the official
`_generator_loss` / `_critic_loss` shift that table by μ unconditionally — as the official `add_noise` /
`convert_flow_pred_to_x0` look it up, not t / 1000.
"""
from __future__ import annotations

import math

import torch

from helios_train.algorithms.sigma_table import dmd_sigma, linear_shift
from helios_train.config.choices import DMDShiftRule
from helios_train.config.mechanisms import DMDConfig  # noqa: F401  (the schema's; re-exported)


def beta_annealing(step: int, anneal_steps: int) -> tuple[float, float]:
    c = 0.5 * (1 + math.cos(math.pi * min(step / max(anneal_steps, 1), 1.0)))
    return 1 + 3 * c, 1 + 0.5 * c


def shifted_timesteps(u: torch.Tensor, mu: float, t_min: int, t_max: int,
                      rule: str = DMDShiftRule.official) -> tuple[torch.Tensor, torch.Tensor]:
    """u in (0, 1] → (t integer-valued float in [t_min, t_max], σ(t) from the μ-shifted table).

    rule "official": u is shifted only while μ > 1 (official sample_dynamic_timestep); "always": at every μ."""
    shift = DMDShiftRule(rule) == DMDShiftRule.always or mu > 1  # (an unknown rule raises ValueError)
    t = ((linear_shift(u, mu) if shift else u) * 1000).round().clamp(t_min, t_max)
    return t, dmd_sigma(t, mu)


def sample_generator_t(batch: int, step: int, cfg: DMDConfig, mu: float, generator: torch.Generator):
    a, b = beta_annealing(step, cfg.anneal_steps)
    u = torch.tensor([_one_beta(a, b, generator) for _ in range(batch)], dtype=torch.float64)
    return shifted_timesteps(u, mu, cfg.t_min, cfg.t_max, cfg.shift_rule)


def _gamma(shape: float, generator: torch.Generator) -> float:
    """Marsaglia–Tsang Gamma(shape, 1) sampler driven by `generator` (shape >= 1 here)."""
    d = shape - 1 / 3
    c = 1 / math.sqrt(9 * d)
    while True:
        x = float(torch.randn((), generator=generator, dtype=torch.float64))
        v = (1 + c * x) ** 3
        if v <= 0:
            continue
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if math.log(max(u, 1e-300)) < 0.5 * x * x + d - d * v + d * math.log(v):
            return d * v


def _one_beta(a: float, b: float, generator: torch.Generator) -> float:
    """Beta(a, b) = X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b); our generator, not the global RNG
    (torch.distributions.Beta has no generator argument), so draws stay resumable."""
    x, y = _gamma(a, generator), _gamma(b, generator)
    return x / (x + y)


def sample_critic_t(batch: int, cfg: DMDConfig, mu: float, generator: torch.Generator):
    u = 0.001 + 0.999 * torch.rand(batch, generator=generator, dtype=torch.float64)
    return shifted_timesteps(u, mu, cfg.t_min, cfg.t_max, cfg.shift_rule)


def dmd_gradient(x0_gen: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor) -> torch.Tensor:
    """(fake − real) / mean_{C,T,H,W}|x̂0 − real| per sample (the DMD normaliser), NaN-safe."""
    x0, fake, real = x0_gen.double(), fake_x0.double(), real_x0.double()
    norm = (x0 - real).abs().flatten(1).mean(1).view(-1, *([1] * (x0.ndim - 1)))
    return torch.nan_to_num((fake - real) / norm)


def dmd_loss(x0_gen: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5·mean((x̂0 − sg(x̂0 − grad))²) in float64: its gradient w.r.t. x̂0 is grad / numel."""
    x0 = x0_gen.double()
    return 0.5 * ((x0 - (x0 - grad).detach()) ** 2).mean()


def critic_flow_loss(v_pred: torch.Tensor, noise: torch.Tensor, x0_gen: torch.Tensor) -> torch.Tensor:
    return ((v_pred.float() - (noise - x0_gen).float()) ** 2).mean()
