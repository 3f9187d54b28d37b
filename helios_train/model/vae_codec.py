"""Helios chunked VAE codec on diffusers' AutoencoderKLWan (official tools/offload_data/get_short-latents.py,
`HeliosPipeline.__call__` in helios/pipelines/pipeline_helios.py).

Every 33-pixel-frame window is encoded *independently* (9 latent frames each), so the first latent
of every chunk is "image-like" (the causal VAE restarts at each window) and decoding goes chunk by
chunk the same way. Latents are stored normalised per channel with the VAE config's
`latents_mean` / `latents_std`: z_norm = (z - mean_c) / std_c.
"""
from __future__ import annotations

import torch

CHUNK_FRAMES = 33  # (9 - 1) * 4 + 1 pixel frames -> 9 latent frames with the x4 causal temporal VAE


def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=like.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=like.device).view(shape)
    return mean, std


def normalize_latents(z: torch.Tensor, vae) -> torch.Tensor:
    """Raw VAE latents [B, C, T, h, w] -> normalised fp32 (what the DiT is trained on)."""
    mean, std = _stats(vae, z)
    return (z.float() - mean) / std


def denormalize_latents(z: torch.Tensor, vae) -> torch.Tensor:
    """Inverse of `normalize_latents` (fp32): what `vae.decode` expects."""
    mean, std = _stats(vae, z)
    return z.float() * std + mean


def _encode(vae, frames: torch.Tensor, generator=None, sample: bool = True) -> torch.Tensor:
    dist = vae.encode(frames.to(device=vae.device, dtype=vae.dtype)).latent_dist
    # sample() is what the official offload script stores; mode() is deterministic (tests, eval).
    z = dist.sample(generator=generator) if sample else dist.mode()
    return normalize_latents(z, vae)


@torch.no_grad()
def encode_chunks(vae, frames: torch.Tensor, chunk_frames: int = CHUNK_FRAMES, generator=None,
                  sample: bool = True, max_windows_per_call: int | None = None) -> torch.Tensor:
    """frames [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, S, C, 9, h, w] fp32, S = F // 33.

    Trailing frames beyond S*33 are dropped (official get_short-latents.py). Why the windows go through the VAE as one
    batch: they are independent by construction and the Wan VAE has no cross-sample state (its causal
    cache is per call and per sample, its norms act per position), so folding S into the batch equals
    S separate calls while paying the per-call Python/kernel overhead once. `max_windows_per_call`
    caps that batch when memory is the limit (full-resolution real data on a small GPU).
    """
    if frames.ndim != 5:
        raise ValueError(f"expected frames [B, 3, F, H, W], got shape {tuple(frames.shape)}")
    b, c, f, h, w = frames.shape
    s = f // chunk_frames
    if s == 0:
        raise ValueError(f"video has {f} frames, fewer than one {chunk_frames}-frame chunk")
    windows = frames[:, :, : s * chunk_frames].reshape(b, c, s, chunk_frames, h, w).transpose(1, 2)
    windows = windows.flatten(0, 1)  # [B*S, 3, 33, H, W], sample-major so unflatten restores (B, S)
    step = max_windows_per_call or windows.shape[0]
    parts = [_encode(vae, windows[i : i + step], generator, sample) for i in range(0, windows.shape[0], step)]
    return torch.cat(parts).unflatten(0, (b, s))


@torch.no_grad()
def encode_first_frame(vae, frames: torch.Tensor, generator=None, sample: bool = True) -> torch.Tensor:
    """Normalised latent of frame 0 alone, [B, C, 1, h, w] (the I2V/V2V prefix anchor, official
    `HeliosPipeline.prepare_image_latents` / `prepare_video_latents`).

    It equals the first latent of any chunk that starts at that frame: the Wan VAE is causal and
    encodes the first frame of a call on its own, so later frames cannot change that latent.
    """
    return _encode(vae, frames[:, :, :1], generator, sample)


@torch.no_grad()
def decode_chunks(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, S, C, 9, h, w] -> frames [B, 3, S*33, H, W] fp32 in [-1, 1].

    One VAE call per chunk, mirroring how they were encoded (and how the pipelines decode only the 9
    new latents of each chunk): decoding all S*9 latents at once would treat chunk k's first latent
    as a continuation of chunk k-1 instead of as an image.
    """
    if latents.ndim != 6:
        raise ValueError(f"expected latents [B, S, C, T, h, w], got shape {tuple(latents.shape)}")
    out = []
    for k in range(latents.shape[1]):
        z = denormalize_latents(latents[:, k], vae).to(device=vae.device, dtype=vae.dtype)
        out.append(vae.decode(z).sample.float())
    return torch.cat(out, dim=2)
