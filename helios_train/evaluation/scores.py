"""Scores of one rollout against its ground truth, per chunk: what the evaluation's tables and plots are made of.

Continuation: PSNR / SSIM of generated chunk k against the clip's chunk k + 1 (frame by frame, averaged).
Distribution: brightness, saturation, colour-histogram distance to the ground truth, motion energy, energy at the
16-px patch period (grid artifacts), the jump across each chunk boundary (helios_train/evaluation/frame_metrics.py).
Prompt adherence: the tracker's score of what the video shows against what its caption says
(helios_train/evaluation/tracker.py; miniature captions only). HeliosBench: motion amplitude and the drifting
metrics that need no weights (helios_train/evaluation/heliosbench.py).
"""
from __future__ import annotations

import numpy as np

from helios_train.data.miniature_world import CHUNK_FRAMES, parse_caption
from helios_train.evaluation import frame_metrics as fm
from helios_train.evaluation.continuation import chunk_pairs


def continuation_scores(generated: np.ndarray, truth: np.ndarray, chunks: int) -> dict[str, list[float]]:
    """Per chunk index k (0 = the first generated chunk): mean PSNR (dB) and SSIM against the ground truth."""
    pairs = chunk_pairs(generated, truth, chunks)
    return {"psnr": [float(np.mean(np.minimum(fm.psnr(g, t), 100.0))) for g, t in pairs],
            "ssim": [float(np.mean(fm.ssim(g, t))) for g, t in pairs]}


def distribution_scores(generated: np.ndarray, truth: np.ndarray, chunks: int) -> dict[str, list[float]]:
    """Per generated chunk: brightness, saturation (means), histogram distance to the true chunk, motion energy,
    grid energy; and per boundary between consecutive generated chunks, the jump ratio (≈ 1 when seamless)."""
    out: dict[str, list[float]] = {k: [] for k in ("brightness", "saturation", "histogram_distance", "motion",
                                                   "grid")}
    for g, t in chunk_pairs(generated, truth, chunks):
        out["brightness"].append(float(fm.brightness(g).mean()))
        out["saturation"].append(float(fm.saturation(g).mean()))
        out["histogram_distance"].append(float(fm.histogram_distance(fm.colour_histogram(g), fm.colour_histogram(t))))
        out["motion"].append(float(fm.motion_energy(g).mean()) if len(g) > 1 else 0.0)
        out["grid"].append(float(fm.grid_energy(g).mean()))
    out["boundary_jump"] = [float(x) for x in fm.chunk_boundary_jumps(generated[:chunks * CHUNK_FRAMES])]
    return out


def adherence_scores(video: np.ndarray, caption: str) -> dict | None:
    """Per chunk tracker verdicts for a caption of the miniature's grammar; None for any other caption."""
    from helios_train.evaluation.tracker import adherence

    attributes = parse_caption(caption)
    return None if attributes is None else adherence(video, attributes)


def heliosbench_scores(video: np.ndarray) -> dict:
    """HeliosBench's weight-free numbers for one video (motion amplitude, drifting of the proxy metrics)."""
    from helios_train.evaluation.heliosbench import motion_amplitude, proxy_drifts

    return {"motion_amplitude": float(motion_amplitude(video)), "drifting": proxy_drifts(video)}


def mean_curves(rows: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Element-wise mean over clips of per-chunk curves (clips may have fewer entries at the end)."""
    keys = rows[0].keys() if rows else []
    out = {}
    for key in keys:
        length = max(len(r[key]) for r in rows)
        out[key] = [float(np.mean([r[key][i] for r in rows if len(r[key]) > i])) for i in range(length)]
    return out
