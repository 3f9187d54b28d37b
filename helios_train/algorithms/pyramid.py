"""Pyramid Unified Predictor Corrector (PUPC) level construction (official helios/scheduler/scheduling_helios.py,
helios/utils/utils_helios_base.py, helios/utils/utils_helios_post.py).

Pure tensor math shared by the Mid stage (training sample construction, official
``prepare_stage2_clean_input``) and the distilled few-step sampler (stage-start points and upsample +
re-noise, official ``HeliosPipeline.stage2_sample`` / ``inference_with_trajectory_stage2``). Level/stage
index k runs from the lowest resolution (k = 0, 1/4 size) to full resolution (k = num_stages - 1).

Two ways to obtain the per-stage tables (``PyramidConfig.table_source``):

* ``"training"`` re-derives them from the closed forms of the official ``HeliosScheduler.init_sigmas`` /
  ``init_sigmas_for_each_stage`` in float64 (global grid, ``int(r * 1000)`` index truncation,
  renoise-corrected start sigma, flow-length timestep split). Needs nothing from diffusers.
* ``"diffusers"`` reads ``HeliosScheduler``'s own attributes (``ori_start_sigmas``, ``start_sigmas``,
  ``end_sigmas``, ``timestep_ratios``, ``timesteps_per_stage``, ``sigmas_per_stage``); only the
  nominal end timestep ``t_min`` is re-derived, because the library does not keep it.

Two ways to quote a stage's global range (both from ``init_sigmas_for_each_stage``): its nominal
endpoints (t_max, t_min) = 999 -> 743.256 | 743.256 -> 385.614 | 385.614 -> 0.999, or the first/last
entries of the 1000-entry table
``linspace(t_max, t_min, 1001)[:-1]``: 999 -> 743.51 | 743.26 -> 385.97 | 385.61 -> 1.38. The tables
themselves are identical in both constructions (tests check <= 1e-9); the [:-1] drop means t_min is
never sampled inside its own stage. Which of the two a sigma -> t mapping uses *does* matter: the
official ODE-pair / distilled timesteps (``selected_target_timesteps`` in tools/offload_data/get_ode-pairs.py,
e.g. 833.96) come from the table extremes, so :meth:`PyramidSchedule.timestep_for_sigma` uses those, not
(t_max, t_min).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from helios_train.config.mechanisms import PyramidConfig  # noqa: F401  (the schema's; re-exported)

NUM_TRAIN_TIMESTEPS = 1000
LOCAL_SIGMA_MAX = 0.999  # stage-local sigma table starts at 0.999 regardless of shift (init_sigmas_for_each_stage)
CHOLESKY_JITTER = 1e-8  # same jitter diffusers adds; Sigma is singular (blocks sum to 0)


@dataclass(frozen=True)
class PyramidLevel:
    """One pyramid stage. ``sigmas``/``timesteps`` are float64 [1000] tables sharing an index."""

    index: int
    orig_start_sigma: float  # raw global sigma at the stage start (used by the renoise coefficients)
    start_sigma: float  # renoise-corrected start sigma (0.999 / 0.7998 / 0.5004)
    end_sigma: float  # 0.6663 / 0.3337 / 0
    timestep_ratio: tuple[float, float]
    t_max: float  # nominal global timestep range (official init_sigmas_for_each_stage)
    t_min: float
    sigmas: torch.Tensor
    timesteps: torch.Tensor


def _global_grid(shift: float) -> torch.Tensor:
    """Global flow sigma grid (official ``HeliosScheduler.init_sigmas``): 1000 values 0.999 -> 0.000999 for shift 1."""
    s = 1.0 - torch.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float64)
    return torch.flip(shift * s / (1 + (shift - 1) * s), dims=[0])[:-1]


def _corrected_start(orig_sigma: float, gamma: float) -> float:
    """Start sigma after the upsample+renoise jump (official ``init_sigmas_for_each_stage``):
    1 - a / (sqrt(1 + 1/gamma)(1 - a) + a)."""
    a = 1.0 - orig_sigma
    return 1.0 - a / (math.sqrt(1 + 1 / gamma) * (1 - a) + a)


def _levels_training(cfg: PyramidConfig) -> list[PyramidLevel]:
    n = NUM_TRAIN_TIMESTEPS
    sig = _global_grid(cfg.shift)
    ts = sig * n
    orig, start, end = [], [], []
    for k in range(cfg.num_stages):
        i0, i1 = max(int(cfg.stage_range[k] * n), 0), min(int(cfg.stage_range[k + 1] * n), n)
        o = sig[i0].item()
        orig.append(o)
        start.append(o if k == 0 else _corrected_start(o, cfg.gamma))
        end.append(sig[i1].item() if i1 < n else 0.0)
    # global timestep split proportional to each stage's flow length (start - end)
    dist = [s - e for s, e in zip(start, end)]
    tot, levels = sum(dist), []
    for k in range(cfg.num_stages):
        r0 = sum(dist[:k]) / tot
        r1 = 1.0 if k == cfg.num_stages - 1 else sum(dist[: k + 1]) / tot
        t_max = min(ts[min(int(r0 * n), n - 1)].item(), float(n - 1))
        t_min = ts[min(int(r1 * n), n - 1)].item()
        levels.append(PyramidLevel(
            k, orig[k], start[k], end[k], (r0, r1), t_max, t_min,
            torch.linspace(LOCAL_SIGMA_MAX, 0.0, n + 1, dtype=torch.float64)[:-1],
            torch.linspace(t_max, t_min, n + 1, dtype=torch.float64)[:-1],
        ))
    return levels


def _levels_diffusers(cfg: PyramidConfig) -> list[PyramidLevel]:
    from diffusers import HeliosScheduler

    n = NUM_TRAIN_TIMESTEPS
    sch = HeliosScheduler(num_train_timesteps=n, shift=cfg.shift, stages=cfg.num_stages,
                          stage_range=list(cfg.stage_range), gamma=cfg.gamma)
    grid_t = sch.timesteps  # right after construction this is the 1000-entry global grid
    levels = []
    for k in range(cfg.num_stages):
        r0, r1 = sch.timestep_ratios[k]
        table_t = sch.timesteps_per_stage[k].to(torch.float64)
        levels.append(PyramidLevel(
            k, float(sch.ori_start_sigmas[k]), float(sch.start_sigmas[k]), float(sch.end_sigmas[k]),
            (float(r0), float(r1)), table_t[0].item(), grid_t[min(int(r1 * n), n - 1)].item(),
            sch.sigmas_per_stage[k].to(torch.float64), table_t,
        ))
    return levels


def renoise_coefficients(orig_start_sigma: float, gamma: float) -> tuple[float, float]:
    """(alpha, beta) of the upsample + re-noise into a stage (official ``HeliosPipeline.stage2_sample``): a = 1 -
    the stage's raw start sigma, alpha = 1/(sqrt(1+1/gamma)(1-a) + a), beta = alpha(1-a)/sqrt(gamma). alpha*a
    equals the corrected start's signal coefficient 1 - start_sigma_k, so inference lands on the training start
    point of ``prepare_stage2_clean_input``. Used by the Mid inference path and the few-step rollout alike."""
    a = 1.0 - float(orig_start_sigma)
    alpha = 1.0 / (math.sqrt(1 + 1 / gamma) * (1 - a) + a)
    return alpha, alpha * (1 - a) / math.sqrt(gamma)


class PyramidSchedule:
    """Per-level sigma/timestep tables plus the renoise coefficients between levels."""

    def __init__(self, config: PyramidConfig | None = None):
        self.config = config or PyramidConfig()
        build = _levels_training if self.config.table_source == "training" else _levels_diffusers
        self.levels: list[PyramidLevel] = build(self.config)

    @property
    def num_stages(self) -> int:
        return self.config.num_stages

    @property
    def gamma(self) -> float:
        return self.config.gamma

    def renoise_coefficients(self, k: int) -> tuple[float, float]:
        """(alpha, beta) for entering stage k > 0 (module function `renoise_coefficients`)."""
        if not 0 < k < self.num_stages:
            raise ValueError(f"renoise only exists for stages 1..{self.num_stages - 1}, got {k}")
        return renoise_coefficients(self.levels[k].orig_start_sigma, self.gamma)

    def timestep_for_sigma(self, k: int, sigma: torch.Tensor | float) -> torch.Tensor:
        """Global timestep of a (possibly dynamically shifted) stage-local sigma (official dynamic-shift
        branch of ``HeliosScheduler.set_timesteps``, helios/diffusers_version/scheduling_helios_diffusers.py):
        t = min + sigma * (max - min) over the stage's *table* (not the nominal t_min; see module doc)."""
        tab = self.levels[k].timesteps
        lo, hi = tab.min(), tab.max()
        return lo + torch.as_tensor(sigma, dtype=torch.float64) * (hi - lo)


