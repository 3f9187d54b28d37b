"""Whole decoded clips of raw mp4 shards (`python -m data_prep.videos_to_shards` output): what the miniature's VAE
trains on and what the evaluation compares generated continuations with (helios_train/evaluation/)."""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def decoded_clips(raw_shards) -> list[tuple[str, str, np.ndarray]]:
    """(key, caption, uint8 frames [F, H, W, 3]) of every sample of raw mp4 shards, decoded as the loaders decode."""
    from helios_train.data.decoding import caption_of, decode_json, open_mp4, read_frames
    from helios_train.data.shards import DAMAGED, iter_shard_samples

    out = []
    for path in raw_shards:
        for raw in iter_shard_samples(str(path), lambda exn: log.warning("%s: %s", path, exn)):
            damaged = raw.pop(DAMAGED, None)
            if damaged or "mp4" not in raw:
                log.warning("%s: sample %s skipped (%s)", path, raw.get("__key__"), damaged or "no mp4 member")
                continue
            key = raw["__key__"]
            reader = open_mp4(raw["mp4"], key)
            caption = caption_of(decode_json(raw.get("json"), f"{key}.json"), key)
            frames = read_frames(reader, key, list(range(len(reader))))
            out.append((key, caption, frames.numpy() if hasattr(frames, "numpy") else np.asarray(frames)))
    return out
