"""DMD losses: gradient direction, normaliser, timestep annealing (official utils_helios_post.py:
compute_kl_grad, compute_distribution_matching_loss, sample_dynamic_timestep, _critic_loss)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helios_train.algorithms.dmd import (DMDConfig, beta_annealing, critic_flow_loss, dmd_gradient, dmd_loss, sample_critic_t,
                              sample_generator_t, shifted_timesteps)


def test_dmd_step_moves_fake_towards_real_on_closed_form_case():
    """Fake score = the generator's own sample mean, real = the data mean: one step along −∂L moves
    the generator's samples toward the real distribution (the fake/real gap shrinks)."""
    torch.manual_seed(0)
    real_mean = torch.full((1, 2, 3, 4, 4), 2.0)
    x0 = torch.zeros(1, 2, 3, 4, 4, requires_grad=True)
    for _ in range(3):
        fake = x0.detach()  # critic tracks the generator distribution
        grad = dmd_gradient(x0.detach(), fake, real_mean)
        loss = dmd_loss(x0, grad)
        loss.backward()
        before = (x0.detach() - real_mean).abs().mean()
        with torch.no_grad():
            x0 -= 0.5 * x0.grad.float() * x0.numel()  # lr 0.5 (× numel: the gradient is grad / numel)
            x0.grad = None
        assert (x0.detach() - real_mean).abs().mean() < before


def test_gradient_is_normalised_difference_and_loss_gradient_is_grad_over_numel():
    x0 = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    fake, real = torch.randn_like(x0), torch.randn_like(x0)
    grad = dmd_gradient(x0.detach(), fake, real)
    norm = (x0.detach() - real).abs().flatten(1).mean(1).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(grad, (fake - real) / norm)
    dmd_loss(x0, grad).backward()
    torch.testing.assert_close(x0.grad, grad / x0.numel())
    assert dmd_loss(x0, grad).dtype == torch.float64
    # A zero normaliser (x̂0 == real): (fake − real) / 0 → nan_to_num gives ±float64 max, "finite" but huge, as
    # the official nan_to_num does; the loss then overflows to inf, so the trainer's guard skips that update.
    degenerate = dmd_gradient(real, fake, real)
    assert torch.isfinite(degenerate).all() and degenerate.abs().max() == torch.finfo(torch.float64).max
    assert not torch.isfinite(dmd_loss(real.clone().requires_grad_(), degenerate))


def test_timestep_annealing_beta_to_uniform_and_clamp():
    assert beta_annealing(0, 500) == (4.0, 1.5) and beta_annealing(500, 500) == (1.0, 1.0)
    assert beta_annealing(10_000, 500) == (1.0, 1.0)
    g = torch.Generator().manual_seed(0)
    cfg = DMDConfig()
    t0, _ = sample_generator_t(4000, 0, cfg, 1.919, g)
    t1, s1 = sample_generator_t(4000, 600, cfg, 1.0, g)  # uniform, no shift
    assert t0.float().mean() > 700  # Beta(4, 1.5) mean 0.727, shifted up by μ = 1.919
    assert abs(t1.float().mean().item() - 500) < 15 and t1.min() >= 20 and t1.max() <= 980
    torch.testing.assert_close(s1, t1 / 1000)  # μ = 1: the table is linspace(1, 0.001), σ(t) = t / 1000 exactly
    t, _ = shifted_timesteps(torch.tensor([0.5], dtype=torch.float64), 1.919, 20, 980)
    assert t.item() == round(1000 * 1.919 * 0.5 / (1 + 0.919 * 0.5))
    tc, _ = sample_critic_t(4000, cfg, 1.0, g)
    assert abs(tc.float().mean().item() - 500) < 15


def test_critic_loss_is_flow_matching_on_generator_samples():
    noise, x0 = torch.randn(1, 4, 9, 4, 4), torch.randn(1, 4, 9, 4, 4)
    assert critic_flow_loss(noise - x0, noise, x0).item() == 0.0
    assert critic_flow_loss(torch.zeros_like(x0), noise, x0).item() == pytest.approx(((noise - x0) ** 2).mean().item())


