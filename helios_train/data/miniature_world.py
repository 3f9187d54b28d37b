"""The miniature's world: long procedural clips whose future is known, with captions that describe them.

    python -m data_prep.miniature_videos --out data/miniature [--train 64 --heldout 16 --seed 0]
    python -m data_prep.videos_to_shards --videos data/miniature/train --captions data/miniature/train/captions.jsonl \
        --out data/miniature/raw/train --height 64 --width 64 --bucket 512x512 --min-frames 396

Each clip is one object (circle, square or triangle) on a plain or two-colour gradient background, moving at
constant speed and bouncing off the borders (left and right, up and down, or diagonally), optionally cycling
between two colours or pulsing in size on a fixed period. Everything is a function of the clip's parameters
(`Clip`), so the frames of any instant are known exactly: `render(clip, frames)` is the ground truth the
evaluation compares generated continuations with (helios_train/evaluation/).

Clips are 12 chunks of 33 frames (396 frames) long: one chunk given, 11 to continue. The held-out split is drawn
from other seeds and includes the (shape, motion) pairs training never sees (`UNSEEN_IN_TRAINING`), so the
evaluation separates new instances of known combinations from new combinations.

The caption grammar is fixed and invertible (`parse_caption`): the evaluation's tracker reads what a video
should show from its caption alone, so it also scores T2V samples for prompts the world generated.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

CHUNK_FRAMES = 33
CLIP_CHUNKS = 12
CLIP_FRAMES = CHUNK_FRAMES * CLIP_CHUNKS  # 396
FPS = 24
SIZE = 64  # pixels, square: 8x8 latents under Wan's 8x spatial VAE

COLOURS = {"red": (225, 45, 40), "green": (40, 200, 70), "blue": (55, 95, 235), "yellow": (240, 220, 45),
           "white": (240, 240, 240), "orange": (245, 140, 30), "purple": (160, 65, 210), "cyan": (40, 210, 220)}
BACKGROUNDS = {"black": (12, 12, 12), "dark blue": (18, 24, 80), "dark green": (18, 60, 30), "gray": (100, 100, 100),
               "brown": (85, 55, 30)}
SHAPES = ("circle", "square", "triangle")
# motion phrase -> unit axis of the bounce (x, y); the sign of each component is drawn per clip
MOTIONS = {"left and right": (1.0, 0.0), "up and down": (0.0, 1.0), "diagonally": (1.0, 1.0)}
SPEEDS = {"slowly": 0.6, "quickly": 1.2}  # pixels per frame along each moving axis
COLOUR_PERIOD = 4 * CHUNK_FRAMES  # frames for a colour cycle c0 -> c1 -> c0
PULSE_PERIOD = 3 * CHUNK_FRAMES  # frames for a size cycle r -> 1.35 r -> r
PULSE_GAIN = 0.35
UNSEEN_IN_TRAINING = {("square", "diagonally"), ("triangle", "up and down")}
HELDOUT_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class Clip:
    """Every parameter that decides a clip's frames (positions in pixels, colours by name)."""

    name: str
    shape: str
    colour: str
    motion: str
    speed: str
    background: str
    background2: Optional[str]  # gradient towards this colour at the bottom; None = plain
    colour2: Optional[str]  # cycles colour -> colour2 -> colour every COLOUR_PERIOD frames; None = fixed
    pulse: bool  # size cycles every PULSE_PERIOD frames
    radius: float
    x0: float
    y0: float
    sign_x: int
    sign_y: int
    combo_seen: bool = True  # (shape, motion) appears in the training split

    def caption(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        text = f"{article} {self.colour} {self.shape} bounces {self.motion} {self.speed}"
        if self.colour2:
            text += f" while turning {self.colour2} and back"
        if self.pulse:
            text += " and pulsing"
        background = f"{self.background} and {self.background2} gradient" if self.background2 else self.background
        return f"{text} on a {background} background"


def caption_vocabulary() -> list[str]:
    """Every word a miniature caption can use (the miniature's tokenizer is trained on these)."""
    words = "a an bounces while turning and back pulsing on background gradient"
    return [*COLOURS, *BACKGROUNDS, *SHAPES, *MOTIONS, *SPEEDS, words]


def parse_caption(caption: str) -> Optional[dict]:
    """The attributes a caption of this grammar names ({shape, colour, colour2, motion, speed, pulse, background}),
    or None for a caption this world did not write."""
    words = caption.split(" ")
    if len(words) < 6 or words[0] not in ("a", "an") or words[3] != "bounces":
        return None
    colour, shape, rest = words[1], words[2], " ".join(words[4:])
    motion = next((m for m in MOTIONS if rest.startswith(m + " ")), None)
    if colour not in COLOURS or shape not in SHAPES or motion is None:
        return None
    rest = rest[len(motion) + 1:]
    speed = rest.split(" ")[0]
    colour2 = rest.split("while turning ")[1].split(" ")[0] if "while turning " in rest else None
    background = rest.split(" on a ")[-1].removesuffix(" background")
    return {"shape": shape, "colour": colour, "colour2": colour2, "motion": motion, "speed": speed,
            "pulse": " and pulsing" in rest, "background": background.split(" and ")[0].removesuffix(" gradient")}


def _pick(rng: np.random.Generator, items) -> str:
    items = list(items)
    return items[int(rng.integers(len(items)))]


def draw_clip(seed: int, name: str, heldout: bool = False) -> Clip:
    """One clip's parameters from its seed. Training clips never draw an UNSEEN_IN_TRAINING (shape, motion)."""
    rng = np.random.default_rng(seed)
    while True:
        shape, motion = _pick(rng, SHAPES), _pick(rng, MOTIONS)
        if heldout or (shape, motion) not in UNSEEN_IN_TRAINING:
            break
    colour = _pick(rng, COLOURS)
    background = _pick(rng, BACKGROUNDS)
    background2 = _pick(rng, [b for b in BACKGROUNDS if b != background]) if rng.random() < 0.3 else None
    colour2 = _pick(rng, [c for c in COLOURS if c != colour]) if rng.random() < 0.4 else None
    radius = float(rng.uniform(6.0, 9.0))
    margin = radius * (1 + PULSE_GAIN)
    return Clip(name=name, shape=shape, colour=colour, motion=motion, speed=_pick(rng, SPEEDS), background=background,
                background2=background2, colour2=colour2, pulse=bool(rng.random() < 0.3), radius=radius,
                x0=float(rng.uniform(margin, SIZE - margin)), y0=float(rng.uniform(margin, SIZE - margin)),
                sign_x=int(rng.choice([-1, 1])), sign_y=int(rng.choice([-1, 1])),
                combo_seen=(shape, motion) not in UNSEEN_IN_TRAINING)


def _bounce(start: float, velocity: float, t: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Position at times t of a point moving at `velocity` inside [lo, hi], reflected at both ends."""
    span = hi - lo
    folded = np.mod(start - lo + velocity * t, 2 * span)
    return lo + np.where(folded <= span, folded, 2 * span - folded)


def states(clip: Clip, frames: np.ndarray) -> dict[str, np.ndarray]:
    """Ground-truth object state at each frame index: centre x, y (pixels), radius, RGB colour [N, 3]."""
    t = np.asarray(frames, dtype=np.float64)
    ax, ay = MOTIONS[clip.motion]
    speed = SPEEDS[clip.speed]
    phase = (1 - np.cos(2 * math.pi * t / PULSE_PERIOD)) / 2
    radius = clip.radius * (1 + PULSE_GAIN * phase) if clip.pulse else np.full_like(t, clip.radius)
    margin = clip.radius * (1 + PULSE_GAIN)  # the bounce walls do not move with the pulse
    x = _bounce(clip.x0, clip.sign_x * speed * ax, t, margin, SIZE - margin)
    y = _bounce(clip.y0, clip.sign_y * speed * ay, t, margin, SIZE - margin)
    c0 = np.array(COLOURS[clip.colour], np.float64)
    if clip.colour2:
        mix = ((1 - np.cos(2 * math.pi * t / COLOUR_PERIOD)) / 2)[:, None]
        colour = (1 - mix) * c0 + mix * np.array(COLOURS[clip.colour2], np.float64)
    else:
        colour = np.broadcast_to(c0, (len(t), 3)).copy()
    return {"x": x, "y": y, "radius": radius, "colour": colour}


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (a one-pixel ramp at the edge, so motion is smooth, not pixel-stepped)."""
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        dist = np.sqrt(dy * dy + dx * dx) - r
    elif shape == "square":
        dist = np.maximum(np.abs(dy), np.abs(dx)) - r * 0.9
    else:  # triangle, apex up: inside when below the two slanted edges and above the base
        dist = np.maximum(dy - r * 0.8, (np.abs(dx) * 2 - (dy + r)) / math.sqrt(5))
    return np.clip(0.5 - dist, 0.0, 1.0)


def render(clip: Clip, frames) -> np.ndarray:
    """uint8 RGB frames [N, SIZE, SIZE, 3] of `clip` at the given frame indices."""
    frames = np.asarray(frames)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    top = np.array(BACKGROUNDS[clip.background], np.float64)
    bottom = np.array(BACKGROUNDS[clip.background2 or clip.background], np.float64)
    ramp = (yy / SIZE)[..., None]
    background = (1 - ramp) * top + ramp * bottom
    s = states(clip, frames)
    out = np.empty((len(frames), SIZE, SIZE, 3), np.uint8)
    for i in range(len(frames)):
        cover = _shape_mask(clip.shape, yy, xx, s["y"][i], s["x"][i], s["radius"][i])[..., None]
        out[i] = np.clip((1 - cover) * background + cover * s["colour"][i], 0, 255).round().astype(np.uint8)
    return out


def split_clips(split: str, count: int, seed: int = 0) -> list[Clip]:
    """`count` clips of `split` ("train" | "heldout"); held-out seeds never meet training seeds."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split {split!r}: expected 'train' or 'heldout'")
    base = seed * 7919 + (HELDOUT_SEED_OFFSET if split == "heldout" else 0)
    return [draw_clip(base + i, f"{split}_{i:05d}", heldout=split == "heldout") for i in range(count)]


def write_split(out_dir, split: str, count: int, seed: int = 0) -> Path:
    """Render `count` clips of `split` as h264 mp4 into `out_dir/<split>/` with `captions.jsonl` (path, caption and
    the clip's parameters under "world"); a clip already written with the same parameters is kept. Returns the
    captions file — the input of `python -m data_prep.videos_to_shards`."""
    from helios_train.data.video_io import encode_mp4
    from helios_train.runtime.atomic_file import write_text_atomically

    folder = Path(out_dir) / split
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for clip in split_clips(split, count, seed):
        params = asdict(clip)
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        path = folder / f"{clip.name}-{digest}.mp4"  # the name changes with the parameters: no stale clip is kept
        if not path.is_file():
            tmp = path.with_suffix(".mp4.tmp")
            tmp.write_bytes(encode_mp4(render(clip, np.arange(CLIP_FRAMES)), FPS))
            tmp.replace(path)
        rows.append({"path": path.name, "caption": clip.caption(), "world": params})
    captions = folder / "captions.jsonl"
    write_text_atomically(captions, "".join(json.dumps(r) + "\n" for r in rows))
    return captions


def clip_from_record(record: dict) -> Optional[Clip]:
    """The Clip of a captions.jsonl / shard json record that carries its world parameters, else None."""
    world = record.get("world")
    return Clip(**world) if isinstance(world, dict) else None


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder; clips go to <out>/train and <out>/heldout")
    ap.add_argument("--train", type=int, default=64, help="training clips")
    ap.add_argument("--heldout", type=int, default=16, help="held-out clips (other seeds, unseen combinations)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for split, count in (("train", a.train), ("heldout", a.heldout)):
        print(f"wrote {count} clips: {write_split(a.out, split, count, a.seed)}")
