"""Tests for helios_train.algorithms.pyramid (official helios/scheduler/scheduling_helios.py, `prepare_stage2_clean_input` in
helios/utils/utils_helios_base.py, `inference_with_trajectory_stage2` in helios/utils/utils_helios_post.py)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
from types import SimpleNamespace

import pytest
import torch

from helios_train.algorithms.pyramid import (
    PyramidConfig, PyramidSchedule, block_noise, build_levels, downsample_clean, level_token_counts,
    nearest_up2, noise_pyramid, sample_all_levels, sample_level_inputs, upsample_renoise,
)

SOURCES = ["training", "diffusers"]


@pytest.fixture(scope="module", params=SOURCES)
def sched(request):
    return PyramidSchedule(PyramidConfig(table_source=request.param))


def test_level_token_counts():
    assert level_token_counts((48, 80), 9, (1, 2, 2)) == [540, 2160, 8640]
    with pytest.raises(ValueError):
        level_token_counts((50, 80), 9, (1, 2, 2))  # 50/4 is not a whole number of 2x2 patches


def test_stage_sigmas(sched):
    lv = sched.levels
    assert [l.orig_start_sigma for l in lv] == pytest.approx([0.999, 0.666333, 0.333666], abs=1e-9)
    # corrected start sigma: 1 - a/(2 - a) for gamma = 1/3 (official `HeliosScheduler.init_sigmas_for_each_stage`)
    assert [l.start_sigma for l in lv] == pytest.approx([0.999, 0.7997597, 0.5003742], abs=1e-6)
    assert [round(l.start_sigma, 4) for l in lv] == [0.999, 0.7998, 0.5004]
    assert [l.end_sigma for l in lv] == pytest.approx([0.666333, 0.333666, 0.0], abs=1e-9)
    assert [l.timestep_ratio[0] for l in lv] == pytest.approx([0.0, 0.2560681, 0.6148405], abs=1e-6)
    for l in lv:
        assert l.sigmas.shape == l.timesteps.shape == (1000,)
        assert l.sigmas[0].item() == pytest.approx(0.999) and l.sigmas[-1].item() == pytest.approx(0.000999)


def test_table_numbers_both_variants(sched):
    """Official `HeliosScheduler.init_sigmas_for_each_stage` (helios/scheduler/scheduling_helios.py): the nominal
    ranges 999->743.3 | 743.3->385.6 | 385.6->~1 (t_max, t_min), and the table's first/last entries
    [999->743.51], [743.26->385.97], [385.61->1.38] of linspace(t_max, t_min, 1001)[:-1]. Both are pinned for
    both sources."""
    lv = sched.levels
    assert [(l.t_max, l.t_min) for l in lv] == [
        pytest.approx((999.0, 743.256), abs=1e-6), pytest.approx((743.256, 385.614), abs=1e-6),
        pytest.approx((385.614, 0.999), abs=1e-6)]
    assert [(l.timesteps[0].item(), l.timesteps[-1].item()) for l in lv] == [
        pytest.approx((999.0, 743.511744), abs=1e-5), pytest.approx((743.256, 385.971642), abs=1e-5),
        pytest.approx((385.614, 1.383615), abs=1e-5)]
    # the nominal end is never sampled inside its own stage: last entry = t_min + (t_max - t_min)/1000
    for l in lv:
        assert l.timesteps[-1].item() == pytest.approx(l.t_min + (l.t_max - l.t_min) / 1000, abs=1e-9)


def test_training_and_diffusers_tables_identical():
    a, b = (PyramidSchedule(PyramidConfig(table_source=s)) for s in SOURCES)
    for la, lb in zip(a.levels, b.levels):
        for f in ("orig_start_sigma", "start_sigma", "end_sigma", "t_max", "t_min"):
            assert getattr(la, f) == pytest.approx(getattr(lb, f), abs=1e-9), f
        assert la.timestep_ratio == pytest.approx(lb.timestep_ratio, abs=1e-12)
        assert torch.allclose(la.timesteps, lb.timesteps, atol=1e-9, rtol=0)
        assert torch.allclose(la.sigmas, lb.sigmas, atol=1e-12, rtol=0)


def test_timestep_for_sigma_uses_table_extremes(sched):
    """Distilled [2,2,2] timesteps (official `selected_target_timesteps`, tools/offload_data/get_ode-pairs.py):
    local sigmas {0.999, 0.5}, linear dynamic shift with mu of each level's own resolution (L = 540 / 2160 / 8640)."""
    expected = [(998.53, 833.96), (742.82, 547.19), (385.41, 253.99)]
    for k, L in enumerate((540, 2160, 8640)):
        mu = 0.5 + (L - 256) * (1.15 - 0.5) / (4096 - 256)
        # set_timesteps(2 + 1) then drop the last: linspace(0.999, 0.000999, 3)[:2] = [0.999, 0.4999995]
        s = torch.linspace(0.999, 0.000999, 3, dtype=torch.float64)[:2]
        shifted = mu * s / (1 + (mu - 1) * s)
        t = sched.timestep_for_sigma(k, shifted)
        assert t.tolist() == pytest.approx(expected[k], abs=0.006)
    # with the nominal (t_max, t_min) instead, stage 0's second step would be 833.80, not 833.96
    l0 = sched.levels[0]
    mu = 0.5 + (540 - 256) * 0.65 / 3840
    s2 = mu * 0.4999995 / (1 + (mu - 1) * 0.4999995)
    assert l0.t_min + s2 * (l0.t_max - l0.t_min) == pytest.approx(833.80, abs=0.006)


