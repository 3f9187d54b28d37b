"""Easy Anti-Drifting: degrade the history so the model learns to tolerate its own drift.

Read from the official helios/utils/utils_helios_base.py (`corrupt_history_latents`,
`add_saturation_to_history_latents`, `corrupt_model_input`, `downsample_corrupt`,
`get_corrupt_noise_sigma`). What is drawn how often there:

- clean-or-not and the noise/blur mode: once per call (one decision for the whole batch);
- noise σ: per sample (and per frame when frame-independent), a fresh draw for every segment part;
- blur ratio r, saturation clean-or-not / side / factor: once per call per segment part;
- "segment is all zero, skip it": tested on the whole batch (`tensor.sum() != 0`).

``per_sample=True`` (our option, off by default) makes every batch-wide decision per sample,
including the zero test, so a zero-padded sample next to a full one stays zero.

Other deliberate differences: draws come from an explicit generator (official: Python `random`
and the global torch RNG); "all zero" is tested with ``any(x != 0)`` rather than ``sum() == 0``
(a non-zero segment whose values cancel is not skipped); noise and blur are computed in fp32 and
cast back; the unused `is_chunk_independent` key is not carried over.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from helios_train.config.choices import Degradation
from helios_train.config.mechanisms import AntiDriftConfig  # noqa: F401  (the schema's; re-exported)



class Segment(NamedTuple):
    """A run of frames of the [x0 | history] tensor that is zero-tested as a unit.

    ``parts`` are (start, stop, term) ranges that each get their own draws; ``term`` names the
    noise ratio ("short" | "mid" | "long").
    """

    name: str
    start: int
    stop: int
    parts: tuple[tuple[int, int, str], ...]


def history_segments(history_sizes: Sequence[int] = (16, 2, 1), window: int = 9) -> list[Segment]:
    """Segmentation of the (1 + Σsizes)-frame [x0 | history] tensor (official `corrupt_history_latents`), oldest first.

    "begin" = the x0 prefix, "tail" = the oldest Σsizes mod window frames, then window-sized
    windows aligned to the generation chunks. Ratio per part, as in the official code: begin →
    short ratio; tail and every window → long ratio, except that the LAST window is split after
    its first `mid` frames and the rest uses the mid ratio. With [16, 2, 1] that rest is long
    frames 12–15 (0-based) + mid + short-1× — the official split is counted from the window start, not
    aligned to the mid term. All ratios are 1/3 in every shipped config, so it never mattered.
    """
    n_long, n_mid, _ = sorted((int(s) for s in history_sizes), reverse=True)
    n = sum(int(s) for s in history_sizes)
    tail, n_windows = n % window, n // window
    if tail > n_long:
        raise ValueError(f"tail of {tail} frames does not fit in the long term ({n_long})")
    segs = [Segment("begin", 0, 1, ((0, 1, "short"),))]
    pos = 1
    if tail:
        segs.append(Segment("tail", pos, pos + tail, ((pos, pos + tail, "long"),)))
        pos += tail
    for i in range(n_windows):
        start, stop = pos, pos + window
        if i == n_windows - 1:
            cut = min(start + n_mid, stop)
            parts = tuple(p for p in ((start, cut, "long"), (cut, stop, "mid")) if p[1] > p[0])
        else:
            parts = ((start, stop, "long"),)
        segs.append(Segment(f"window{i}", start, stop, parts))
        pos = stop
    return segs


def _uniform(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).cpu()


def _decisions(generator: torch.Generator, b: int, n: int, p: float) -> torch.Tensor:
    """[B] bool with P(True) = p, drawn n times (1 = per call, B = per sample) and broadcast."""
    return (_uniform(generator, n) < p).expand(b)


def _nonzero(x: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """[B] bool: does the segment hold anything? Per sample, or the official batch-wide test."""
    if per_sample:
        return x.flatten(1).ne(0).any(dim=1).cpu()
    return x.ne(0).any().cpu().expand(x.shape[0])


def _noise(x: torch.Tensor, ratio: float, frame_independent: bool, generator: torch.Generator) -> torch.Tensor:
    """x ← σ·ε + (1 − σ)·x, σ ~ U(0, ratio) per sample (and per frame when frame-independent)."""
    b, _, t = x.shape[:3]
    sigma = _uniform(generator, b, 1, t if frame_independent else 1, 1, 1) * ratio
    eps = torch.randn(x.shape, generator=generator, device=generator.device)
    sigma, eps = sigma.to(x.device), eps.to(x.device)
    return (sigma * eps + (1 - sigma) * x.float()).to(x.dtype)


def _blur(x: torch.Tensor, r: float) -> torch.Tensor:
    """Bilinear (antialiased) down-sample of H, W by r, then back up: a mild blur (official `downsample_corrupt`)."""
    b, c, t, h, w = x.shape
    size = (max(1, int(round(h * r))), max(1, int(round(w * r))))
    y = x.float().reshape(b, c * t, h, w)  # every (c, t) plane is resized on its own
    y = F.interpolate(y, size=size, mode="bilinear", align_corners=False, antialias=True)
    y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return y.reshape(b, c, t, h, w).to(x.dtype)


def _blur_draw(x: torch.Tensor, lo: float, hi: float, per_sample: bool, generator: torch.Generator) -> torch.Tensor:
    if not per_sample:
        return _blur(x, lo + (hi - lo) * float(_uniform(generator, 1)))
    r = lo + (hi - lo) * _uniform(generator, x.shape[0])
    return torch.cat([_blur(x[i : i + 1], float(r[i])) for i in range(x.shape[0])])


def _select(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.to(old.device).view(-1, 1, 1, 1, 1), new, old)


def _check_mode(mode: str) -> None:
    Degradation(mode)  # a config built without the schema: an unknown name raises ValueError


def corrupt_history(
    x0: torch.Tensor,
    history: torch.Tensor,
    cfg: AntiDriftConfig,
    generator: torch.Generator,
    history_sizes: Sequence[int] = (16, 2, 1),
    latent_window_size: int = 9,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Noise or blur the x0 anchor and the history, segment by segment (official `corrupt_history_latents`).

    Returns new tensors (inputs untouched) and ``applied`` = fraction of samples left clean /
    noised / blurred. All-zero segments (padding, dropped frames) are skipped and stay zero.
    """
    b = history.shape[0]
    if not cfg.corrupt_history:
        return x0, history, {"clean": 1.0, "noise": 0.0, "blur": 0.0}
    _check_mode(cfg.mode)
    n = b if cfg.per_sample else 1
    clean = _decisions(generator, b, n, cfg.clean_prob)  # drawn first, as in the official code
    if cfg.mode == "random":
        noise_mode = _decisions(generator, b, n, cfg.random_noise_prob)
    else:
        noise_mode = torch.full((b,), cfg.mode == "noise")
    do_noise, do_blur = ~clean & noise_mode, ~clean & ~noise_mode
    ratios = {"short": cfg.noise_ratio_short, "mid": cfg.noise_ratio_mid, "long": cfg.noise_ratio_long}

    seq = torch.cat([x0.to(history.dtype), history], dim=2)
    pieces = []
    for seg in history_segments(history_sizes, latent_window_size):
        live = _nonzero(seq[:, :, seg.start : seg.stop], cfg.per_sample)
        for start, stop, term in seg.parts:
            x = seq[:, :, start:stop]
            if bool((do_noise & live).any()):
                x = _select(do_noise & live, _noise(x, ratios[term], cfg.frame_independent, generator), x)
            if bool((do_blur & live).any()):
                blurred = _blur_draw(x, cfg.downsample_min, cfg.downsample_max, cfg.per_sample, generator)
                x = _select(do_blur & live, blurred, x)
            pieces.append(x)
    seq = torch.cat(pieces, dim=2)
    applied = {
        "clean": clean.float().mean().item(),
        "noise": do_noise.float().mean().item(),
        "blur": do_blur.float().mean().item(),
    }
    return seq[:, :, :1].to(x0.dtype), seq[:, :, 1:], applied


