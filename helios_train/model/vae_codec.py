"""Helios chunked VAE codec on diffusers' AutoencoderKLWan (spec inference_data §1.3, §4.1).

Every 33-pixel-frame window is encoded *independently* (9 latent frames each), so the first latent
of every chunk is "image-like", and decoding goes chunk by chunk the same way. Latents are stored
normalised per channel with the VAE config's `latents_mean` / `latents_std`.
"""
from __future__ import annotations

import torch

CHUNK_FRAMES = 33


def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=like.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=like.device).view(shape)
    return mean, std


def normalize_latents(z: torch.Tensor, vae) -> torch.Tensor:
    mean, std = _stats(vae, z)
    return (z.float() - mean) / std


def denormalize_latents(z: torch.Tensor, vae) -> torch.Tensor:
    mean, std = _stats(vae, z)
    return z.float() * std + mean


def _encode(vae, frames: torch.Tensor, generator=None, sample: bool = True) -> torch.Tensor:
    dist = vae.encode(frames.to(device=vae.device, dtype=vae.dtype)).latent_dist
    z = dist.sample(generator=generator) if sample else dist.mode()
    return normalize_latents(z, vae)


@torch.no_grad()
def encode_chunks(vae, frames: torch.Tensor, chunk_frames: int = CHUNK_FRAMES, generator=None,
                  sample: bool = True) -> torch.Tensor:
    """frames [B, 3, F, H, W] in [-1, 1] → normalised latents [B, S, C, 9, h, w], S = F // 33.

    Why one VAE call for all windows: the windows are independent by construction, so folding S into
    the batch gives the same result as S separate calls (the causal VAE keeps no state across a
    batch) at a fraction of the Python overhead.
    """
    b, c, f, h, w = frames.shape
    s = f // chunk_frames
    if s == 0:
        raise ValueError(f"video has {f} frames, fewer than one {chunk_frames}-frame chunk")
    windows = frames[:, :, : s * chunk_frames].reshape(b, c, s, chunk_frames, h, w).transpose(1, 2)
    z = _encode(vae, windows.flatten(0, 1), generator, sample)
    return z.unflatten(0, (b, s))


@torch.no_grad()
def encode_first_frame(vae, frames: torch.Tensor, generator=None, sample: bool = True) -> torch.Tensor:
    """Latent of frame 0 alone [B, C, 1, h, w]: equals the first latent of any chunk starting there
    (the Wan VAE is causal, so its first latent sees only the first frame)."""
    return _encode(vae, frames[:, :, :1], generator, sample)


@torch.no_grad()
def decode_chunks(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, S, C, 9, h, w] → frames [B, 3, S*33, H, W], chunk by chunk."""
    out = []
    for k in range(latents.shape[1]):
        z = denormalize_latents(latents[:, k], vae).to(device=vae.device, dtype=vae.dtype)
        out.append(vae.decode(z).sample.float())
    return torch.cat(out, dim=2)