def test_renoise_coefficients(sched):
    a1, b1 = sched.renoise_coefficients(1)
    a2, b2 = sched.renoise_coefficients(2)
    assert (round(a1, 3), round(b1, 3)) == (0.600, 0.693)
    assert (round(a2, 3), round(b2, 3)) == (0.750, 0.433)
    # signal coefficient of the renoised latent = training start point's: 0.600*0.3337 = 0.2002 = 1-0.7998
    for k, (a, _) in ((1, (a1, b1)), (2, (a2, b2))):
        lv = sched.levels[k]
        assert a * (1 - lv.orig_start_sigma) == pytest.approx(1 - lv.start_sigma, abs=1e-12)
    assert a1 * (1 - 0.6663) == pytest.approx(0.2002, abs=1e-4)
    # and the noise std matches too: sqrt(alpha^2 sigma_orig^2 + beta^2) = start sigma
    for k, (a, b) in ((1, (a1, b1)), (2, (a2, b2))):
        lv = sched.levels[k]
        assert math.hypot(a * lv.orig_start_sigma, b) == pytest.approx(lv.start_sigma, abs=1e-12)
    with pytest.raises(ValueError):
        sched.renoise_coefficients(0)


def test_block_noise_statistics():
    # 200k blocks of 2x2. Tolerances: var of 800k unit-variance values has std ~0.0016 -> 0.01 is ~6σ;
    # correlation estimate std ~0.002 -> 0.01. Block sums: only the 1e-8 Cholesky jitter survives
    # (block-sum std = 2e-4), so the max over 200k blocks stays below ~1.2e-3; bound 2e-3.
    g = torch.Generator().manual_seed(0)
    n = block_noise((1, 4, 1, 400, 500), 1 / 3, g)
    assert n.dtype == torch.float32 and n.shape == (1, 4, 1, 400, 500)
    assert n.mean().abs().item() < 0.01
    assert n.var().item() == pytest.approx(1.0, abs=0.01)
    blocks = n.reshape(4, 200, 2, 250, 2).permute(0, 1, 3, 2, 4).reshape(-1, 4)  # [200k, 4]
    assert blocks.shape[0] == 200_000
    assert blocks.sum(1).abs().max().item() < 2e-3
    corr = torch.corrcoef(blocks.T.double())
    off = corr[~torch.eye(4, dtype=torch.bool)]
    assert off.sub(-1 / 3).abs().max().item() < 0.01
    assert block_noise((1, 1, 1, 4, 4), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_fp32_cholesky_fails_float64_works():
    g = 1 / 3
    cov32 = torch.eye(4) * (1 + g) - torch.ones(4, 4) * g + torch.eye(4) * 1e-8
    # the 1e-8 jitter is below fp32 resolution at 1.33: the smallest eigenvalue comes out <= 0 (-1e-7 here)
    assert torch.linalg.eigvalsh(cov32).min().item() <= 0
    # Not positive definite in fp32: whether LAPACK's fp32 factorisation reports it depends on the CPU's rounding (it
    # fails on the machine that found it; on a 2026-12-07 Xeon it returns a factor with a 4e-4 last pivot instead).
    # The float64 path never depends on that.
    fp32_fails = torch.linalg.cholesky_ex(cov32).info.item() > 0
    eye64 = torch.eye(4, dtype=torch.float64)
    cov64 = eye64 * (1 + g) - torch.ones(4, 4, dtype=torch.float64) * g + eye64 * 1e-8
    assert torch.linalg.eigvalsh(cov64).min().item() == pytest.approx(1e-8, rel=1e-3)
    assert torch.linalg.cholesky_ex(cov64).info.item() == 0
    # diffusers' pipeline method (fp32 path) raises for gamma = 1/3 where the fp32 factorisation fails; ours never
    from diffusers import HeliosPyramidPipeline
    fake = SimpleNamespace(scheduler=SimpleNamespace(config=SimpleNamespace(gamma=g)))
    if fp32_fails:
        with pytest.raises(RuntimeError):
            HeliosPyramidPipeline.sample_block_noise(fake, 1, 1, 1, 4, 4, (1, 2, 2), "cpu", torch.Generator())
    assert torch.isfinite(block_noise((1, 1, 1, 4, 4), g, torch.Generator())).all()


def test_block_noise_matches_diffusers_layout_and_stream():
    # gamma = 0.25 keeps Sigma positive definite, so the fp32 pipeline path works and must agree
    from diffusers import HeliosPyramidPipeline
    fake = SimpleNamespace(scheduler=SimpleNamespace(config=SimpleNamespace(gamma=0.25)))
    ref = HeliosPyramidPipeline.sample_block_noise(
        fake, 2, 3, 2, 6, 8, (1, 2, 2), "cpu", torch.Generator().manual_seed(7))
    ours = block_noise((2, 3, 2, 6, 8), 0.25, torch.Generator().manual_seed(7))
    assert torch.allclose(ours, ref, atol=1e-5)


def test_noise_pyramid_unit_variance():
    eps = torch.randn(4, 4, 4, 128, 128, generator=torch.Generator().manual_seed(1))
    lv = noise_pyramid(eps)
    assert [tuple(x.shape[-2:]) for x in lv] == [(32, 32), (64, 64), (128, 128)]
    assert lv[2] is eps
    for x in lv:  # level 0 has 65k values: var std ~0.006, tolerance 0.04
        assert x.var().item() == pytest.approx(1.0, abs=0.04)
    # correlated: each level is exactly 2x the 2x2 block mean of the level above
    assert torch.allclose(lv[1], 2 * downsample_clean(eps), atol=1e-6)
    assert torch.allclose(lv[0][0, 0, 0, 0, 0], 2 * lv[1][0, 0, 0, :2, :2].mean(), atol=1e-6)


def test_downsample_and_upsample_ops():
    x = torch.arange(16.0).reshape(1, 1, 1, 4, 4)
    d = downsample_clean(x)  # bilinear x1/2 without antialias = 2x2 block means
    assert d.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    u = nearest_up2(torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 1, 2, 2))
    assert u[0, 0, 0].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]


