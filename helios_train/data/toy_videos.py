"""Synthetic toy videos: moving, colour-changing shapes with captions that describe them.

    python -m data_prep.toy_videos --out checkpoints/_toy/raw [--num-videos 24] [--seed 0]

Each video is real h264 (PyAV, yuv420p, 24 fps) packed into WebDataset shards `raw-NNNNNN.tar`,
one sample per video: `__key__` `toy_NNNNN`, `mp4` (the file's bytes) and `json`
({"caption", "num_frames", "fps", "height", "width"}) -- the same format `helios_train/data/encode_latents.py`
and the raw-mode loader read for real data. Deterministic from the seed.

Objects move across the whole clip and change colour (and size) linearly in time, so a chunk from the
end of a video looks different from its first chunk: history conditioning has something to carry.
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
# direction -> unit motion (dx, dy) in image coordinates (y grows downwards)
DIRECTIONS = {"left to right": (1, 0), "right to left": (-1, 0), "top to bottom": (0, 1), "bottom to top": (0, -1)}
SIZE_CHANGES = {"": 0.0, " and growing": 0.5, " and shrinking": -0.4}  # caption suffix -> relative size change
TEMPLATE_WORDS = "a an another moves while turning and growing shrinking on background"


def caption_vocabulary() -> list[str]:
    """Every word a toy caption can use (the toy tokenizer is trained on this)."""
    return [*COLOURS, *BACKGROUNDS, *SHAPES, *DIRECTIONS, TEMPLATE_WORDS]


def _mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    return (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)  # triangle, apex up


def _object(rng: np.random.Generator, first: bool) -> tuple[dict, str]:
    shape = str(rng.choice(SHAPES))
    c0, c1 = (str(c) for c in rng.choice(list(COLOURS), size=2, replace=False))
    direction = str(rng.choice(list(DIRECTIONS)))
    size_caption = str(rng.choice(list(SIZE_CHANGES)))
    obj = {"shape": shape, "col0": np.array(COLOURS[c0], np.float32), "col1": np.array(COLOURS[c1], np.float32),
           "dir": DIRECTIONS[direction], "across": rng.uniform(0.25, 0.75), "radius": rng.uniform(0.09, 0.16),
           "grow": SIZE_CHANGES[size_caption]}
    article = "another" if not first else "an" if c0[0] in "aeiou" else "a"
    text = f"{article} {c0} {shape} moves {direction} while turning {c1}{size_caption}"
    return obj, text


def render_video(rng: np.random.Generator, num_frames: int, height: int, width: int) -> tuple[np.ndarray, str]:
    """uint8 frames [F, H, W, 3] of 1-3 shapes on a plain background, and the caption describing them."""
    bg_name = str(rng.choice(list(BACKGROUNDS)))
    objects, parts = zip(*(_object(rng, i == 0) for i in range(int(rng.integers(1, 4)))))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        p = t / max(1, num_frames - 1)  # 0 -> 1 over the whole clip
        img = np.empty((height, width, 3), np.float32)
        img[:] = BACKGROUNDS[bg_name]
        for o in objects:
            along = 0.15 + 0.7 * p  # travels 70% of the frame, never wraps, so the caption stays true
            dx, dy = o["dir"]
            fx = along if dx > 0 else 1 - along if dx < 0 else o["across"]
            fy = along if dy > 0 else 1 - along if dy < 0 else o["across"]
            radius = o["radius"] * height * (1 + o["grow"] * p)
            img[_mask(o["shape"], yy, xx, fy * height, fx * width, radius)] = (1 - p) * o["col0"] + p * o["col1"]
        frames[t] = img.clip(0, 255).astype(np.uint8)
    return frames, f"{' and '.join(parts)} on a {bg_name} background"


def build_toy_videos(out_dir, num_videos: int = 24, videos_per_shard: int = 3, height: int = 64, width: int = 128,
                     frame_choices=(99, 121, 132, 165), fps: int = 24, seed: int = 0) -> list[Path]:
    """Write `ceil(num_videos / videos_per_shard)` shards `raw-NNNNNN.tar` into `out_dir`; returns their paths.

    Each shard is written to `.tar.tmp` and renamed, so a reader never sees a half-written shard.
    """
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
                sink.write({"__key__": f"toy_{v:05d}", "mp4": encode_mp4(frames, fps),
                            "json": json.dumps(meta).encode("utf-8")})
        os.replace(tmp, path)
        shards.append(path)
    return shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder for raw-NNNNNN.tar")
    ap.add_argument("--num-videos", type=int, default=24)
    ap.add_argument("--videos-per-shard", type=int, default=3)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--frames", type=int, nargs="+", default=[99, 121, 132, 165],
                    help="frame counts to draw each video's length from")
    ap.add_argument("--fps", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    shards = build_toy_videos(a.out, a.num_videos, a.videos_per_shard, a.height, a.width, tuple(a.frames), a.fps,
                              a.seed)
    print(f"wrote {len(shards)} shards to {a.out}")


if __name__ == "__main__":
    main()
