"""Tests for helios_train.algorithms.anti_drift (official helios/utils/utils_helios_base.py: `corrupt_history_latents`,
`downsample_corrupt`, `add_saturation_to_history_latents`, `corrupt_model_input`).

Statistical checks state their tolerance; each bound is ≥ 4.5 standard deviations of the estimate.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from helios_train.algorithms.anti_drift import (
    AntiDriftConfig, add_saturation, corrupt_history, corrupt_target, history_segments,
)

SIZES = (16, 2, 1)


def _ones(b=1, c=4, h=32, w=32):
    return torch.ones(b, c, 1, h, w), torch.ones(b, c, 19, h, w)


def _sigma_hat(x0, hist):
    """σ per (sample, frame) of an all-ones input: mean over (C,h,w) of σε + (1 − σ) ≈ 1 − σ."""
    seq = torch.cat([x0, hist], dim=2)
    return 1 - seq.mean(dim=(1, 3, 4))  # [B, 20]


def test_segmentation_default():
    segs = history_segments(SIZES, 9)
    assert [(s.name, s.start, s.stop) for s in segs] == [
        ("begin", 0, 1), ("tail", 1, 2), ("window0", 2, 11), ("window1", 11, 20)]
    assert [s.parts for s in segs] == [
        ((0, 1, "short"),), ((1, 2, "long"),), ((2, 11, "long"),), ((11, 13, "long"), (13, 20, "mid"))]


def test_segmentation_is_generic_and_tiles():
    for sizes, window in (((16, 2, 1), 9), ((8, 2, 1), 9), ((4, 2, 2), 3), ((2, 16, 1), 9), ((5, 2, 1), 4)):
        segs = history_segments(sizes, window)
        total = 1 + sum(sizes)
        covered = [f for s in segs for a, b, _ in s.parts for f in range(a, b)]
        assert covered == list(range(total))  # parts tile [x0 | history] in order, no overlap
        assert all(s.stop - s.start == window for s in segs if s.name.startswith("window"))
        tail = [s for s in segs if s.name == "tail"]
        assert sum(s.stop - s.start for s in tail) == sum(sizes) % window
    assert [s.name for s in history_segments((8, 2, 1), 9)] == ["begin", "tail", "window0"]
    with pytest.raises(ValueError):
        history_segments((1, 1, 1), 4)  # a 3-frame tail does not fit in a 1-frame long term


def test_disabled_is_identity():
    x0, hist = _ones(2, h=4, w=4)
    x, h, applied = corrupt_history(x0, hist, AntiDriftConfig(corrupt_history=False), torch.Generator(), SIZES)
    assert x is x0 and h is hist and applied == {"clean": 1.0, "noise": 0.0, "blur": 0.0}
    with pytest.raises(ValueError):
        corrupt_history(x0, hist, AntiDriftConfig(mode="blur"), torch.Generator(), SIZES)


def test_noise_sigma_range_frame_independent():
    cfg = AntiDriftConfig(clean_prob=0.0)
    g = torch.Generator().manual_seed(0)
    x0, hist = _ones(8)
    sig = torch.cat([_sigma_hat(*corrupt_history(x0, hist, cfg, g, SIZES)[:2]) for _ in range(40)])
    # σ ~ U(0, 1/3) per sample and frame; estimation error ≈ σ/sqrt(4096) < 0.01
    assert sig.min() > -0.02 and sig.max() < 1 / 3 + 0.02
    assert sig.max() > 0.31 and sig.min() < 0.03
    assert sig.mean().item() == pytest.approx(1 / 6, abs=0.01)  # 6400 draws, sd of mean ≈ 0.0012
    # frame independent: the 9 frames of a window do not share one σ
    assert sig[:, 2:11].std(dim=1).min() > 0.01
    # inputs untouched
    assert hist.min() == 1 and x0.min() == 1


def test_noise_one_sigma_per_segment_part_when_not_frame_independent():
    cfg = AntiDriftConfig(clean_prob=0.0, frame_independent=False)
    x0, hist = _ones(16)
    sig = _sigma_hat(*corrupt_history(x0, hist, cfg, torch.Generator().manual_seed(1), SIZES)[:2])
    for a, b in ((2, 11), (11, 13), (13, 20)):
        assert sig[:, a:b].std(dim=1).max() < 0.01  # one σ inside a part
    assert (sig[:, 2] - sig[:, 13]).abs().max() > 0.01  # fresh draw per part
    assert sig[:, 2].std() > 0.03  # and per sample


def test_ratio_per_part_follows_the_official_assignment():
    # Only the mid ratio non-zero: exactly the last window's frames after its first `mid` ones
    # (x0-coordinates 13..19) change; the anchor (short ratio), tail and window0 (long) do not.
    cfg = AntiDriftConfig(clean_prob=0.0, noise_ratio_short=0.0, noise_ratio_long=0.0, noise_ratio_mid=0.5)
    x0, hist = _ones(4, h=8, w=8)
    x, h, _ = corrupt_history(x0, hist, cfg, torch.Generator().manual_seed(2), SIZES)
    changed = (torch.cat([x, h], 2) != 1).flatten(3).any(dim=(0, 1, 3))
    assert changed.tolist() == [False] * 13 + [True] * 7
    cfg = AntiDriftConfig(clean_prob=0.0, noise_ratio_short=0.5, noise_ratio_long=0.0, noise_ratio_mid=0.0)
    x, h, _ = corrupt_history(x0, hist, cfg, torch.Generator().manual_seed(2), SIZES)
    assert (x != 1).any() and torch.equal(h, hist)  # short ratio = the x0 anchor only


@pytest.mark.parametrize("mode", ["noise", "downsample"])
def test_zero_segments_stay_zero(mode):
    cfg = AntiDriftConfig(clean_prob=0.0, mode=mode)
    g = torch.Generator().manual_seed(3)
    x0, hist = torch.zeros(1, 4, 1, 16, 16), torch.randn(1, 4, 19, 16, 16, generator=g)
    hist[:, :, :10] = 0  # V2V drop of 10: tail + window0 are zero, window1 is not
    for _ in range(5):
        x, h, applied = corrupt_history(x0, hist, cfg, g, SIZES)
        assert applied[{"noise": "noise", "downsample": "blur"}[mode]] == 1.0
        assert torch.count_nonzero(x) == 0 and torch.count_nonzero(h[:, :, :10]) == 0
    assert not torch.equal(h[:, :, 10:], hist[:, :, 10:])
    # a partly zero window is corrupted as a whole
    hist2 = torch.ones(1, 4, 19, 16, 16)
    hist2[:, :, 12] = 0
    _, h2, _ = corrupt_history(torch.ones(1, 4, 1, 16, 16), hist2, AntiDriftConfig(clean_prob=0.0), g, SIZES)
    assert torch.count_nonzero(h2[:, :, 12]) > 0


def test_zero_test_is_batch_wide_officially_and_per_sample_as_option():
    g = torch.Generator().manual_seed(4)
    x0, hist = _ones(2, h=8, w=8)
    x0, hist = x0.clone(), hist.clone()
    x0[0], hist[0] = 0, 0  # sample 0 is a pure T2V sample (all zero), sample 1 is full
    _, h, _ = corrupt_history(x0, hist, AntiDriftConfig(clean_prob=0.0), g, SIZES)
    assert torch.count_nonzero(h[0]) > 0  # official quirk: the batch sum is non-zero, so it is noised
    _, h, _ = corrupt_history(x0, hist, AntiDriftConfig(clean_prob=0.0, per_sample=True), g, SIZES)
    assert torch.count_nonzero(h[0]) == 0 and (h[1] != 1).any()


def test_mode_probabilities_random():
    # P(clean) 0.1, P(noise) 0.9·0.9 = 0.81, P(blur) 0.09; n = 3000 calls, tolerance 0.025 (≥ 4.5 sd)
    cfg = AntiDriftConfig(mode="random")
    g = torch.Generator().manual_seed(5)
    x0, hist = _ones(1, c=1, h=4, w=4)
    tot = {"clean": 0.0, "noise": 0.0, "blur": 0.0}
    for _ in range(3000):
        x, h, applied = corrupt_history(x0, hist, cfg, g, SIZES)
        assert sum(applied.values()) == 1.0
        if applied["clean"]:
            assert torch.equal(h, hist) and torch.equal(x, x0)
        for k in tot:
            tot[k] += applied[k] / 3000
    assert tot["clean"] == pytest.approx(0.10, abs=0.025)
    assert tot["noise"] == pytest.approx(0.81, abs=0.035)
    assert tot["blur"] == pytest.approx(0.09, abs=0.025)


def test_clean_prob_per_sample():
    x0, hist = _ones(20000, c=1, h=1, w=1)
    _, _, applied = corrupt_history(x0, hist, AntiDriftConfig(per_sample=True), torch.Generator().manual_seed(6), SIZES)
    assert applied["clean"] == pytest.approx(0.10, abs=0.012)  # sd 0.0021
    assert applied["noise"] == pytest.approx(0.90, abs=0.012)


def test_blur_keeps_constants_and_changes_detail():
    cfg = AntiDriftConfig(clean_prob=0.0, mode="downsample")
    g = torch.Generator().manual_seed(7)
    x, h, _ = corrupt_history(*_ones(1, h=48, w=80), cfg, g, SIZES)
    assert torch.allclose(h, torch.ones_like(h), atol=1e-5) and torch.allclose(x, torch.ones_like(x), atol=1e-5)
    x0, hist = torch.randn(1, 4, 1, 48, 80, generator=g), torch.randn(1, 4, 19, 48, 80, generator=g)
    changed = 0
    for _ in range(5):
        _, h, _ = corrupt_history(x0, hist, cfg, g, SIZES)
        changed += int(not torch.allclose(h, hist, atol=1e-4))
        assert h.std() <= hist.std() + 1e-4  # low-pass: never adds energy
    assert changed >= 3  # r = 1 − tiny happens, but rarely


def _sat_cfg(**kw):
    return AntiDriftConfig(saturation=True, **kw)


def test_saturation_keeps_channel_mean_and_spares_the_anchor():
    g = torch.Generator().manual_seed(8)
    x0, hist = torch.randn(2, 16, 1, 6, 10, generator=g), torch.randn(2, 16, 19, 6, 10, generator=g)
    x, h, applied = add_saturation(x0, hist, _sat_cfg(saturation_clean_prob=0.0), g, SIZES)
    assert applied["saturation"] == 1.0
    assert torch.equal(x, x0)
    assert torch.allclose(h.mean(dim=1), hist.mean(dim=1), atol=1e-5)
    mu = hist.mean(dim=1, keepdim=True)
    ratio = ((h - mu) / (hist - mu))[0, 0, :, 0, 0]
    for a, b in ((0, 1), (1, 10), (10, 12), (12, 19)):  # history coordinates of tail / windows / parts
        seg = ratio[a:b]
        assert torch.allclose(seg, seg[0].expand_as(seg), atol=1e-4)  # one factor per part
        s = seg[0].item()
        assert 0.3 - 1e-4 <= s <= 1.7 + 1e-4 and abs(s - 1) >= 1e-3 - 1e-5


def test_saturation_noop_switches():
    g = torch.Generator().manual_seed(9)
    x0, hist = torch.randn(1, 4, 1, 4, 4, generator=g), torch.randn(1, 4, 19, 4, 4, generator=g)
    for cfg in (_sat_cfg(saturation_clean_prob=0.0, official_saturation_noop=True), AntiDriftConfig()):
        x, h, applied = add_saturation(x0, hist, cfg, g, SIZES)
        assert x is x0 and h is hist and applied == {"saturation": 0.0}
    _, h, _ = add_saturation(x0, hist, _sat_cfg(saturation_clean_prob=0.0), g, SIZES)
    assert not torch.allclose(h, hist)


def test_saturation_probabilities_and_zero_segments():
    g = torch.Generator().manual_seed(10)
    x0, hist = torch.randn(1, 4, 1, 2, 2, generator=g), torch.randn(1, 4, 19, 2, 2, generator=g)
    hist[:, :, :1] = 0  # tail zero
    kept, low, n = 0, 0, 0
    for _ in range(1000):
        _, h, _ = add_saturation(x0, hist, _sat_cfg(), g, SIZES)
        assert torch.count_nonzero(h[:, :, 0]) == 0
        mu = hist.mean(dim=1, keepdim=True)
        for a in (1, 10, 12):  # one frame from each of the three non-zero parts
            s = ((h - mu) / (hist - mu))[0, 0, a, 0, 0].item()
            n += 1
            kept += abs(s - 1) < 1e-6
            low += s < 1 - 1e-6
    # P(kept) 0.1 (sd 0.0055 over 3000), P(s < 1 | not kept) 0.5
    assert kept / n == pytest.approx(0.1, abs=0.025)
    assert low / (n - kept) == pytest.approx(0.5, abs=0.045)


def test_corrupt_target():
    g = torch.Generator().manual_seed(11)
    tgt = torch.ones(6, 4, 9, 32, 32)
    assert corrupt_target(tgt, AntiDriftConfig(), g) is tgt  # corrupt_model_input off
    cfg = AntiDriftConfig(corrupt_model_input=True, target_clean_prob=0.0)
    out = corrupt_target(tgt, cfg, g)
    sig = 1 - out.mean(dim=(1, 3, 4))  # [B, 9]
    assert sig.std(dim=1).max() < 0.01  # not frame independent by default: one σ per sample
    assert sig.min() > -0.02 and sig.max() < 1 / 3 + 0.02 and sig[:, 0].std() > 0.01
    out = corrupt_target(tgt, AntiDriftConfig(corrupt_model_input=True, target_mode="downsample"), g)
    assert torch.allclose(out, tgt, atol=1e-5)  # blur of a constant


def test_generator_only():
    x0, hist = torch.randn(2, 4, 1, 4, 4), torch.randn(2, 4, 19, 4, 4)
    cfg = AntiDriftConfig(mode="random", saturation=True)
    torch.manual_seed(12)
    ref = torch.rand(2)
    torch.manual_seed(12)
    a = corrupt_history(x0, hist, cfg, torch.Generator().manual_seed(1), SIZES)
    sa = add_saturation(a[0], a[1], cfg, torch.Generator().manual_seed(1), SIZES)
    assert torch.equal(torch.rand(2), ref)
    b = corrupt_history(x0, hist, cfg, torch.Generator().manual_seed(1), SIZES)
    sb = add_saturation(b[0], b[1], cfg, torch.Generator().manual_seed(1), SIZES)
    assert torch.equal(a[1], b[1]) and torch.equal(sa[1], sb[1]) and a[2] == b[2]
