"""The evaluation metrics (helios_train/evaluation/): signal metrics against hand-computed values, the miniature
world's tracker against ground truth (and wrong captions), HeliosBench motion amplitude in the official units, the
drift rule, and the weight plug-ins that skip instead of downloading."""
from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np
import pytest

from helios_train.data.miniature_world import (CHUNK_FRAMES, COLOURS, parse_caption, render, split_clips,
                                               states)
from helios_train.evaluation import frame_metrics as fm
from helios_train.evaluation import heliosbench as hb
from helios_train.evaluation import tracker

RNG = np.random.default_rng(0)


def _smooth_frame(h: int, w: int) -> np.ndarray:
    """A float RGB frame (0..255) with a vertical gradient and a soft blob: no edges, no texture."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    luma = 40 + 120 * yy / h + 60 * np.exp(-((xx - 0.6 * w) ** 2 + (yy - 0.4 * h) ** 2) / (2 * (h / 6) ** 2))
    return np.repeat(luma[..., None], 3, axis=-1)


def _texture(h: int, w: int, cutoff: float = 0.25) -> np.ndarray:
    """A periodic band-limited random texture (0..255 float): np.roll moves it without a seam."""
    spectrum = np.fft.fft2(RNG.normal(size=(h, w)))
    f2 = np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2
    tex = np.real(np.fft.ifft2(spectrum * np.exp(-f2 / (2 * cutoff ** 2))))
    return (tex - tex.min()) / (tex.max() - tex.min()) * 200 + 25


def _grey_video(frames) -> np.ndarray:
    return np.repeat(np.asarray(frames)[..., None], 3, axis=-1).round().astype(np.uint8)


# --- frame metrics ---------------------------------------------------------------------------------------------

def test_psnr_identical_is_inf_and_a_constant_offset_gives_the_closed_form():
    a = RNG.integers(0, 246, (3, 16, 20, 3)).astype(np.uint8)
    assert np.all(np.isinf(fm.psnr(a, a)))
    expected = 10 * math.log10(255 ** 2 / 10 ** 2)  # every pixel off by 10 grey levels: MSE = 100
    assert fm.psnr(a, a + 10) == pytest.approx([expected] * 3, abs=1e-6)
    assert fm.psnr(a / 255.0, (a + 10) / 255.0) == pytest.approx([expected] * 3, abs=1e-4)  # float: range 1.0


def test_ssim_is_one_for_identical_symmetric_and_falls_with_noise():
    a = _grey_video([_texture(48, 48, 0.1)] * 2)
    assert fm.ssim(a, a) == pytest.approx([1.0, 1.0], abs=1e-5)
    noisy = [np.clip(a + RNG.normal(0, s, a.shape), 0, 255).astype(np.uint8) for s in (4, 16, 48)]
    scores = [float(fm.ssim(a, n)[0]) for n in noisy]
    assert scores[0] > scores[1] > scores[2] and scores[0] < 0.999 and scores[2] < 0.6
    assert fm.ssim(a, noisy[1]) == pytest.approx(fm.ssim(noisy[1], a), abs=1e-6)


def test_ssim_of_two_flat_frames_is_the_luminance_term():
    a, b = np.full((1, 20, 24, 3), 100, np.uint8), np.full((1, 20, 24, 3), 150, np.uint8)
    mu_a, mu_b, c1 = 100 / 255, 150 / 255, (0.01 * 1.0) ** 2  # no variance: the structure term is C2/C2 = 1
    assert fm.ssim(a, b)[0] == pytest.approx((2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1), abs=1e-6)


def test_ssim_of_one_11x11_window_matches_the_formula_by_hand():
    a, b = RNG.integers(0, 256, (2, 1, 11, 11, 3)).astype(np.uint8)
    x = np.arange(11) - 5.0
    g = np.exp(-x ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2, per_channel = 0.01 ** 2, 0.03 ** 2, []
    for ch in range(3):
        p, q = a[0, ..., ch] / 255.0, b[0, ..., ch] / 255.0
        mp, mq = (w * p).sum(), (w * q).sum()
        vp, vq, cov = (w * (p - mp) ** 2).sum(), (w * (q - mq) ** 2).sum(), (w * (p - mp) * (q - mq)).sum()
        per_channel.append((2 * mp * mq + c1) * (2 * cov + c2) / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2)))
    assert fm.ssim(a, b)[0] == pytest.approx(np.mean(per_channel), abs=1e-5)


def test_brightness_and_saturation_of_known_colours():
    frames = np.zeros((3, 4, 4, 3), np.uint8)
    frames[0] = (255, 0, 0)
    frames[1] = 128
    assert fm.brightness(frames) == pytest.approx([0.299, 128 / 255, 0.0], abs=1e-6)
    assert fm.saturation(frames) == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)  # black: 0, not NaN
    assert fm.brightness(frames / 255.0) == pytest.approx(fm.brightness(frames), abs=1e-6)
    half = np.full((1, 2, 2, 3), (200, 100, 100), np.uint8)
    assert fm.saturation(half)[0] == pytest.approx(0.5)


def test_colour_histogram_and_its_total_variation_distance():
    red, blue = np.zeros((2, 4, 8, 3), np.uint8), np.zeros((2, 4, 8, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    h_red, h_blue = fm.colour_histogram(red), fm.colour_histogram(blue)
    assert h_red.shape == (16 ** 3,) and h_red.sum() == pytest.approx(1.0) and h_red[15 * 256] == 1.0
    mixed = red.copy()
    mixed[:, :, :4] = blue[:, :, :4]  # half the pixels blue
    assert fm.histogram_distance(h_red, h_red) == 0.0
    assert fm.histogram_distance(h_red, h_blue) == pytest.approx(1.0)
    assert fm.histogram_distance(h_red, fm.colour_histogram(mixed)) == pytest.approx(0.5)


def test_motion_energy_of_static_and_flipping_frames():
    v = np.zeros((40, 6, 6, 3), np.uint8)  # more than one conversion block of frames
    assert np.all(fm.motion_energy(v) == 0) and len(fm.motion_energy(v)) == 39
    v[1::2, :3] = 255  # half of every other frame flips black <-> white
    assert fm.motion_energy(v) == pytest.approx([0.5] * 39)


@pytest.mark.parametrize("size", [(64, 64), (96, 160)])
def test_grid_energy_is_low_for_a_smooth_frame_and_rises_with_a_faint_16px_grid(size):
    h, w = size
    frame = _smooth_frame(h, w)
    yy, xx = np.mgrid[0:h, 0:w]
    grid = ((yy % 16 == 0) | (xx % 16 == 0))[..., None] * 4.0  # 4 grey levels on every 16th row and column
    clean = fm.grid_energy(frame.round().astype(np.uint8))[0]
    gridded = fm.grid_energy((frame + grid).round().astype(np.uint8))[0]
    assert clean < 3e-4 and gridded > 4 * clean
    off_period = ((yy % 13 == 0) | (xx % 13 == 0))[..., None] * 4.0  # a 13-px grid is not the 16-px lattice
    assert fm.grid_energy((frame + off_period).round().astype(np.uint8))[0] < 0.5 * gridded
    pure = fm.grid_energy(_grey_video(((yy % 16 == 0) | (xx % 16 == 0)) * 200.0))[0]
    assert 0.35 < pure < 0.5  # the Hann window's 3x3 spread, as documented


def test_chunk_boundary_jumps_are_one_when_seamless_and_large_at_a_seam():
    tex = _texture(24, 40, cutoff=0.05)  # smooth enough that a bigger step makes a bigger difference
    smooth = _grey_video([np.roll(tex, t, axis=1) for t in range(3 * CHUNK_FRAMES)])
    assert fm.chunk_boundary_jumps(smooth) == pytest.approx([1.0, 1.0], abs=0.05)
    seam = _grey_video([np.roll(tex, t + (12 if t >= CHUNK_FRAMES else 0), axis=1) for t in range(3 * CHUNK_FRAMES)])
    jumps = fm.chunk_boundary_jumps(seam)  # chunk 1 starts 12 px further on: a seam at boundary 0 only
    assert jumps[0] > 3 and jumps[1] == pytest.approx(1.0, abs=0.05)
    assert fm.chunk_boundary_jumps(np.zeros((70, 8, 8, 3), np.uint8)) == pytest.approx([1.0, 1.0])  # eps: not 0/0


def test_per_chunk_averages_each_chunk_and_the_short_tail():
    assert fm.per_chunk(np.arange(70.0)) == pytest.approx([16.0, 49.0, 67.5])


# --- tracker ---------------------------------------------------------------------------------------------------

def _chunks_of(clip, chunk_ids=(0, 5, 11)) -> np.ndarray:
    """Whole chunks from the start, middle and end of a clip (bounces, colour cycles and pulses at every phase)."""
    return render(clip, np.concatenate([np.arange(k * CHUNK_FRAMES, (k + 1) * CHUNK_FRAMES) for k in chunk_ids]))


def test_tracker_scores_every_attribute_of_ground_truth_clips():
    clips = split_clips("heldout", 20)  # held-out: includes the combinations training never sees
    for clip in clips:
        result = tracker.adherence(_chunks_of(clip), parse_caption(clip.caption()))
        assert result["accuracy"] == {a: 1.0 for a in tracker.ATTRIBUTES}, clip.caption()
        assert result["score"] == 1.0
    clip = next(c for c in clips if c.shape != "triangle")  # a triangle's centroid is not its centre
    frames = np.arange(0, 60, 3)
    t, s = tracker.track(render(clip, frames)), states(clip, frames)
    assert np.abs(t["x"] - s["x"]).max() < 0.5 and np.abs(t["y"] - s["y"]).max() < 0.5


def test_tracker_measures_area_and_fill_close_to_the_truth():
    for clip in split_clips("heldout", 8):
        frames = np.arange(0, 99, 3)
        t, s = tracker.track(render(clip, frames)), states(clip, frames)
        side = 1.8 * s["radius"]  # the square's half-side and the triangle's base and height scale with 0.9 r
        true_area = {"circle": np.pi * s["radius"] ** 2, "square": side ** 2, "triangle": 0.5 * side ** 2}[clip.shape]
        assert 0.92 < np.mean(t["area"] / true_area) < 1.08, clip.caption()
        assert abs(np.median(t["fill"]) - tracker.FILL_RATIOS[clip.shape]) < 0.1, clip.caption()


def test_tracker_copes_with_a_steep_vertical_gradient_and_noise():
    for clip in split_clips("heldout", 6):
        steep = dataclasses.replace(clip, background="gray", background2="black")  # the widest-ranging gradient
        video = _chunks_of(steep, (0, 6))
        noisy = np.clip(video + RNG.normal(0, 8, video.shape), 0, 255).astype(np.uint8)
        for v in (video, noisy):
            accuracy = tracker.adherence(v, parse_caption(steep.caption()))["accuracy"]
            assert accuracy == {a: 1.0 for a in tracker.ATTRIBUTES}, steep.caption()


def test_tracker_rejects_the_attributes_another_caption_gets_wrong():
    clips = split_clips("train", 30)
    checked = set()
    for a in clips:
        video = _chunks_of(a, (2, 7))
        for b in clips:
            wrong = parse_caption(b.caption())
            accuracy = tracker.adherence(video, wrong)["accuracy"]
            if a.colour2 is None and b.colour2 is None and a.colour != b.colour:
                assert accuracy["colour"] == 0.0, (a.caption(), b.caption())
                checked.add("colour")
            if a.motion != b.motion:
                assert accuracy["motion"] == 0.0, (a.caption(), b.caption())
                checked.add("motion")
            if a.shape != b.shape:
                assert accuracy["shape"] == 0.0, (a.caption(), b.caption())
                checked.add("shape")
            if a.speed != b.speed and a.motion == b.motion:
                assert accuracy["speed"] == 0.0, (a.caption(), b.caption())
                checked.add("speed")
        if len(checked) == 4:
            break
    assert checked == {"colour", "motion", "shape", "speed"}


def test_a_blank_background_is_not_found():
    clip = split_clips("train", 1)[0]
    for background in (np.full((40, 64, 64, 3), (18, 24, 80), np.uint8),
                       np.repeat(np.linspace(12, 100, 64)[None, :, None, None], 40, 0).repeat(64, 2).repeat(3, 3)):
        result = tracker.adherence(background.astype(np.uint8), parse_caption(clip.caption()))
        assert not tracker.track(background.astype(np.uint8))["found"].any()
        assert result["score"] == 0.0 and all(not c["found"] for c in result["chunks"])
    yy, xx = np.mgrid[0:64, 0:64]
    smudge = np.full((4, 64, 64, 3), 60.0) + 12.0 * (((yy - 20) ** 2 + (xx - 40) ** 2) < 100)[..., None]
    assert not tracker.track(smudge.astype(np.uint8))["found"].any()  # 12 grey levels: a smudge, not an object


def test_a_colour_cycle_accepts_its_mix_and_rejects_other_colours():
    mix = (np.array(COLOURS["red"]) + np.array(COLOURS["cyan"])) / 2
    assert tracker.colour_matches(mix, "red", "cyan") and tracker.colour_matches(COLOURS["cyan"], "red", "cyan")
    assert not tracker.colour_matches(COLOURS["green"], "red", "cyan")
    assert tracker.colour_matches(COLOURS["red"], "red") and not tracker.colour_matches(COLOURS["orange"], "red")


# --- HeliosBench -----------------------------------------------------------------------------------------------

def test_eval_size_follows_the_official_resize_rule():
    assert hb.eval_size(64, 64) == (640, 640)
    assert hb.eval_size(384, 640) == (384, 640) and hb.eval_size(96, 160) == (384, 640)
    assert hb.eval_size(720, 1280) == (360, 640) and hb.eval_size(640, 384) == (1066, 640)
    assert hb.eval_size(33, 100) == (212, 640)  # int(211.2) = 211, rounded to even


def test_motion_amplitude_is_zero_when_static_and_half_the_speed_when_translating():
    tex = _texture(96, 160)  # scored at 384x640: 4x, so 1 px/frame here is 4 px/frame there
    static = _grey_video([tex] * 4)
    assert hb.motion_amplitude(static) < 0.01
    moving = _grey_video([np.roll(tex, t, axis=1) for t in range(5)])
    # official units: flow in px/frame at the evaluation size, averaged over dx and dy together: (4 + 0) / 2
    assert hb.motion_amplitude(moving) == pytest.approx(2.0, rel=0.1)
    assert hb.motion_amplitude(moving[::-1]) == pytest.approx(2.0, rel=0.1)  # |signed mean|: direction drops out


def test_motion_amplitude_names_the_package_when_opencv_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
    with pytest.raises(ImportError, match="opencv-python-headless"):
        hb.motion_amplitude(np.zeros((2, 8, 8, 3), np.uint8))


def test_drift_is_zero_for_a_constant_video_and_positive_when_it_brightens():
    assert hb.drift_windows(100) == (slice(0, 15), slice(85, 100))
    assert hb.drift_windows(10, min_frames=4) == (slice(0, 4), slice(6, 10))
    constant = np.full((100, 8, 8, 3), 90, np.uint8)
    assert all(d["drift"] == 0.0 for d in hb.proxy_drifts(constant).values())
    ramp = np.linspace(50, 200, 100).round()
    brightening = np.broadcast_to(ramp[:, None, None, None], (100, 8, 8, 3)).astype(np.uint8)
    d = hb.drifting(brightening, lambda v: float(fm.brightness(v).mean()))
    assert d["drift"] == pytest.approx((ramp[85:].mean() - ramp[:15].mean()) / 255, abs=1e-6) and d["drift"] > 0.4
    assert hb.proxy_drifts(brightening)["brightness"] == pytest.approx(d)


def test_weight_plugins_skip_with_a_reason_until_weights_and_a_scorer_exist(monkeypatch, tmp_path):
    monkeypatch.delenv(hb.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(hb, "_SCORERS", {})
    video = np.broadcast_to(np.linspace(50, 200, 40)[:, None, None, None], (40, 8, 8, 3)).astype(np.uint8)
    results = hb.evaluate_plugins(video, "a prompt")
    assert set(results) == {"aesthetic", "motion_smoothness", "semantic", "naturalness", "drifting_aesthetic",
                            "drifting_motion_smoothness", "drifting_semantic", "drifting_naturalness"}
    assert all(set(r) == {"skipped"} for r in results.values())
    assert hb.WEIGHTS_ENV in results["drifting_aesthetic"]["skipped"]
    for f in hb.PLUGINS["aesthetic"].files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"")
    monkeypatch.setenv(hb.WEIGHTS_ENV, str(tmp_path))
    assert "no scorer" in hb.PLUGINS["aesthetic"].evaluate(video)["skipped"]
    assert "not found" in hb.PLUGINS["semantic"].evaluate(video, "a prompt")["skipped"]
    hb.register_scorer("aesthetic", lambda frames, prompt, root: float(fm.brightness(frames).mean()))
    assert hb.PLUGINS["aesthetic"].available() and not hb.PLUGINS["naturalness"].available()
    drift = hb.PLUGINS["drifting_aesthetic"].evaluate(video)
    assert drift["value"] == pytest.approx(abs(drift["end"] - drift["start"])) and drift["value"] > 0.3
    assert "network" in hb.PLUGINS["drifting_naturalness"].evaluate(video)["skipped"]
    with pytest.raises(KeyError):
        hb.register_scorer("naturalness", lambda *a: 0.0)