def test_build_levels_and_sample_hand_example(sched):
    """Full 4x4 clean made of 2x2 blocks [[1,3],[5,7]] -> c1 = [[1,3],[5,7]], c0 = 4.
    eps = 0.5 everywhere -> e2 = 0.5, e1 = 1, e0 = 2. With sσ1 = 0.7997597, eσ1 = 0.333666:
      start0 = e0 = 2;  end0 = 0.666333*2 + 0.333667*4 = 2.667334
      start1 = sσ1*1 + (1-sσ1)*4 = 4 - 3*0.7997597 = 1.6007209 (constant)
      end1   = 0.333666 + 0.666334*[1,3,5,7] = [1.0, 2.332668, 3.665336, 4.998004]
      target1 = start1 - end1 = [0.6007209, -0.7319471, -2.0646151, -3.3972831]
      idx 500 -> σ = 0.999*(1-0.5) = 0.4995, t = 743.256 + 0.5*(385.614-743.256) = 564.435
      x1 = 0.4995*start1 + 0.5005*end1 = [1.3000601, 1.9670604, 2.6340607, 3.3010611]
      start2 = 0.5003742*0.5 + 0.4996258*up(c1) = [0.7498129, 1.7490646, 2.7483163, 3.7475680]
      end2 = clean"""
    blocks = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    clean = blocks.repeat_interleave(2, 0).repeat_interleave(2, 1).reshape(1, 1, 1, 4, 4)
    eps = torch.full_like(clean, 0.5)
    lv = build_levels(clean, eps, sched)
    assert lv[0].start.flatten().tolist() == pytest.approx([2.0])
    assert lv[0].end.flatten().tolist() == pytest.approx([2.667334], abs=1e-5)
    assert lv[1].start.flatten().tolist() == pytest.approx([1.6007209] * 4, abs=1e-5)
    assert lv[1].end.flatten().tolist() == pytest.approx([1.0, 2.332668, 3.665336, 4.998004], abs=1e-5)
    assert lv[2].start[0, 0, 0, ::2, ::2].flatten().tolist() == pytest.approx(
        [0.7498129, 1.7490646, 2.7483163, 3.7475680], abs=1e-5)
    assert torch.equal(lv[2].end, clean)
    s = sample_level_inputs(lv, sched, 1, index=torch.tensor([500]))
    assert s.sigma.tolist() == pytest.approx([0.4995]) and s.timestep.tolist() == pytest.approx([564.435])
    assert s.target.flatten().tolist() == pytest.approx([0.6007209, -0.7319471, -2.0646151, -3.3972831], abs=1e-5)
    assert s.x.flatten().tolist() == pytest.approx([1.3000601, 1.9670604, 2.6340607, 3.3010611], abs=1e-5)


