"""Synthetic toy videos: moving, colour-changing shapes with captions that describe them.

    python -m data_prep.toy_videos --out checkpoints/_toy/raw [--num-videos 24] [--seed 0]

Each video is real h264 (PyAV, yuv420p, 24 fps) packed into WebDataset shards `raw-NNNNNN.tar` with
members `mp4` and `json` ({"caption", "num_frames", "fps", "height", "width"}) — the same format
`data_prep/encode_latents.py` and the raw-mode loader read for real data. Deterministic from the seed.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from helios_train.data.video_io import encode_mp4

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 70), "blue": (50, 90, 230), "yellow": (235, 215, 40),
           "white": (235, 235, 235), "orange": (240, 140, 30), "purple": (150, 60, 200)}
BACKGROUNDS = {"black": (10, 10, 10), "dark blue": (15, 20, 70), "dark green": (15, 50, 25), "gray": (90, 90, 90)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left to right": (1, 0), "right to left": (-1, 0), "top to bottom": (0, 1), "bottom to top": (0, -1)}


def caption_vocabulary() -> list[str]:
    """Every word a toy caption can use (the toy tokenizer is trained on this)."""
    words = list(COLOURS) + list(BACKGROUNDS) + list(SHAPES) + list(DIRECTIONS)
    return words + ["a moves on background while turning and grows shrinks another"]


def _mask(shape: str, h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if shape == "square":
        return (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    return (yy - cy <= r) & (yy - cy >= -r) & (abs(xx - cx) <= (yy - cy + r) / 2)  # triangle, apex up


def render_video(rng: np.random.Generator, num_frames: int, height: int, width: int) -> tuple[np.ndarray, str]:
    bg_name = rng.choice(list(BACKGROUNDS))
    objects, parts = [], []
    for i in range(int(rng.integers(1, 3))):
        shape = str(rng.choice(SHAPES))
        c0, c1 = rng.choice(list(COLOURS), size=2, replace=False)
        direction = str(rng.choice(list(DIRECTIONS)))
        objects.append((shape, COLOURS[c0], COLOURS[c1], DIRECTIONS[direction], rng.uniform(0.2, 0.8, 2),
                        rng.uniform(0.08, 0.16) * height, rng.uniform(-0.5, 0.5)))
        parts.append(f"{'a' if i == 0 else 'another'} {c0} {shape} moves {direction} while turning {c1}")
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        p = t / max(1, num_frames - 1)
        img = np.empty((height, width, 3), np.float32)
        img[:] = BACKGROUNDS[bg_name]
        for shape, col0, col1, (dx, dy), start, radius, grow in objects:
            cx = (start[1] + dx * (p - 0.5) * 0.8) % 1.0 * width
            cy = (start[0] + dy * (p - 0.5) * 0.8) % 1.0 * height
            colour = (1 - p) * np.array(col0) + p * np.array(col1)
            img[_mask(shape, height, width, cy, cx, radius * (1 + grow * p))] = colour
        frames[t] = img.clip(0, 255).astype(np.uint8)
    return frames, f"{' and '.join(parts)} on a {bg_name} background"


def build_toy_videos(out_dir, num_videos: int = 24, videos_per_shard: int = 3, height: int = 64, width: int = 128,
                     frame_choices=(99, 121, 132, 165), fps: int = 24, seed: int = 0) -> list[Path]:
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    for s in range(0, num_videos, videos_per_shard):
        path = out / f"raw-{s // videos_per_shard:06d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with wds.TarWriter(str(tmp)) as sink:
            for v in range(s, min(s + videos_per_shard, num_videos)):
                n = int(rng.choice(frame_choices))
                frames, caption = render_video(rng, n, height, width)
                meta = {"caption": caption, "num_frames": n, "fps": float(fps), "height": height, "width": width}
                sink.write({"__key__": f"toy_{v:05d}", "mp4": encode_mp4(frames, fps), "json": json.dumps(meta).encode()})
        os.replace(tmp, path)
        shards.append(path)
    return shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-videos", type=int, default=24)
    ap.add_argument("--videos-per-shard", type=int, default=3)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    shards = build_toy_videos(a.out, a.num_videos, a.videos_per_shard, a.height, a.width, seed=a.seed)
    print(f"wrote {len(shards)} shards to {a.out}")


if __name__ == "__main__":
    main()
