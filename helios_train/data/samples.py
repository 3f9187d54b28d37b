"""Turn one raw shard sample into the Base-stage sample contract (official `prepare_stage1_latent`,
helios/dataset/dataloader_history_latents_dist.py).

Contract (both modes yield the same keys after `OnlineEncoder` has run on raw batches):
  key: str, caption: str, chunk_index: int,
  x0 [C,1,h,w] (first latent of the video, zero when chunk_index == 0),
  history [C,19,h,w] (oldest → newest, zero-padded), target [C,9,h,w], prompt_embeds [L,D].
Raw mode yields uint8 frames instead of latents (`context_frames`: the sampled chunk and up to 3 before
it, `first_frame`) and the trainer encodes them on its device (`helios_train/data/online_encoding.py`).
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from helios_train.algorithms.history import HistoryConfig, assemble_history_sample
from helios_train.data.decoding import BadSample, caption_of, decode_json, decode_npy, open_mp4, read_frames

PIXEL_FRAMES_PER_CHUNK = 33  # (9 - 1) * 4 + 1 pixel frames per 9-latent chunk (causal Wan VAE)


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """Per-sample, per-epoch randomness (chunk choice) that does not depend on worker or order."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def context_chunks(history_cfg: HistoryConfig) -> int:
    """How many whole chunks before the target are needed to fill the history (19 frames → 3)."""
    return math.ceil(sum(history_cfg.history_sizes) / history_cfg.latent_window_size)


def latent_sample(raw: dict, data_cfg, history_cfg: HistoryConfig, epoch: int) -> dict:
    key = raw["__key__"]
    if "latents.npy" not in raw:
        raise BadSample("missing_member", f"sample {key}: no latents.npy member")
    if "prompt_embed.npy" not in raw:
        raise BadSample("missing_member", f"sample {key}: no prompt_embed.npy member")
    meta = decode_json(raw.get("json"), f"{key}.json")
    caption = caption_of(meta, key)
    latents = decode_npy(raw["latents.npy"], f"{key}.latents.npy")
    window = history_cfg.latent_window_size
    expected = ["S", data_cfg.latent_channels, window, data_cfg.latent_height, data_cfg.latent_width]
    ok = latents.ndim == 5 and all(e in ("S", None) or e == got for e, got in zip(expected, latents.shape))
    if not ok:
        shown = ", ".join("S" if e == "S" else ("h" if e is None else str(e)) for e in expected)
        raise BadSample(
            "bad_latent_shape", f"sample {key}: latents.npy has shape {list(latents.shape)}, expected [{shown}]"
        )
    if latents.shape[0] < data_cfg.min_chunks:
        raise BadSample("too_short", f"sample {key}: {latents.shape[0]} chunks < data.min_chunks={data_cfg.min_chunks}")
    embed = decode_npy(raw["prompt_embed.npy"], f"{key}.prompt_embed.npy")
    if embed.ndim != 2:
        raise BadSample("bad_embed_shape", f"sample {key}: prompt_embed.npy has shape {list(embed.shape)}, expected [L, D]")
    chunks = torch.from_numpy(latents.astype(np.float32, copy=False))
    chunk = int(sample_rng(data_cfg.seed, epoch, key).integers(latents.shape[0]))
    x0, history, target = assemble_history_sample(chunks, chunk, history_cfg)
    out = {
        "key": key,
        "caption": caption,
        "chunk_index": chunk,
        "x0": x0,
        "history": history,
        "target": target,
        "prompt_embeds": torch.from_numpy(embed.astype(np.float32, copy=False)),
    }
    if data_cfg.secondary_section:
        # Stage 3 (official dataloader_dmd `*_2`): an independent second chunk of the same video for the
        # critic step; it may coincide with the first.
        chunk2 = int(sample_rng(data_cfg.seed, epoch, key + "/secondary").integers(latents.shape[0]))
        x0_2, history_2, target_2 = assemble_history_sample(chunks, chunk2, history_cfg)
        out.update(secondary_chunk_index=chunk2, secondary_x0=x0_2, secondary_history=history_2,
                   secondary_target=target_2)
    return out


