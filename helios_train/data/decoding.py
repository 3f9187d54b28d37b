"""Safe decoders for shard members: `.npy` without pickles, `.json`, and `.mp4` through decord.

Why not webdataset's default decoders: they unpickle `.pyd`/`.pickle` members and need torchvision
for video. Here every member type we accept is listed explicitly and anything else is ignored.
"""
from __future__ import annotations

import io
import json

import numpy as np
import torch


# Every reason a sample can be skipped for. Logged as data/skipped_<reason> (all of them, always,
# so that every rank joins the same collectives).
SKIP_REASONS = (
    "decode_error", "too_short", "bad_latent_shape", "bad_embed_shape", "bad_array", "bad_json",
    "missing_caption", "missing_member", "unreadable_member",
)


class BadSample(Exception):
    """A sample that cannot be used; `reason` is the counter it is skipped under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_npy(data: bytes, name: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exn:  # includes "Object arrays cannot be loaded when allow_pickle=False"
        raise BadSample("bad_array", f"member {name}: not a plain .npy array ({exn})") from exn


def decode_json(data: bytes | None, name: str) -> dict:
    if data is None:
        return {}
    try:
        meta = json.loads(data.decode("utf-8"))
    except Exception as exn:
        raise BadSample("bad_json", f"member {name}: invalid JSON ({exn})") from exn
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"member {name}: expected a JSON object, got {type(meta).__name__}")
    return meta


def caption_of(meta: dict, key: str) -> str:
    """The caption (official `cap[0]` lists are accepted too); a missing one skips the sample."""
    cap = meta.get("caption", meta.get("cap"))
    if isinstance(cap, list):
        cap = cap[0] if cap else None
    if not isinstance(cap, str) or not cap.strip():
        raise BadSample("missing_caption", f"sample {key}: no caption in its json member")
    return cap


def open_mp4(data: bytes, key: str):
    import decord  # imported lazily: worker processes that only read latents never need it

    try:
        return decord.VideoReader(io.BytesIO(data), num_threads=1)
    except Exception as exn:
        raise BadSample("decode_error", f"sample {key}: mp4 could not be opened ({exn})") from exn


def read_frames(reader, key: str, indices: list[int]) -> torch.Tensor:
    """Frames at `indices` as uint8 [F, H, W, 3], decord's own layout: no copy in the worker, and
    4× less to move between processes than float (conversion happens on the training device)."""
    if indices and max(indices) >= len(reader):
        raise BadSample("too_short", f"sample {key}: needs frame {max(indices)}, video has {len(reader)}")
    try:
        frames = reader.get_batch(indices).asnumpy()  # [F, H, W, 3] uint8
    except Exception as exn:
        raise BadSample("decode_error", f"sample {key}: mp4 could not be decoded ({exn})") from exn
    return torch.from_numpy(frames)


def to_unit_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [..., F, H, W, 3] → float [..., 3, F, H, W] in [-1, 1] (the VAE's input)."""
    return frames.movedim(-1, -4).float() / 127.5 - 1.0


def decode_mp4(data: bytes, key: str, first_frame: int = 0, num_frames: int | None = None) -> torch.Tensor:
    """Decode frames [first, first+num) of an mp4 with decord → float tensor [3, F, H, W] in [-1, 1]."""
    reader = open_mp4(data, key)
    end = len(reader) if num_frames is None else first_frame + num_frames
    return to_unit_range(read_frames(reader, key, list(range(first_frame, end))))
