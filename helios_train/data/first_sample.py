"""Start-up check of the data against the model, on the first sample of the first shard.

A shard encoded with another VAE (latent channels) or text encoder (embedding width) would otherwise
be skipped sample by sample after the model has loaded (minutes at 14B), or reach the model as a shape
error. Only the `.npy` headers of one sample are read (np.lib.format: no array data, no pickles).
"""
from __future__ import annotations

import io
import tarfile
from typing import Optional

import numpy as np


def npy_shape(data: bytes) -> tuple[int, ...]:
    buf = io.BytesIO(data)
    major, _ = np.lib.format.read_magic(buf)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, _, _ = read(buf)
    return tuple(shape)


def first_sample_shapes(shard: str, members: tuple[str, ...]) -> Optional[tuple[str, dict[str, tuple]]]:
    """(key, {member: shape}) of the first sample of `shard` that has every one of `members` (None if none
    does in the first 64 tar entries: the loader's own skip counting then speaks for the shard)."""
    found: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for i, info in enumerate(tar):
            if i >= 64:
                break
            if not info.isfile() or "." not in info.name:
                continue
            key, ext = info.name.split(".", 1)
            if ext in members:
                found.setdefault(key, {})[ext] = tar.extractfile(info).read(4096)  # the header fits
                if len(found[key]) == len(members):
                    return key, {m: npy_shape(b) for m, b in found[key].items()}
    return None


def first_captions(shard: str, n: int, max_entries: int = 4096) -> list[str]:
    """Captions of the first `n` samples of `shard` that have one (their `json` members only; the other
    members' bytes are skipped by the tar index, not read)."""
    import json

    from helios_train.data.decoding import BadSample, caption_of

    out: list[str] = []
    with tarfile.open(shard) as tar:
        for i, info in enumerate(tar):
            if len(out) >= n or i >= max_entries:
                break
            if not info.isfile() or not info.name.endswith(".json"):
                continue
            try:
                out.append(caption_of(json.loads(tar.extractfile(info).read()), info.name))
            except (ValueError, BadSample):
                continue  # a sample the loader would skip is no validation prompt either
    return out


def check_against_model(shard: str, mode: str, latent_channels: int, text_dim: int) -> Optional[tuple[int, int]]:
    """Raise naming the shard and sample when its first sample does not fit the model; return the sample's
    latent (height, width) (latents mode; None otherwise or when no sample was found)."""
    latents = {"latents": "latents.npy", "ode_pairs": "c0_s0.latents.npy"}.get(mode)
    if latents is None:  # raw mp4 shards: encoded online with the model's own VAE and text encoder
        return None
    got = first_sample_shapes(shard, (latents, "prompt_embed.npy"))
    if got is None:
        return None
    key, shapes = got
    channel_axis = 1  # latents [S, C, 9, h, w]; ODE pairs [n+1, C, 9, h, w]
    channels, width = shapes[latents][channel_axis], shapes["prompt_embed.npy"][-1]
    if channels != latent_channels:
        raise ValueError(
            f"data.shards: {shard} sample {key} has {channels}-channel latents ({latents} {list(shapes[latents])}), "
            f"the model's transformer takes {latent_channels}: the shards were encoded with another VAE. Re-encode "
            f"them with this model (python -m data_prep.encode_latents --model <model.path>) or train the model "
            f"they were made for.")
    if width != text_dim:
        raise ValueError(
            f"data.shards: {shard} sample {key} has {width}-wide prompt embeddings (prompt_embed.npy "
            f"{list(shapes['prompt_embed.npy'])}), the model's text_dim is {text_dim}: the shards were encoded "
            f"with another text encoder. Re-encode them with this model's.")
    return tuple(shapes[latents][-2:]) if mode == "latents" else None