def official_table_sigma(t: np.ndarray, mu: float) -> np.ndarray:
    """The official lookup, written out from helios/utils/utils_helios_post.py (`_generator_loss` builds the
    table, `add_noise` / `convert_flow_pred_to_x0` take argmin |timesteps − t|), in numpy."""
    sigmas = np.linspace(1.0, 1.0 / 1000, 1000)
    sigmas = mu * sigmas / (1 + (mu - 1) * sigmas)
    timesteps = sigmas * 1000
    return sigmas[np.abs(timesteps[None, :] - t[:, None]).argmin(axis=1)]


@pytest.mark.parametrize("mu", [1.919, 1.3])
def test_sigma_of_every_integer_timestep_is_the_official_table_entry(mu):
    """σ(t) for t in 20..980 is the nearest entry of the μ-shifted 1000-entry table, not t / 1000 (they differ
    by up to ~1e-3, which moved x0 by 6e-4 on the same inputs)."""
    t = np.arange(20, 981, dtype=np.float64)
    u = torch.tensor(t / 1000 / (mu - (mu - 1) * t / 1000))  # the u that the shift maps onto t / 1000
    got_t, got_sigma = shifted_timesteps(u, mu, 20, 980)
    np.testing.assert_array_equal(got_t.numpy(), t)
    expected = official_table_sigma(t, mu)
    np.testing.assert_allclose(got_sigma.numpy(), expected, rtol=0, atol=1e-12)
    assert np.abs(expected - t / 1000).max() > 4e-4  # the check can tell the table from t / 1000
    _, s = sample_critic_t(64, DMDConfig(), mu, torch.Generator().manual_seed(0))
    tc, _ = sample_critic_t(64, DMDConfig(), mu, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(s.numpy(), official_table_sigma(tc.numpy(), mu), rtol=0, atol=1e-12)


def official_warp(u: np.ndarray, shift: float, t_min: int = 20, t_max: int = 980) -> np.ndarray:
    """The official timestep warping, written out from helios/utils/utils_helios_post.py `sample_dynamic_timestep`
    (min_timestep 0, max_timestep 1000 as in stage_3_post): timestep = 1000·u; `if timestep_shift > 1:` the linear
    shift; clamp(min_step, max_step); round. `timestep_shift` is μ there (`_generator_loss` / `_critic_loss`
    overwrite it with `apply_schedule_shift(..., return_mu=True)`'s μ under use_dynamic_shifting)."""
    t = 1000 * u
    if shift > 1:
        t = shift * (t / 1000) / (1 + (shift - 1) * (t / 1000)) * 1000
    return np.round(np.clip(t, t_min, t_max))


def _mu_at(h: int, w: int) -> float:
    """μ as the DMD stage takes it (stages/dmd.py `_mu`): calculate_mu of the x̂0 chunk's noisy tokens, 9 latent frames."""
    from helios_train.algorithms.timesteps import calculate_mu, seq_len_for

    return calculate_mu(seq_len_for((1, 16, 9, h, w), (1, 2, 2)))


def _generator_u(n: int, step: int, seed: int) -> np.ndarray:
    """The u that sample_generator_t draws from a generator seeded `seed` (the same _one_beta sequence)."""
    from helios_train.algorithms.dmd import _one_beta

    a, b = beta_annealing(step, DMDConfig().anneal_steps)
    g = torch.Generator().manual_seed(seed)
    return np.array([_one_beta(a, b, g) for _ in range(n)])


@pytest.mark.parametrize("step", [0, 250, 600])
def test_default_shift_rule_is_official_dynamic_shift_only_above_one(step):
    """Default (stage.dmd.shift_rule=official): the timestep is shifted only while μ > 1. At 48×80 latents
    (μ 1.919) that is the old always-shift result; at 16×24 (864 tokens, μ 0.603) t = round(clamp(1000·u)),
    unshifted, while σ(t) is still the nearest entry of the μ-shifted table (the official `_generator_loss`
    / `_critic_loss` shift the table with apply_schedule_shift whatever μ is)."""
    n = 4000
    small, large = _mu_at(16, 24), _mu_at(48, 80)
    assert small < 1 < large and abs(large - 1.919) < 1e-3
    u = _generator_u(n, step, seed=step)
    for mu in (small, large):
        t, sigma = sample_generator_t(n, step, DMDConfig(), mu, torch.Generator().manual_seed(step))
        expected = official_warp(u, mu)
        np.testing.assert_array_equal(t.numpy(), expected)
        np.testing.assert_allclose(sigma.numpy(), official_table_sigma(expected, mu), rtol=0, atol=1e-12)
    # At 48×80 the official rule is the old one: t = round(clamp(1000·μσ/(1 + (μ − 1)σ))).
    t_large, _ = sample_generator_t(n, step, DMDConfig(), large, torch.Generator().manual_seed(step))
    old_large = np.round(np.clip(1000 * large * u / (1 + (large - 1) * u), 20, 980))
    np.testing.assert_array_equal(t_large.numpy(), old_large)
    # At 16×24 the range of t is the range of 1000·u: every quantile is 1000× u's (monotone map), and the
    # old always-shift rule would have put it lower (μ < 1 pulls σ towards 0).
    t_small, _ = sample_generator_t(n, step, DMDConfig(), small, torch.Generator().manual_seed(step))
    for q in (0.05, 0.5, 0.95):
        uq = np.quantile(u, q, method="lower")
        assert np.quantile(t_small.numpy(), q, method="lower") == official_warp(np.array([uq]), small)[0]
        assert official_warp(np.array([uq]), small)[0] > round(1000 * small * uq / (1 + (small - 1) * uq))
    # The critic's U(0.001, 1) draw follows the same rule.
    g = torch.Generator().manual_seed(1)
    uc = (0.001 + 0.999 * torch.rand(n, generator=g, dtype=torch.float64)).numpy()
    tc, sc = sample_critic_t(n, DMDConfig(), small, torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(tc.numpy(), official_warp(uc, small))
    np.testing.assert_allclose(sc.numpy(), official_table_sigma(tc.numpy(), small), rtol=0, atol=1e-12)


def test_shift_rule_always_reproduces_the_old_timesteps_below_one():
    """stage.dmd.shift_rule=always keeps the linear shift at every μ (the behaviour before the official rule)."""
    n, mu = 4000, _mu_at(16, 24)
    cfg = DMDConfig(shift_rule="always")
    u = _generator_u(n, 0, seed=3)
    t, sigma = sample_generator_t(n, 0, cfg, mu, torch.Generator().manual_seed(3))
    old = np.round(np.clip(1000 * mu * u / (1 + (mu - 1) * u), 20, 980))
    np.testing.assert_array_equal(t.numpy(), old)
    np.testing.assert_allclose(sigma.numpy(), official_table_sigma(old, mu), rtol=0, atol=1e-12)
    assert (t.numpy() < official_warp(u, mu)).mean() > 0.9  # the shift pulls most draws down
    g = torch.Generator().manual_seed(4)
    uc = (0.001 + 0.999 * torch.rand(n, generator=g, dtype=torch.float64)).numpy()
    tc, _ = sample_critic_t(n, cfg, mu, torch.Generator().manual_seed(4))
    np.testing.assert_array_equal(tc.numpy(), np.round(np.clip(1000 * mu * uc / (1 + (mu - 1) * uc), 20, 980)))
    t_large, _ = shifted_timesteps(torch.tensor(u), _mu_at(48, 80), 20, 980, "always")
    t_large_official, _ = shifted_timesteps(torch.tensor(u), _mu_at(48, 80), 20, 980)
    torch.testing.assert_close(t_large, t_large_official)