def add_saturation(
    x0: torch.Tensor,
    history: torch.Tensor,
    cfg: AntiDriftConfig,
    generator: torch.Generator,
    history_sizes: Sequence[int] = (16, 2, 1),
    latent_window_size: int = 9,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Colour drift (official `add_saturation_to_history_latents`): per segment part except the x0 anchor,
    x ← (x − μ)·s + μ.

    μ is the mean over latent channels at each (t, h, w), so the channel mean is kept. Each part:
    with p = saturation_clean_prob unchanged, else s ~ U(min, 0.999) or U(1.001, max) (50/50). The
    official function also has a whole-call clean check, commented out; we follow the live code.
    ``applied["saturation"]`` = fraction of samples with at least one saturated part.
    """
    b = history.shape[0]
    if not cfg.saturation or cfg.official_saturation_noop:
        return x0, history, {"saturation": 0.0}
    n = b if cfg.per_sample else 1
    hit = torch.zeros(b, dtype=torch.bool)
    seq = torch.cat([x0.to(history.dtype), history], dim=2)
    pieces = [seq[:, :, :1]]
    for seg in history_segments(history_sizes, latent_window_size)[1:]:  # [0] is the anchor
        live = _nonzero(seq[:, :, seg.start : seg.stop], cfg.per_sample)
        for start, stop, _ in seg.parts:
            x = seq[:, :, start:stop]
            keep = _decisions(generator, b, n, cfg.saturation_clean_prob)
            low = _decisions(generator, b, n, 0.5)
            u = _uniform(generator, n).expand(b)
            s = torch.where(low, cfg.saturation_min + (1 - 1e-3 - cfg.saturation_min) * u,
                            1 + 1e-3 + (cfg.saturation_max - 1 - 1e-3) * u)
            act = ~keep & live
            if bool(act.any()):
                xf = x.float()
                mu = xf.mean(dim=1, keepdim=True)
                sat = ((xf - mu) * s.to(x.device).view(-1, 1, 1, 1, 1) + mu).to(x.dtype)
                x = _select(act, sat, x)
                hit |= act
            pieces.append(x)
    seq = torch.cat(pieces, dim=2)
    return seq[:, :, :1].to(x0.dtype), seq[:, :, 1:], {"saturation": hit.float().mean().item()}


def corrupt_target(target: torch.Tensor, cfg: AntiDriftConfig, generator: torch.Generator) -> torch.Tensor:
    """``corrupt_model_input`` (official, helios/utils/utils_helios_base.py): noise or blur the clean chunk
    before it is noised.

    Official order: mode first; blur always applies; noise has its own clean draw. No zero test.
    The flow target stays ε − clean: the caller keeps the clean chunk for it.
    """
    if not cfg.corrupt_model_input:
        return target
    _check_mode(cfg.target_mode)
    b = target.shape[0]
    n = b if cfg.per_sample else 1
    if cfg.target_mode == "random":
        noise_mode = _decisions(generator, b, n, cfg.target_random_noise_prob)
    else:
        noise_mode = torch.full((b,), cfg.target_mode == "noise")
    clean = _decisions(generator, b, n, cfg.target_clean_prob)
    out = target
    if bool((noise_mode & ~clean).any()):
        noised = _noise(target, cfg.target_noise_ratio, cfg.target_frame_independent, generator)
        out = _select(noise_mode & ~clean, noised, out)
    if bool((~noise_mode).any()):
        blurred = _blur_draw(target, cfg.target_downsample_min, cfg.target_downsample_max, cfg.per_sample, generator)
        out = _select(~noise_mode, blurred, out)
    return out
