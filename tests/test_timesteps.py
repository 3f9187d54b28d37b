"""Tests for helios_train.algorithms.timesteps (official helios/utils/utils_base.py `calculate_shift`, `apply_schedule_shift`;
helios/utils/utils_helios_base.py `prepare_stage1_noise_input`)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from helios_train.algorithms.timesteps import (
    TimestepConfig, add_noise, compute_mu, flow_target, sample_training_sigmas, seq_len_for, shift_factor,
    time_shift,
)

# (latent H, W) of a 9-frame chunk → (L, μ linear, exp(μ)) of official `calculate_shift` (helios/utils/utils_base.py)
MU_TABLE = [((12, 20), 540, 0.548, 1.730), ((24, 40), 2160, 0.822, 2.276), ((48, 80), 8640, 1.919, 6.815)]


@pytest.mark.parametrize("hw,seq,mu,exp_mu", MU_TABLE)
def test_mu_table(hw, seq, mu, exp_mu):
    cfg = TimestepConfig()
    L = seq_len_for((2, 16, 9, *hw))
    assert L == seq
    assert compute_mu(L, cfg) == pytest.approx(mu, abs=5e-4)
    assert shift_factor(compute_mu(L, cfg), "linear") == pytest.approx(mu, abs=5e-4)
    assert shift_factor(compute_mu(L, cfg), "exponential") == pytest.approx(exp_mu, abs=5e-4)


def test_seq_len_accepts_shapes_and_patch():
    assert seq_len_for((9, 48, 80)) == seq_len_for(torch.Size([1, 16, 9, 48, 80])) == 8640
    assert seq_len_for((16, 48, 80), patch=(4, 8, 8)) == 240


def test_exponential_clamps_at_seven():
    cfg = TimestepConfig()
    big = compute_mu(seq_len_for((9, 96, 160)), cfg)  # μ ≈ 7.3, far beyond ln 7
    assert big > math.log(7)
    assert shift_factor(big, "exponential") == pytest.approx(7.0)
    assert shift_factor(big, "linear") == pytest.approx(big)
    with pytest.raises(ValueError):
        shift_factor(1.0, "cubic")


def test_time_shift_formula():
    sig = torch.tensor([0.0, 0.25, 0.5, 1.0])
    out = time_shift(sig, 2.0, "linear")
    assert torch.allclose(out, torch.tensor([0.0, 0.4, 2 / 3, 1.0]))
    # s < 1 moves toward less noise (official `apply_schedule_shift`, helios/utils/utils_base.py)
    assert time_shift(0.5, 0.548, "linear") < 0.5
    assert time_shift(0.5, math.log(4.0), "exponential") == pytest.approx(0.8)


def _table():
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).sigmas


def test_logit_normal_sigmas_come_from_the_scheduler_table():
    g = torch.Generator().manual_seed(0)
    sigma, t = sample_training_sigmas(20000, TimestepConfig(), g)
    assert sigma.shape == t.shape == (20000,)
    assert sigma.dtype == torch.float32
    assert torch.isin(sigma, _table()).all()
    assert torch.equal(t, sigma * 1000)
    # u = sigmoid(N(0,1)) is symmetric around 0.5 and σ = 1 − ⌊1000u⌋/1000: median ≈ 0.5
    assert sigma.median().item() == pytest.approx(0.5, abs=0.02)
    # P(σ > sigmoid(1)) = P(N > 1) ≈ 0.159 (±0.01 ≈ 4σ for n = 20000)
    assert (sigma > 1 / (1 + math.exp(-1))).float().mean().item() == pytest.approx(0.1587, abs=0.01)
    assert 0.0 < sigma.min() and sigma.max() <= 1.0


def test_uniform_and_none_are_uniform():
    for scheme in ("uniform", "none"):
        cfg = TimestepConfig(weighting_scheme=scheme)
        sigma, _ = sample_training_sigmas(20000, cfg, torch.Generator().manual_seed(1))
        assert sigma.mean().item() == pytest.approx(0.5, abs=0.01)
        assert (sigma < 0.25).float().mean().item() == pytest.approx(0.25, abs=0.015)
    with pytest.raises(ValueError):
        sample_training_sigmas(2, TimestepConfig(weighting_scheme="cosmap"), torch.Generator())


def test_dynamic_shift_moves_the_median():
    cfg = TimestepConfig(use_dynamic_shifting=True, time_shift_type="linear")
    sigma, t = sample_training_sigmas(20000, cfg, torch.Generator().manual_seed(2), seq_len=8640)
    expected = time_shift(0.5, compute_mu(8640, cfg), "linear")  # ≈ 0.657
    assert sigma.median().item() == pytest.approx(expected, abs=0.02)
    assert torch.allclose(t, sigma * 1000)
    with pytest.raises(ValueError):
        sample_training_sigmas(2, cfg, torch.Generator())  # seq_len missing


def test_draws_use_only_the_given_generator():
    torch.manual_seed(123)
    expected_global = torch.rand(3)
    torch.manual_seed(123)
    a = sample_training_sigmas(8, TimestepConfig(), torch.Generator().manual_seed(5))
    assert torch.equal(torch.rand(3), expected_global)  # global RNG untouched
    b = sample_training_sigmas(8, TimestepConfig(), torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_add_noise_and_target():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 9, 2, 2, generator=g)
    eps = torch.randn(3, 4, 9, 2, 2, generator=g)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    xt = add_noise(x0, eps, sigma)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], eps[2])
    assert torch.allclose(xt[1], 0.5 * (x0[1] + eps[1]))
    # v = ε − x0 is the σ-derivative of x_t
    h = 1e-3
    fd = (add_noise(x0, eps, sigma.clamp(max=1 - h) + h) - add_noise(x0, eps, sigma.clamp(max=1 - h))) / h
    assert torch.allclose(fd, flow_target(x0, eps), atol=1e-3)