def raw_sample(raw: dict, data_cfg, history_cfg: HistoryConfig, epoch: int) -> dict:
    key = raw["__key__"]
    if "mp4" not in raw:
        raise BadSample("missing_member", f"sample {key}: no mp4 member")
    meta = decode_json(raw.get("json"), f"{key}.json")
    caption = caption_of(meta, key)
    reader = open_mp4(raw["mp4"], key)  # opened once: frame count, context frames and frame 0
    num_chunks = len(reader) // PIXEL_FRAMES_PER_CHUNK
    if num_chunks < data_cfg.min_chunks:
        raise BadSample("too_short", f"sample {key}: {len(reader)} frames = {num_chunks} chunks < data.min_chunks")
    chunk = int(sample_rng(data_cfg.seed, epoch, key).integers(num_chunks))
    n_ctx = context_chunks(history_cfg)
    first = max(0, chunk - n_ctx)
    span = list(range(first * PIXEL_FRAMES_PER_CHUNK, (chunk + 1) * PIXEL_FRAMES_PER_CHUNK))
    frames = read_frames(reader, key, span if first == 0 else [0] + span)  # uint8 [F, H, W, 3]
    # Only the real context chunks travel (no pixel padding); the encoder pads in latent space,
    # exactly like the official zero-prepended history for chunk < 3.
    return {
        "key": key,
        "caption": caption,
        "chunk_index": chunk,
        "context_frames": frames if first == 0 else frames[1:],  # chunks first..chunk, [33·k, H, W, 3]
        "first_frame": frames[:1],
    }


def ode_sample(raw: dict, data_cfg, history_cfg: HistoryConfig, epoch: int) -> dict:
    """An ODE-pair sample (helios_train/sampling/ode_pair_capture.py; official tools/offload_data/get_ode-pairs.py) → tensors for
    the ODE-regression phase.

    Members: `prompt_embed.npy` [L, D], `json` {caption, num_chunks}, and per chunk c and pyramid level k
    `c{c}_s{k}.latents.npy` [n+1, C, window, h_k, w_k] (n teacher states, then the level's end state)
    and `c{c}_s{k}.timesteps.npy` [n]. Yields those as `ode_c{c}_s{k}_latents/_timesteps` plus
    `ode_clean` [S, C, window, H, W]: every chunk's final clean latents (the teacher's history source).
    """
    key = raw["__key__"]
    meta = decode_json(raw.get("json"), f"{key}.json")
    caption = caption_of(meta, key)
    if "prompt_embed.npy" not in raw:
        raise BadSample("missing_member", f"sample {key}: no prompt_embed.npy member")
    embed = decode_npy(raw["prompt_embed.npy"], f"{key}.prompt_embed.npy")
    if embed.ndim != 2:
        raise BadSample("bad_embed_shape", f"sample {key}: prompt_embed.npy has shape {list(embed.shape)}, expected [L, D]")
    num_chunks = int(meta.get("num_chunks", 0))
    if num_chunks < data_cfg.min_chunks:
        raise BadSample("too_short", f"sample {key}: {num_chunks} ODE chunks < data.min_chunks={data_cfg.min_chunks}")
    window, levels = history_cfg.latent_window_size, int(meta.get("levels", 3))
    out = {"key": key, "caption": caption, "prompt_embeds": torch.from_numpy(embed.astype(np.float32))}
    clean = []
    for c in range(num_chunks):
        for k in range(levels):
            name = f"c{c}_s{k}"
            for part in ("latents", "timesteps"):
                if f"{name}.{part}.npy" not in raw:
                    raise BadSample("missing_member", f"sample {key}: no {name}.{part}.npy member")
            lat = decode_npy(raw[f"{name}.latents.npy"], f"{key}.{name}.latents.npy")
            ts = decode_npy(raw[f"{name}.timesteps.npy"], f"{key}.{name}.timesteps.npy")
            scale = 2 ** (levels - 1 - k)
            h = None if data_cfg.latent_height is None else data_cfg.latent_height // scale
            w = None if data_cfg.latent_width is None else data_cfg.latent_width // scale
            expected = [ts.shape[0] + 1 if ts.ndim == 1 else None, data_cfg.latent_channels, window, h, w]
            if lat.ndim != 5 or ts.ndim != 1 or any(e is not None and e != g for e, g in zip(expected, lat.shape)):
                raise BadSample("bad_latent_shape", f"sample {key}: {name}.latents.npy has shape {list(lat.shape)} "
                                f"with timesteps {list(ts.shape)}, expected [n+1, {data_cfg.latent_channels}, {window}, "
                                f"{h or 'h'}, {w or 'w'}] with timesteps [n]")
            out[f"ode_{name}_latents"] = torch.from_numpy(lat.astype(np.float32))
            out[f"ode_{name}_timesteps"] = torch.from_numpy(ts.astype(np.float32))
        clean.append(out[f"ode_c{c}_s{levels - 1}_latents"][-1])
    out["ode_clean"] = torch.stack(clean)
    return out


def collate(samples: list[dict]) -> dict:
    """Stack tensors of equal shape; variable-size ones (raw context frames) stay a list."""
    batch: dict = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor):
            same = all(v.shape == values[0].shape for v in values)
            # One sample: a view, not a copy (a raw 384×640 context is ~100 MB of uint8 frames).
            batch[name] = (values[0].unsqueeze(0) if len(values) == 1 else torch.stack(values)) if same else values
        elif isinstance(values[0], int):
            batch[name] = torch.tensor(values, dtype=torch.long)
        else:
            batch[name] = values
    batch["keys"] = batch.pop("key")
    return batch
