"""Train a small `AutoencoderKLWan` (Wan's causal 4× temporal / 8× spatial layout) on a set of clips, so generated
latents decode to videos a person can look at. The miniature (helios_train/data/miniature_assets.py) trains one at
first use; the 14B recipe uses Wan2.1's released VAE and never calls this.

Why whole chunks, mostly cropped: the VAE is causal in time, and its state after the first frames (the cached
features of each causal convolution) is only learnt by training on as many frames as it will encode — trained on
5-frame clips, a 33-frame chunk decoded at ~20 dB for its first frames and ~9 dB for its middle (measured). It is
convolutional in space, so 32×32 crops hold for 64×64 frames except in the mid-block attention, which sees the whole
latent: one window in `whole_frame_every` is whole frames. Loss: MSE on pixels in [-1, 1]
plus a small KL to the unit Gaussian; measured on these clips: an L1 term, or Adam above ~2e-4, leaves it stuck at
the dark-background solution (~16-18 dB, outputs never brighter than the background) (the latents stay a well-scaled space for the diffusion model);
`latent_statistics` then sets the per-channel mean / std the pipelines normalise with (`latents_mean`,
`latents_std` in the VAE's config, as in Wan2.1's).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

log = logging.getLogger(__name__)


def _to_model(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] → float [3, F, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).float().permute(3, 0, 1, 2) / 127.5 - 1


def _batch(videos, rng: np.random.Generator, batch: int, frames: int, crop: int) -> torch.Tensor:
    out = []
    for _ in range(batch):
        v = videos[int(rng.integers(len(videos)))]
        t = int(rng.integers(0, len(v) - frames + 1))
        y, x = (int(rng.integers(0, d - crop + 1)) for d in v.shape[1:3])
        out.append(_to_model(v[t : t + frames, y : y + crop, x : x + crop]))
    return torch.stack(out)


@torch.no_grad()
def start_near_deterministic(vae, log_std: float = -4.0) -> None:
    """Make the encoder's posterior start narrow: the log-variance half of `quant_conv` outputs 2·`log_std` whatever
    the input (weights zeroed, bias set). Why: a fresh VAE starts with σ ≈ 1, so the decoder learns from latents
    drowned in sampling noise and the reconstruction stalls (measured: ~16 dB after 250 steps); diffusers' V2V / I2V
    paths encode with `latent_dist.sample()`, so σ must end small anyway. Training may still move it."""
    z = vae.quant_conv.weight.shape[0] // 2
    vae.quant_conv.weight[z:].zero_()
    vae.quant_conv.bias[z:].fill_(2 * log_std)


@torch.no_grad()
def normalise_latent_scale(vae, x: torch.Tensor) -> None:
    """Data-dependent init of the latent: rescale the mean half of `quant_conv` so the posterior mean has zero mean
    and unit std per channel on the batch `x`. Why: a fresh VAE's latent varies little with its input (end-to-end
    gain ~0.015 on flat colours), so the decoder first learns to ignore it and outputs one grey for every clip.
    Measured on the miniature's clips (9-frame 32x32 crops, batch 4, lr 1e-4, 400 steps): held-out 19.0 dB with it,
    16.9 dB without; on random flat colours 19.1 vs 11.0 dB after 200 steps."""
    mean = vae.encode(x).latent_dist.mean
    m, sd = mean.mean(dim=(0, 2, 3, 4)), mean.std(dim=(0, 2, 3, 4)).clamp_min(1e-6)
    z = vae.quant_conv.weight.shape[0] // 2
    vae.quant_conv.weight[:z] /= sd.view(-1, *[1] * (vae.quant_conv.weight.dim() - 1))
    vae.quant_conv.bias[:z] = (vae.quant_conv.bias[:z] - m) / sd


def train_vae(vae, videos: list[np.ndarray], steps: int, batch: int = 2, frames: int = 33, crop: int = 32,
              lr: float = 1e-4, kl_weight: float = 1e-4, seed: int = 0, log_every: int = 100,
              whole_frame_every: int = 4) -> list[dict]:
    """Train `vae` in place on random `frames`-frame `crop`×`crop` windows of `videos` (uint8 [F, H, W, 3] each) —
    every `whole_frame_every`-th step one window of whole frames instead, so the mid-block attention also sees the
    full latent size; returns the logged rows {step, loss, psnr, seconds}. `frames` must be 1 + 4k (Wan's causal
    temporal layout)."""
    if (frames - 1) % 4:
        raise ValueError(f"frames={frames}: the Wan VAE encodes 1 + 4k frames")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    start_near_deterministic(vae)
    normalise_latent_scale(vae, _batch(videos, np.random.default_rng(seed + 1), 8, frames, videos[0].shape[1]))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 10)
    vae.train()
    rows, began = [], time.perf_counter()
    for step in range(1, steps + 1):
        whole = whole_frame_every and step % whole_frame_every == 0
        x = _batch(videos, rng, 1, frames, videos[0].shape[1]) if whole else _batch(videos, rng, batch, frames, crop)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=gen)).sample
        mse = ((rec - x) ** 2).mean()
        loss = mse + kl_weight * posterior.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            psnr = float(10 * torch.log10(4 / ((rec.detach().clamp(-1, 1) - x) ** 2).mean()))
            rows.append({"step": step, "loss": float(loss.detach()), "psnr": psnr, "seconds": time.perf_counter() - began})
            log.info("vae step %d/%d loss %.4f psnr %.2f dB (%.0fs)", step, steps, rows[-1]["loss"], psnr,
                     rows[-1]["seconds"])
    vae.eval()
    return rows


@torch.no_grad()
def encode_chunk(vae, frames: np.ndarray) -> torch.Tensor:
    """Un-normalised latent mean [C, T, h, w] of one chunk of frames (uint8 [F, H, W, 3])."""
    return vae.encode(_to_model(frames)[None]).latent_dist.mode()[0]


@torch.no_grad()
def reconstruction_psnr(vae, videos: list[np.ndarray], chunk: int = 33) -> list[float]:
    """PSNR (dB, peak = full range) of each video's whole chunks encoded independently (the mean of the posterior,
    as the data tools encode) and decoded."""
    out = []
    for v in videos:
        errors = []
        for k in range(len(v) // chunk):
            x = _to_model(v[k * chunk : (k + 1) * chunk])[None]
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
            errors.append(float(((rec - x) ** 2).mean()))
        out.append(float(10 * np.log10(4 / np.mean(errors))))
    return out


@torch.no_grad()
def latent_statistics(vae, videos: list[np.ndarray], chunk: int = 33) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the (un-normalised) latents of the videos' first chunks: what the VAE config's
    `latents_mean` / `latents_std` hold, so normalised latents have zero mean and unit variance per channel."""
    z = torch.cat([encode_chunk(vae, v[:chunk]).flatten(1) for v in videos], dim=1)
    return z.mean(dim=1).tolist(), z.std(dim=1).clamp_min(1e-6).tolist()
