"""Per-frame and per-chunk signal metrics of videos of any size: fidelity to a reference (PSNR, SSIM), global colour
statistics (brightness, saturation, colour histograms), motion energy, patch-grid artifacts and seams at chunk
boundaries.

A video is a numpy array [F, H, W, 3] RGB, uint8 (0..255) or float in [0, 1]; a single frame [H, W, 3] is taken as
a one-frame video. Every metric converts to float in [0, 1] once, block by block (a 400-frame 384x640 video is
1.2 GB as float32, so frames are converted `_BLOCK` at a time), and returns one number per frame (or per frame
pair, or per chunk boundary) as a float64 numpy array.
"""
from __future__ import annotations

import numpy as np
import torch

from helios_train.data.miniature_world import CHUNK_FRAMES

LUMA_BT601 = np.array([0.299, 0.587, 0.114])
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
BOUNDARY_EPS = 1e-4  # in [0, 1] intensity units (~0.03 of a grey level): keeps a static video's ratio at 1, not 0/0
_BLOCK = 32  # frames converted to float at a time


def as_video(video) -> np.ndarray:
    """The input as a 4-D array [F, H, W, 3] (uint8 or float, not yet converted); raises on anything else."""
    v = np.asarray(video)
    if v.ndim == 3:
        v = v[None]
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"expected a video [F, H, W, 3] or a frame [H, W, 3], got shape {v.shape}")
    if np.issubdtype(v.dtype, np.integer) and v.dtype != np.uint8:
        raise ValueError(f"integer videos must be uint8 (0..255), got {v.dtype}")
    return v


def to_float01(video, dtype=np.float32) -> np.ndarray:
    """[F, H, W, 3] float in [0, 1]: uint8 is divided by 255, a float video is taken as already in [0, 1]."""
    v = as_video(video)
    return v.astype(dtype) / 255.0 if v.dtype == np.uint8 else v.astype(dtype, copy=False)


def _blocks(video, overlap: int = 0, dtype=np.float32):
    """Float [0, 1] blocks of `_BLOCK` frames; each block also repeats the last `overlap` frames of the previous one."""
    v = as_video(video)
    for start in range(0, len(v), _BLOCK):
        lo = max(0, start - overlap)
        yield to_float01(v[lo:start + _BLOCK], dtype)


def _per_frame(video, fn, overlap: int = 0) -> np.ndarray:
    parts = [fn(block) for block in _blocks(video, overlap)]
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


def _check_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_video(a), as_video(b)
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}")
    return a, b


def psnr(a, b) -> np.ndarray:
    """PSNR in dB per frame, 10·log10(range² / MSE) over all pixels and channels, range 255 for uint8 and 1.0 for
    float videos (the same number: both are compared in [0, 1]). inf for identical frames; higher is closer."""
    a, b = _check_pair(a, b)
    mse = np.concatenate([((to_float01(a[i:i + _BLOCK], np.float64) - to_float01(b[i:i + _BLOCK], np.float64)) ** 2)
                          .mean(axis=(1, 2, 3)) for i in range(0, len(a), _BLOCK)])
    return np.where(mse > 0, 10 * np.log10(1.0 / np.maximum(mse, 1e-300)), np.inf)