# ----------------------------------------------------------------------------- spatial ops
def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Spatial resize of [B, C, T, H, W]; C and T are folded into channels (ops are per-map)."""
    b, c, t, h, w = x.shape
    y = F.interpolate(x.reshape(b, c * t, h, w), size=size, mode=mode,
                      **({"align_corners": False, "antialias": False} if mode == "bilinear" else {}))
    return y.reshape(b, c, t, *size)


def downsample_clean(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x1/2, no antialias (official ``prepare_stage2_clean_input``). At exactly half size this is the
    mean of each 2x2 block."""
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        raise ValueError(f"spatial size must be even, got {h}x{w}")
    return _resize(x, (h // 2, w // 2), "bilinear")


def nearest_up2(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    return _resize(x, (2 * h, 2 * w), "nearest")


def _pyramid(x: torch.Tensor, n: int, scale: float) -> list[torch.Tensor]:
    out = [x]
    for _ in range(n - 1):
        out.insert(0, downsample_clean(out[0]) * scale)
    return out


def clean_pyramid(clean: torch.Tensor, num_stages: int = 3) -> list[torch.Tensor]:
    """[lowest, ..., full] clean latents (official ``prepare_stage2_clean_input``)."""
    return _pyramid(clean, num_stages, 1.0)


def noise_pyramid(eps: torch.Tensor, num_stages: int = 3) -> list[torch.Tensor]:
    """[lowest, ..., full] noise (official ``prepare_stage2_clean_input``, ``HeliosPipeline.stage2_sample``):
    each level is the bilinear x1/2 of the level above times 2. A 2x2 mean of i.i.d. unit noise has
    variance 1/4, so x2 restores unit variance; the levels stay correlated (the same eps seen at
    different resolutions)."""
    return _pyramid(eps, num_stages, 2.0)


# ----------------------------------------------------------------------------- training samples
@dataclass
class LevelPoints:
    start: torch.Tensor  # flow start point of the stage (sigma_local = 1 end of the segment)
    end: torch.Tensor  # flow end point (sigma_local = 0)
    clean: torch.Tensor  # clean latent at this level's resolution


@dataclass
class LevelSample:
    level: int
    x: torch.Tensor  # noisy input at this level's resolution
    target: torch.Tensor  # velocity target v = start - end
    timestep: torch.Tensor  # [B] float64 global timestep fed to the DiT
    sigma: torch.Tensor  # [B] float64 stage-local sigma
    index: torch.Tensor  # [B] int64 table index


def build_levels(clean: torch.Tensor, eps: torch.Tensor, schedule: PyramidSchedule) -> list[LevelPoints]:
    """Start/end points per level, exactly as the official `prepare_stage2_clean_input`:
    start_0 = eps_0; start_k = startσ_k·eps_k + (1-startσ_k)·nearest_up2(clean_{k-1});
    end_k = endσ_k·eps_k + (1-endσ_k)·clean_k; the last end is the clean latent itself."""
    n = schedule.num_stages
    h, w = clean.shape[-2:]
    if h % 2 ** (n - 1) or w % 2 ** (n - 1):
        raise ValueError(f"{h}x{w} latent cannot be halved {n - 1} times")
    if eps.shape != clean.shape:
        raise ValueError("eps must have the clean latent's shape")
    cl, ep = clean_pyramid(clean, n), noise_pyramid(eps, n)
    out = []
    for k, lv in enumerate(schedule.levels):
        if k == 0:
            start = ep[0]
        else:
            start = lv.start_sigma * ep[k] + (1 - lv.start_sigma) * nearest_up2(cl[k - 1])
        end = clean if k == n - 1 else lv.end_sigma * ep[k] + (1 - lv.end_sigma) * cl[k]
        out.append(LevelPoints(start, end, cl[k]))
    return out


def sample_level_inputs(levels: list[LevelPoints], schedule: PyramidSchedule, level: int,
                        generator: torch.Generator | None = None, batch: int | None = None,
                        index: torch.Tensor | None = None) -> LevelSample:
    """One draw for ``level`` (official ``prepare_stage2_clean_input``, weighting_scheme none):
    idx = floor(u·1000), u ~ U(0,1) per sample; σ = local σ[idx], t = stage timesteps[idx];
    x = σ·start + (1-σ)·end; v = start - end.
    ``index`` overrides the draw (deterministic tests / replay)."""
    pts, lv = levels[level], schedule.levels[level]
    b = pts.start.shape[0] if batch is None else batch
    if b != pts.start.shape[0]:
        raise ValueError(f"batch {b} does not match level tensors ({pts.start.shape[0]})")
    n = lv.sigmas.numel()
    if index is None:
        dev = generator.device if generator is not None else "cpu"
        u = torch.rand(b, generator=generator, device=dev, dtype=torch.float64)
        index = (u * n).floor().long().clamp_(0, n - 1)
    index = index.to("cpu", torch.long)
    sigma, t = lv.sigmas[index], lv.timesteps[index]
    s = sigma.to(pts.start.device, pts.start.dtype).view(b, *([1] * (pts.start.ndim - 1)))
    x = s * pts.start + (1 - s) * pts.end
    return LevelSample(level, x, pts.start - pts.end, t, sigma, index)


def sample_all_levels(levels: list[LevelPoints], schedule: PyramidSchedule,
                      generator: torch.Generator | None = None) -> list[LevelSample]:
    """``sample_ratios[k]`` independent draws per level, low -> high (e.g. [1,2,1] -> 4 segments)."""
    return [sample_level_inputs(levels, schedule, k, generator)
            for k, r in enumerate(schedule.config.sample_ratios) for _ in range(r)]


# ----------------------------------------------------------------------------- renoise (inference / rollout)
def block_noise(shape, gamma: float = 1 / 3, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """i.i.d. 2x2 spatial blocks ~ N(0, Σ), Σ = (1+γ)I - γ11ᵀ (official ``HeliosPipeline.sample_block_noise``):
    unit variance, in-block correlation -γ; for γ = 1/3 every block sums to 0 (1ᵀΣ1 = 4 - 12γ = 0), i.e.
    pure high-frequency noise. Σ is singular, so its fp32 Cholesky (diffusers' pipeline) loses the 1e-8 jitter and fails
    with an eigenvalue of about -1e-7 (measured with torch 2.13 on CPU); we factor in float64. z is drawn as fp32 [blocks, 4]
    like the pipeline, so a shared generator gives the same stream and block layout."""
    b, c, t, h, w = shape
    if h % 2 or w % 2:
        raise ValueError(f"spatial size must be even, got {h}x{w}")
    cov = ((1 + gamma) * torch.eye(4, dtype=torch.float64) - gamma * torch.ones(4, 4, dtype=torch.float64)
           + CHOLESKY_JITTER * torch.eye(4, dtype=torch.float64))
    chol = torch.linalg.cholesky(cov)
    gdev = generator.device if generator is not None else "cpu"
    z = torch.randn(b * c * t * (h // 2) * (w // 2), 4, generator=generator, device=gdev)
    n = (z.to(torch.float64) @ chol.to(z.device).T).to(dtype)
    # block element j = 2*row + col inside the 2x2 patch (same layout as the pipeline)
    n = n.view(b, c, t, h // 2, w // 2, 2, 2).permute(0, 1, 2, 3, 5, 4, 6).reshape(b, c, t, h, w)
    return n.to(device) if device is not None else n


def renoised_upsample(x: torch.Tensor, alpha: float, beta: float, gamma: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Enter a stage from the previous stage's output (official ``HeliosPipeline.stage2_sample``): nearest x2,
    then α·x + β·block_noise, (α, β) the stage's `renoise_coefficients`. The Mid sampler and the few-step rollout
    (helios_train/algorithms/rollout.py) both enter their levels here."""
    up = nearest_up2(x)
    return alpha * up + beta * block_noise(tuple(up.shape), gamma, generator, dtype=up.dtype, device=up.device)


def upsample_renoise(x: torch.Tensor, k: int, schedule: PyramidSchedule,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Enter stage k > 0 of `schedule` from stage k-1's output (`renoised_upsample`)."""
    return renoised_upsample(x, *schedule.renoise_coefficients(k), schedule.gamma, generator)


def level_token_counts(latent_hw: tuple[int, int], num_frames: int, patch=(1, 2, 2),
                       num_stages: int = 3) -> list[int]:
    """Noisy-token count per level, low -> full (levels of official ``prepare_stage2_clean_input``):
    9x48x80, patch (1,2,2) -> [540, 2160, 8640]."""
    h, w = latent_hw
    pt, ph, pw = patch
    out = []
    for k in range(num_stages):
        f = 2 ** (num_stages - 1 - k)
        if h % (f * ph) or w % (f * pw) or num_frames % pt:
            raise ValueError(f"{num_frames}x{h}x{w} not divisible at level {k}")
        out.append((num_frames // pt) * (h // f // ph) * (w // f // pw))
    return out
