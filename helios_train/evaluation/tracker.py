"""Prompt adherence in the miniature world (helios_train/data/miniature_world.py): find the one object in each frame
and check, chunk by chunk, that what it shows is what the caption says — colour, shape, motion axis and speed.

Only for miniature-world videos: one object on a plain or vertical-gradient background. The background is
estimated per frame and per row (the median colour of each row: the object covers under half a row, and a
vertical gradient is constant along a row); object pixels are those far from it in RGB, found in two passes
(`_masks`) so that noise up to σ ≈ 15 grey levels is tolerated and the outline is unbiased. Shapes rely on the
fill ratio of a few-pixel object: blur beyond ~1 px rounds corners and starts to confuse them.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from helios_train.data.miniature_world import CHUNK_FRAMES, COLOURS, MOTIONS, SPEEDS

FOREGROUND_DISTANCE = 30.0  # RGB distance (of 441) from the background; the world's closest pair is ~50 apart
MIN_AREA_SHARE = 0.002  # of the frame (8 px at 64x64): fewer foreground pixels = not found
FILL_RATIOS = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding-box area
SPEED_LEVELS = {"still": 0.0, **SPEEDS}  # px/frame along a moving axis
MOVING = 0.5 * SPEEDS["slowly"]  # px/frame: an axis faster than half the slow speed moves
LAG = 4  # frames per speed step: centroid jitter weighs 1/4 as much; a bounce inside a step shortens few steps
ATTRIBUTES = ("found", "colour", "shape", "motion", "speed")


def _background(v: np.ndarray) -> np.ndarray:
    """Per-frame, per-row median colour [F, H, 1, 3]."""
    return np.median(v, axis=2, keepdims=True)


def _neighbours(mask: np.ndarray) -> np.ndarray:
    """How many of each pixel's 8 neighbours are set (frame borders count as unset)."""
    p = np.pad(mask, ((0, 0), (1, 1), (1, 1))).astype(np.int8)
    h, w = mask.shape[1:]
    return sum(p[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
               if dy or dx)


def _rgb255(video) -> np.ndarray:
    """float32 RGB [F, H, W, 3] on the 0..255 scale (a float video is taken as [0, 1])."""
    v = np.asarray(video)
    v = v[None] if v.ndim == 3 else v
    return v.astype(np.float32) if v.dtype == np.uint8 else v.astype(np.float32) * 255.0


def _interior_colour(v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean RGB [F, 3] of the mask's pixels whose 8 neighbours are all set (the whole mask when none are):
    the anti-aliased rim, a mix with the background, is left out."""
    interior = mask & (_neighbours(mask) == 8)
    use = np.where(interior.any(axis=(1, 2))[:, None, None], interior, mask)
    return (v * use[..., None]).sum(axis=(1, 2)) / np.maximum(use.sum(axis=(1, 2)), 1)[:, None]


def _masks(v: np.ndarray, background_rgb, distance: float) -> tuple[np.ndarray, np.ndarray]:
    """(object pixels [F, H, W], interior colour [F, 3]) in two passes. 1. Locate: pixels farther from the
    background than `distance` or 4x the frame's median distance (noise adapts it), kept where ≥ 5 of their 3x3
    block are set (a majority filter: drops speckle). 2. Outline: within one pixel of that, pixels at least half
    way from the background to the object's interior colour — the shape's true edge on an anti-aliased render,
    so area and bounding box are unbiased (a low fixed threshold fattens small shapes: triangles look round)."""
    bg = _background(v) if background_rgb is None else np.broadcast_to(
        np.asarray(background_rgb, np.float32).reshape(1, 1, 1, 3), (len(v), 1, 1, 3))
    d = np.sqrt(((v - bg) ** 2).sum(axis=-1))
    located = d > np.maximum(distance, 4.0 * np.median(d, axis=(1, 2), keepdims=True))
    located &= _neighbours(located) + 1 >= 5
    colour = _interior_colour(v, located)
    contrast = np.sqrt(((colour[:, None, None, :] - bg) ** 2).sum(axis=-1))  # [F, H, 1]: per row
    near = located | (_neighbours(located) > 0)
    outline = near & (d >= 0.5 * contrast)
    return outline, _interior_colour(v, outline)


def foreground(video, background_rgb=None, distance: float = FOREGROUND_DISTANCE) -> np.ndarray:
    """Object pixels [F, H, W] bool (see `_masks`): the background is `background_rgb` or each row's median colour;
    `distance` is the RGB distance (0..255 scale) that first marks a pixel as object."""
    return _masks(_rgb255(video), background_rgb, distance)[0]


def _extent(any_set: np.ndarray) -> np.ndarray:
    """Length of the span from the first to the last set entry along the last axis (0 when none)."""
    n = any_set.shape[-1]
    first, last = np.argmax(any_set, axis=-1), n - 1 - np.argmax(any_set[..., ::-1], axis=-1)
    return np.where(any_set.any(axis=-1), last - first + 1, 0)


def track(video, background_rgb=None) -> dict[str, np.ndarray]:
    """The object in each frame of a miniature video ([F, H, W, 3] uint8, or float in [0, 1]).

    Returns per-frame arrays: "found" bool (object pixels ≥ 0.2 % of the frame); and, NaN where not found, "x",
    "y" centroid in pixels (pixel centres at +0.5, as `states` gives them), "area" in pixels, "colour" [F, 3] mean
    RGB 0..255 of the object's interior, "fill" = area / bounding-box area (circle ≈ π/4, square ≈ 1,
    triangle ≈ 0.5)."""
    v = _rgb255(video)
    mask, colour = _masks(v, background_rgb, FOREGROUND_DISTANCE)
    _, h, w = mask.shape
    area = mask.sum(axis=(1, 2)).astype(np.float64)
    found = area >= max(1.0, MIN_AREA_SHARE * h * w)
    safe = np.where(found, area, np.nan)
    x = (mask.sum(axis=1) * (np.arange(w) + 0.5)).sum(axis=1) / safe
    y = (mask.sum(axis=2) * (np.arange(h) + 0.5)).sum(axis=1) / safe
    fill = area / np.maximum(_extent(mask.any(axis=1)) * _extent(mask.any(axis=2)), 1)
    colour[~found] = np.nan
    return {"found": found, "x": x, "y": y, "area": safe, "colour": colour, "fill": np.where(found, fill, np.nan)}


def colour_matches(rgb, colour: str, colour2: Optional[str] = None) -> bool:
    """True when `rgb` is nearer to the caption's colour than to any other colour of the world; for a cycling
    object (colour2) when it is nearer to the segment colour..colour2 (either end or a mix) than to any other."""
    rgb = np.asarray(rgb, np.float64)
    c0 = np.array(COLOURS[colour], np.float64)
    if colour2 is None:
        own = np.linalg.norm(rgb - c0)
    else:
        c1 = np.array(COLOURS[colour2], np.float64)
        t = np.clip(np.dot(rgb - c0, c1 - c0) / np.dot(c1 - c0, c1 - c0), 0.0, 1.0)
        own = np.linalg.norm(rgb - (c0 + t * (c1 - c0)))
    others = [np.linalg.norm(rgb - np.array(c, np.float64)) for n, c in COLOURS.items() if n not in (colour, colour2)]
    return bool(own < min(others))


def nearest(value: float, levels: dict[str, float]) -> Optional[str]:
    """The name of the level nearest to `value` (None for NaN)."""
    return None if not np.isfinite(value) else min(levels, key=lambda k: abs(levels[k] - value))


def axis_speeds(x: np.ndarray, y: np.ndarray, lag: int = LAG) -> tuple[float, float]:
    """Mean |displacement| per frame along x and along y over `lag`-frame steps whose two ends were found (NaN
    where no step fits). Path length, not net displacement: a bounce reverses the direction, not the speed."""
    lag = max(1, min(lag, len(x) - 1))
    dx, dy = np.abs(x[lag:] - x[:-lag]) / lag, np.abs(y[lag:] - y[:-lag]) / lag
    ok = np.isfinite(dx) & np.isfinite(dy)
    return (float(dx[ok].mean()), float(dy[ok].mean())) if ok.any() else (math.nan, math.nan)


def _chunk_verdict(t: dict, attributes: dict) -> dict:
    """The five checks for one chunk's slice `t` of a track, and what they measured."""
    found = t["found"]
    measured = {"found_fraction": float(found.mean()) if len(found) else 0.0}
    if not found.any():
        return {**{a: False for a in ATTRIBUTES}, "score": 0.0, "measured": measured}
    colour_ok = [colour_matches(c, attributes["colour"], attributes.get("colour2")) for c in t["colour"][found]]
    fill = float(np.median(t["fill"][found]))
    sx, sy = axis_speeds(t["x"], t["y"])
    ax, ay = MOTIONS[attributes["motion"]]
    moves = (sx > MOVING, sy > MOVING)  # NaN compares False: no measurable step = no motion
    along = [s for s, a in ((sx, ax), (sy, ay)) if a]
    speed = float(np.mean(along))
    verdict = {"found": measured["found_fraction"] >= 0.5,
               "colour": sum(colour_ok) > len(colour_ok) / 2,
               "shape": nearest(fill, FILL_RATIOS) == attributes["shape"],
               "motion": moves == (bool(ax), bool(ay)),
               "speed": nearest(speed, SPEED_LEVELS) == attributes["speed"]}
    measured.update(colour=[float(c) for c in np.nanmean(t["colour"], axis=0)], fill=fill, speed_x=sx, speed_y=sy,
                    speed=speed)
    return {**verdict, "score": float(np.mean([verdict[a] for a in ATTRIBUTES])), "measured": measured}


def adherence(video, attributes: dict, chunk: int = CHUNK_FRAMES, background_rgb=None) -> dict:
    """How well a miniature video follows its caption, chunk by chunk. `attributes` = parse_caption(caption).

    Per chunk of `chunk` frames: "found" (object found in ≥ half the frames), "colour" (most frames' object colour
    nearest the caption's colour, or on the colour..colour2 segment for a cycling object), "shape" (median fill
    ratio nearest the caption shape's), "motion" (the axes moving faster than 0.3 px/frame are exactly the
    caption's: x for "left and right", y for "up and down", both for "diagonally"), "speed" (mean speed along the
    caption's axes nearest the caption's word among still 0 / slowly 0.6 / quickly 1.2 px/frame), "score" (the
    share of those five that hold, in [0, 1]) and "measured" (the numbers behind them).
    Returns {"chunks": [...], "accuracy": {attribute: share of chunks where it holds}, "score": mean chunk score}."""
    tr = track(video, background_rgb)
    n = len(tr["found"])
    chunks = [_chunk_verdict({k: a[i:i + chunk] for k, a in tr.items()}, attributes) for i in range(0, n, chunk)]
    accuracy = {a: float(np.mean([c[a] for c in chunks])) if chunks else 0.0 for a in ATTRIBUTES}
    return {"chunks": chunks, "accuracy": accuracy,
            "score": float(np.mean([c["score"] for c in chunks])) if chunks else 0.0}