def _gaussian(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    return g / g.sum()


def _blur_valid(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable filtering of the last two dims with 1-D kernel g, no padding (windows never leave the image):
    weighted sums of shifted views accumulated in place — on CPU several times faster than F.conv2d."""
    n = len(g)
    h, w = t.shape[-2] - n + 1, t.shape[-1] - n + 1
    rows = t[..., :, 0:w] * g[0]
    for i in range(1, n):
        rows.add_(t[..., :, i:i + w], alpha=float(g[i]))
    out = rows[..., 0:h, :] * g[0]
    for i in range(1, n):
        out.add_(rows[..., i:i + h, :], alpha=float(g[i]))
    return out


def ssim_maps(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM maps of planes x, y [..., H, W] in [0, 1]: the 'valid' part (H-10, W-10) of Wang et al. (2004) with an
    11x11 Gaussian window, σ = 1.5, C1 = (0.01·1)², C2 = (0.03·1)²; each value is the SSIM of one window."""
    g = _gaussian().to(x.dtype)
    c1, c2 = (SSIM_K1 * 1.0) ** 2, (SSIM_K2 * 1.0) ** 2
    ox, oy = x.mean(dim=(-2, -1), keepdim=True), y.mean(dim=(-2, -1), keepdim=True)
    x, y = x - ox, y - oy  # centred: E[x²] - E[x]² then loses far less to float32 cancellation
    mx, my = _blur_valid(x, g), _blur_valid(y, g)
    vx, vy = _blur_valid(x * x, g) - mx * mx, _blur_valid(y * y, g) - my * my
    cxy = _blur_valid(x * y, g) - mx * my
    mx, my = mx + ox, my + oy
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim(a, b) -> np.ndarray:
    """Standard SSIM per frame (Wang et al. 2004): 11x11 Gaussian window σ = 1.5, K1 = 0.01, K2 = 0.03, data range
    255 (uint8) or 1.0 (float), computed on each RGB channel separately over the valid windows (no padding), then
    averaged over windows and the three channels. In [-1, 1]; 1 for identical frames. Frames must be ≥ 11x11.
    float32 arithmetic on mean-centred planes: within ~1e-6 of a float64 computation."""
    a, b = _check_pair(a, b)
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {a.shape[1:3]}")
    out = []
    for i in range(0, len(a), 8):  # 8 frames x 3 channels x a few blurred planes at a time
        fa, fb = (torch.from_numpy(to_float01(v[i:i + 8])).permute(0, 3, 1, 2) for v in (a, b))
        out.append(ssim_maps(fa, fb).flatten(1).mean(dim=1).double().numpy())
    return np.concatenate(out)


def brightness(video) -> np.ndarray:
    """Mean luma per frame, BT.601 weights (0.299 R + 0.587 G + 0.114 B), in [0, 1] (0 black, 1 white)."""
    return _per_frame(video, lambda v: (v @ LUMA_BT601.astype(v.dtype)).mean(axis=(1, 2)))


def _hsv_saturation(v: np.ndarray) -> np.ndarray:
    hi, lo = v.max(axis=-1), v.min(axis=-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-12), 0.0)  # HSV: black has saturation 0


def saturation(video) -> np.ndarray:
    """Mean HSV saturation per frame, (max - min) / max of each pixel's RGB (0 for black), in [0, 1]:
    0 greyscale, 1 fully saturated colours."""
    return _per_frame(video, lambda v: _hsv_saturation(v).mean(axis=(1, 2)))


def colour_histogram(video, bins: int = 16) -> np.ndarray:
    """Joint RGB histogram of every pixel of every frame of `video`, `bins` levels per channel, flattened to
    [bins³] (index r·bins² + g·bins + b) and normalised to sum 1. Pass a slice (one chunk) to get its histogram."""
    counts = np.zeros(bins ** 3, np.int64)
    for v in _blocks(video):
        q = np.minimum((v * bins).astype(np.int64), bins - 1)  # 1.0 falls into the top bin
        counts += np.bincount(((q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]).ravel(), minlength=bins ** 3)
    return counts / max(int(counts.sum()), 1)


def histogram_distance(h1, h2) -> float:
    """Total-variation distance 0.5·Σ|h1 - h2| of two normalised histograms: 0 identical, 1 disjoint."""
    h1, h2 = np.asarray(h1, np.float64), np.asarray(h2, np.float64)
    if h1.shape != h2.shape:
        raise ValueError(f"histograms differ in shape: {h1.shape} vs {h2.shape}")
    return float(0.5 * np.abs(h1 - h2).sum())


def motion_energy(video) -> np.ndarray:
    """Mean absolute difference between consecutive frames over pixels and channels, one value per frame pair
    (length F - 1), in [0, 1]: 0 for a static video."""
    return _per_frame(video, lambda v: np.abs(np.diff(v, axis=0)).mean(axis=(1, 2, 3)), overlap=1)


def _lattice_axis(n: int, period: int) -> np.ndarray:
    """Which FFT bins of an n-point axis are (nearest to) a multiple of 1/period cycles per pixel."""
    cycles = np.fft.fftfreq(n) * period  # frequency in multiples of 1/period
    return np.abs(cycles - np.round(cycles)) * n / period <= 0.5 + 1e-9  # within half a bin


def grid_energy(video, period: int = 16) -> np.ndarray:
    """Share of a frame's spatial power that repeats every `period` pixels, per frame, in [0, 1].

    Exactly: luma Y (BT.601, [0, 1]) minus its frame mean, times a 2-D Hann window (the frame's edges are not
    periodic; unwindowed they leak power along the frequency axes, which hold lattice points), power spectrum
    P = |FFT2|². The score is ΣP over the lattice {(m/period, n/period) cycles/px, m, n integers, not both 0} (the
    nearest bin when the size is not a multiple of `period`) divided by ΣP over every bin except DC; 0 for a flat
    frame. A pattern periodic with `period` in x and y has all its power on that lattice: grid lines at patch
    seams, a texture repeated in every patch (16 px = the transformer's (1,2,2) patch on 8x VAE latents; 8-px VAE
    block patterns repeat every 16 px too, so they count). Not caught: random per-block offsets (their power sits
    below 1/period). The Hann window spreads each lattice tone over 3x3 bins, so a pure grid scores ≈ 0.44, not 1;
    white noise ≈ period²/(H·W) (the lattice's share of the bins), smooth content ≈ 0. Being a share, a faint grid
    next to high-contrast content (a sharp object filling a 64-px frame) raises it only a little: compare a
    generated video with its ground truth rather than with a fixed threshold."""
    v = as_video(video)
    h, w = v.shape[1:3]
    lattice = _lattice_axis(h, period)[:, None] & _lattice_axis(w, period)[None, :]
    lattice[0, 0] = False
    window = np.outer(np.hanning(h), np.hanning(w))

    def score(block):
        y = block.astype(np.float64) @ LUMA_BT601
        y = (y - y.mean(axis=(1, 2), keepdims=True)) * window
        power = np.abs(np.fft.fft2(y)) ** 2
        total = power.sum(axis=(1, 2)) - power[:, 0, 0]
        return np.where(total > 1e-20, power[:, lattice].sum(axis=1) / np.maximum(total, 1e-20), 0.0)

    return _per_frame(v, score)


def chunk_boundary_jumps(video, chunk: int = CHUNK_FRAMES, eps: float = BOUNDARY_EPS) -> np.ndarray:
    """Seams between chunks: for each boundary k (last frame of chunk k -> first frame of chunk k+1), the mean
    absolute difference across it divided by the mean absolute consecutive-frame difference inside chunks k and
    k+1 (`motion_energy` units), as (jump + eps) / (inside + eps) with eps = 1e-4 by default so a static video
    gives 1 rather than 0/0. ≈ 1 for a seamless video, > 1 for a jump at the boundary (e.g. 5 = the boundary
    changes five times as much as a typical frame step). One value per boundary that has frames after it."""
    d = motion_energy(video)
    frames = len(d) + 1
    out = []
    for k in range(max(0, (frames - 1) // chunk)):
        b = (k + 1) * chunk - 1  # index of the pair (frame b, frame b + 1) that straddles the boundary
        inside = np.concatenate([d[k * chunk:b], d[b + 1:min((k + 2) * chunk - 1, len(d))]])
        typical = float(inside.mean()) if inside.size else 0.0
        out.append((d[b] + eps) / (typical + eps))
    return np.asarray(out, np.float64)


def per_chunk(values, chunk: int = CHUNK_FRAMES) -> np.ndarray:
    """Mean of per-frame values per chunk of `chunk` frames (the last chunk may be shorter), length ceil(N/chunk).
    For per-pair values (length F - 1) a pair counts towards the chunk of its first frame."""
    values = np.asarray(values, np.float64)
    return np.array([values[i:i + chunk].mean() for i in range(0, len(values), chunk)])