def test_random_sampling_consistency(sched):
    g = torch.Generator().manual_seed(3)
    clean = torch.randn(8, 2, 1, 8, 8, generator=g)
    lv = build_levels(clean, torch.randn(clean.shape, generator=g), sched)
    s = sample_level_inputs(lv, sched, 2, torch.Generator().manual_seed(5), batch=8)
    assert s.index.min() >= 0 and s.index.max() <= 999 and len(set(s.index.tolist())) > 1
    table = sched.levels[2]
    assert torch.equal(s.timestep, table.timesteps[s.index]) and torch.equal(s.sigma, table.sigmas[s.index])
    sig = s.sigma.float().view(8, 1, 1, 1, 1)
    assert torch.allclose(s.x, sig * lv[2].start + (1 - sig) * lv[2].end, atol=1e-6)
    with pytest.raises(ValueError):
        sample_level_inputs(lv, sched, 2, batch=3)
    many = sample_level_inputs(build_levels(torch.zeros(20000, 1, 1, 4, 4), torch.zeros(20000, 1, 1, 4, 4),
                                            sched), sched, 0, torch.Generator().manual_seed(0))
    assert many.index.double().mean().item() == pytest.approx(499.5, abs=10)  # uniform over 0..999
    segs = sample_all_levels(lv, PyramidSchedule(PyramidConfig(sample_ratios=[1, 2, 1])))
    assert [x.level for x in segs] == [0, 1, 1, 2]
    assert [tuple(x.x.shape[-2:]) for x in segs] == [(2, 2), (4, 4), (4, 4), (8, 8)]


def test_upsample_renoise(sched):
    x = torch.randn(1, 2, 1, 3, 5, generator=torch.Generator().manual_seed(2))
    out = upsample_renoise(x, 1, sched, torch.Generator().manual_seed(9))
    alpha, beta = sched.renoise_coefficients(1)
    noise = block_noise((1, 2, 1, 6, 10), sched.gamma, torch.Generator().manual_seed(9))
    assert torch.allclose(out, alpha * nearest_up2(x) + beta * noise, atol=1e-6)
    # zero-sum block noise leaves the 2x2 block means at alpha * x: only high frequencies are added
    assert torch.allclose(downsample_clean(out), alpha * x, atol=1e-3)
