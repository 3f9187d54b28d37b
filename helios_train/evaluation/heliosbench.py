"""HeliosBench metrics with the official definitions (github.com/PKU-YuanGroup/Helios, folder eval/, read at commit
2276f8f), re-implemented here from the facts of that code, not copied.

Computed here, no weights needed:
- motion amplitude, official eval/1_get_motion_amplitude.py (Farneback optical flow, OpenCV);
- the drift rule of eval/5_..8_get_drifting_*.py, |M(first 15 % of frames) - M(last 15 %)|, for any M you pass;
  the official four drifting metrics all need a model (see below), so `proxy_drifts` applies the same rule to
  weight-free M (brightness, saturation, motion energy, grid energy) — proxies, not official HeliosBench numbers.

Needing weights (or a paid API), behind a registry of plug-ins (`PLUGINS`) that never downloads anything:
aesthetic (CLIP ViT-L/14 + LAION aesthetic linear head, eval/0_get_aesthetic.py, drifting eval/5_...), motion
smoothness (AMT-S frame interpolation, eval/2_..., drifting eval/6_...), semantic (ViCLIP video-text similarity,
eval/3_..., drifting eval/7_...), naturalness (GPT-5.2 rating of sampled frames, eval/4_..., drifting eval/8_...).
A plug-in reports "skipped: <why>" unless its weights are on disk and a scorer for its model was registered.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from helios_train.evaluation.frame_metrics import as_video, brightness, grid_energy, motion_energy, saturation

EVAL_HEIGHT, EVAL_WIDTH = 384, 640  # official --height/--width defaults of every eval/ script
DRIFT_RATIO = 0.15  # official DRIFT_RATIO of eval/5_..8_get_drifting_*.py
# official eval/1_get_motion_amplitude.py, compute_farneback_optical_flow
FARNEBACK = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2,
             "flags": 0}
FLOW_MAP_WIDTH = 16  # official _downscale_maps(downscale_size=16), cv2.INTER_AREA
WEIGHTS_ENV = "HELIOSBENCH_WEIGHTS"  # folder laid out like the official eval/checkpoints/


def _cv2():
    try:
        import cv2
    except ImportError as e:  # only the optical-flow metric needs OpenCV
        raise ImportError("motion_amplitude needs OpenCV: pip install opencv-python-headless") from e
    return cv2


def eval_size(height: int, width: int, target_height: int = EVAL_HEIGHT, target_width: int = EVAL_WIDTH):
    """(height, width) a frame is resized to before scoring, by the official rule (eval/utils/utils.py load_video):
    keep the aspect ratio, fix the width to target_width when target_width > target_height (else the height to
    target_height), the other side int()-truncated, then both rounded to even. 64x64 -> 640x640."""
    aspect = width / height
    if target_width > target_height:
        w, h = target_width, int(target_width / aspect)
    else:
        h, w = target_height, int(target_height * aspect)
    return int(round(h / 2) * 2), int(round(w / 2) * 2)


def _grey_frames(video, height: int, width: int):
    """uint8 grey frames at the official evaluation size, one at a time (a long 384x640 video stays small)."""
    cv2 = _cv2()
    v = as_video(video)
    h, w = eval_size(v.shape[1], v.shape[2], height, width)
    for frame in v:
        if frame.dtype != np.uint8:
            frame = np.clip(np.round(frame * 255.0), 0, 255).astype(np.uint8)
        if frame.shape[:2] != (h, w):
            # guess: the official reader (video_reader-rs, ffmpeg scale) resizes while decoding, with its own
            # filter (bilinear family); OpenCV's bilinear is the nearest equivalent here
            frame = cv2.resize(np.ascontiguousarray(frame), (w, h), interpolation=cv2.INTER_LINEAR)
        yield cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def motion_amplitude(video, height: int = EVAL_HEIGHT, width: int = EVAL_WIDTH) -> float:
    """HeliosBench motion amplitude ("motion_fb"), as official eval/1_get_motion_amplitude.py computes it.

    Every frame (no sampling) is resized to `eval_size` (384x640-class) and turned grey (RGB2GRAY); Farneback
    flow between each consecutive pair with pyr_scale 0.5, levels 3, winsize 15, iterations 3, poly_n 5,
    poly_sigma 1.2, flags 0; each flow map [h, w, 2] is resized to width 16 (height int(h·16/w)) with INTER_AREA;
    the maps are averaged over time and then over every cell AND both components (dx and dy together), and the
    absolute value is taken. Units: pixels per frame at the evaluation size, signed before the abs: a video
    translating by (u, v) px/frame scores |u + v| / 2, motions in opposite directions cancel (an object bouncing
    back and forth scores ~0). ≥ 0, unbounded (HeliosBench's rating clips it to [0, 1]). 0 for < 2 frames.
    Needs OpenCV (opencv-python-headless)."""
    cv2 = _cv2()
    total, count, prev = None, 0, None
    for grey in _grey_frames(video, height, width):
        if prev is not None:
            flow = cv2.calcOpticalFlowFarneback(prev, grey, None, **FARNEBACK)
            h, w = flow.shape[:2]
            small = cv2.resize(flow, (FLOW_MAP_WIDTH, int(h * FLOW_MAP_WIDTH / w)), interpolation=cv2.INTER_AREA)
            total = small.astype(np.float64) if total is None else total + small
            count += 1
        prev = grey
    return 0.0 if count == 0 else abs(float(np.mean(total / count)))


def drift_windows(total_frames: int, ratio: float = DRIFT_RATIO, min_frames: int = 1) -> tuple[slice, slice]:
    """(start, end) frame slices: the first and last max(min_frames, int(total·ratio)) frames (official
    eval/5_get_drifting_aesthetic.py uses min_frames 1, eval/6_get_drifting_motion_smoothness.py 4)."""
    n = min(total_frames, max(min_frames, int(total_frames * ratio)))
    return slice(0, n), slice(total_frames - n, total_frames)


def drifting(video, metric: Callable[[np.ndarray], float], ratio: float = DRIFT_RATIO,
             min_frames: int = 1) -> dict[str, float]:
    """The official drift rule for any per-window metric M (frames -> float): {"drift": |M(start) - M(end)|,
    "start": M(first window), "end": M(last window)}; 0 for a video whose M does not change."""
    v = as_video(video)
    first, last = drift_windows(len(v), ratio, min_frames)
    start, end = float(metric(v[first])), float(metric(v[last]))
    return {"drift": abs(start - end), "start": start, "end": end}


# Weight-free M for the drift rule: NOT official HeliosBench metrics (those need models), proxies for what drifts.
PROXY_METRICS: dict[str, tuple[Callable[[np.ndarray], float], int]] = {  # name -> (M, min frames per window)
    "brightness": (lambda v: float(brightness(v).mean()), 1),  # mean BT.601 luma, 0..1
    "saturation": (lambda v: float(saturation(v).mean()), 1),  # mean HSV saturation, 0..1
    "motion_energy": (lambda v: float(motion_energy(v).mean()), 2),  # mean |frame difference|, 0..1
    "grid_energy": (lambda v: float(grid_energy(v).mean()), 1),  # 16-px lattice share of spatial power
}


def proxy_drifts(video, ratio: float = DRIFT_RATIO) -> dict[str, dict[str, float]]:
    """`drifting` of every PROXY_METRICS entry: {name: {"drift", "start", "end"}}."""
    return {name: drifting(video, m, ratio, n) for name, (m, n) in PROXY_METRICS.items()}


# name -> scorer(frames [F, H, W, 3] uint8, prompt or None, weights folder) -> M of those frames
_SCORERS: dict[str, Callable[[np.ndarray, Optional[str], Path], float]] = {}


@dataclass(frozen=True)
class Plugin:
    """A HeliosBench metric whose M needs a model: what it needs, and whether it can run here."""

    name: str  # official result key, e.g. "drifting_aesthetic"
    official: str  # the official script
    model: str  # what M is
    files: tuple[str, ...] = ()  # weights, relative to $HELIOSBENCH_WEIGHTS (the official checkpoints/ layout)
    drifting: bool = False  # |M(start window) - M(end window)| instead of M(video)
    min_frames: int = 1  # per drift window
    needs_prompt: bool = False
    network: bool = False  # M is a remote API call: never made here

    def missing(self, weights_dir=None) -> Optional[str]:
        """Why it cannot run (None when it can): weights absent, no scorer registered, or a network call."""
        if self.network:
            return f"{self.model} is a remote API call ({self.official}); this evaluation makes no network calls"
        root = weights_dir or os.environ.get(WEIGHTS_ENV)
        if not root:
            return f"needs {', '.join(self.files)} under ${WEIGHTS_ENV} (unset)"
        absent = [f for f in self.files if not (Path(root) / f).is_file()]
        if absent:
            return f"weights not found under {root}: {', '.join(absent)}"
        if self._scorer() is None:
            return f"weights present but no scorer registered for {self._scorer_key()!r} (register_scorer)"
        return None

    def available(self, weights_dir=None) -> bool:
        return self.missing(weights_dir) is None

    def _scorer_key(self) -> str:
        return self.name.removeprefix("drifting_")

    def _scorer(self):
        return _SCORERS.get(self._scorer_key())

    def evaluate(self, video, prompt: Optional[str] = None, weights_dir=None) -> dict:
        """{"value": M} or {"value": drift, "start", "end"}; {"skipped": "<why>"} when it cannot run."""
        why = self.missing(weights_dir) or (
            "needs the video's prompt" if self.needs_prompt and prompt is None else None)
        if why:
            return {"skipped": why}
        root, scorer = Path(weights_dir or os.environ[WEIGHTS_ENV]), self._scorer()

        def score(frames):
            return scorer(frames, prompt, root)

        if not self.drifting:
            return {"value": float(score(as_video(video)))}
        d = drifting(video, score, DRIFT_RATIO, self.min_frames)
        return {"value": d["drift"], "start": d["start"], "end": d["end"]}


def register_scorer(metric: str, scorer: Callable[[np.ndarray, Optional[str], Path], float]) -> None:
    """Supply M for "aesthetic", "motion_smoothness" or "semantic" (it serves the drifting plug-in too):
    scorer(frames [F, H, W, 3] of the video or of one drift window, prompt, weights folder) -> float, in the
    official units (the semantic scorer samples its own 8 frames, as eval/3_ and eval/7_ do)."""
    known = sorted({p._scorer_key() for p in PLUGINS.values() if not p.network})
    if metric not in known:
        raise KeyError(f"no plug-in takes a scorer named {metric!r}; expected one of {known}")
    _SCORERS[metric] = scorer


_AESTHETIC = ("aesthetic_model/ViT-L-14.pt", "aesthetic_model/sa_0_4_vit_l_14_linear.pth")
_AMT = ("amt_model/amt-s.pth", "AMT-S.yaml")
_VICLIP = ("ViCLIP/ViClip-InternVid-10M-FLT.pth", "ViCLIP/bpe_simple_vocab_16e6.txt.gz")
_AESTHETIC_M = "CLIP ViT-L/14 image features (L2-normalised) -> LAION aesthetic linear head, / 10, mean over frames"
_AMT_M = ("AMT-S interpolates the even frames; (255 - mean |odd frame - interpolated|) / 255")
_VICLIP_M = "ViCLIP cosine similarity of 8 frames (224 px, CLIP normalisation) with the prompt"
_GPT_M = "GPT-5.2 (gpt-5.2-2025-12-11) rates sampled frames 1..5 as real vs AI, mapped to (s - 1) / 4"

PLUGINS: dict[str, Plugin] = {p.name: p for p in (
    Plugin("aesthetic", "eval/0_get_aesthetic.py", _AESTHETIC_M, _AESTHETIC),
    Plugin("motion_smoothness", "eval/2_get_motion_smoothness.py", _AMT_M, _AMT),
    Plugin("semantic", "eval/3_get_semantic.py", _VICLIP_M, _VICLIP, needs_prompt=True),
    Plugin("naturalness", "eval/4_get_naturalness.py", _GPT_M, network=True),
    Plugin("drifting_aesthetic", "eval/5_get_drifting_aesthetic.py", _AESTHETIC_M, _AESTHETIC, drifting=True),
    Plugin("drifting_motion_smoothness", "eval/6_get_drifting_motion_smoothness.py", _AMT_M, _AMT, drifting=True,
           min_frames=4),
    Plugin("drifting_semantic", "eval/7_get_drifting_semantic.py", _VICLIP_M, _VICLIP, drifting=True,
           needs_prompt=True),
    Plugin("drifting_naturalness", "eval/8_get_drifting_naturalness.py", _GPT_M, drifting=True, network=True),
)}


def evaluate_plugins(video, prompt: Optional[str] = None, weights_dir=None) -> dict[str, dict]:
    """Every plug-in on one video: {name: {"value": ...} or {"skipped": "<why>"}}. Nothing is downloaded."""
    return {name: p.evaluate(video, prompt, weights_dir) for name, p in PLUGINS.items()}
