"""Toy assets for `model=toy data=toy`, built once on first use under one root folder:

    root/model/    tiny random Helios checkpoint, diffusers layout (helios_train/data/toy_checkpoint.py)
    root/raw/      synthetic moving-shape mp4 videos in WebDataset shards (helios_train/data/toy_videos.py)
    root/latents/  the same videos VAE-encoded per 33-frame chunk + prompt embeddings (encode_latents.py)

Other model specs (`helios_train/data/toy_checkpoint.py:SPECS`, e.g. `helios_14b_shape`) get their own model and
latents under root/<spec>/ and share root/raw/.

Each part is marked complete by a `COMPLETE` file; a file lock lets several processes (torchrun
ranks, parallel tests) call `ensure_toy_assets` at once: one builds, the others wait and reuse.
"""
from __future__ import annotations

import fcntl
import time
from dataclasses import dataclass
from pathlib import Path

MARKER = "COMPLETE"


@dataclass
class ToyAssets:
    model_dir: Path
    raw_shards: list[Path]
    latent_shards: list[Path]


def _part(path: Path, label: str, build) -> None:
    if (path / MARKER).is_file():
        return
    t0 = time.perf_counter()
    build()
    (path / MARKER).write_text("ok")
    print(f"[helios-train] built toy {label} in {time.perf_counter() - t0:.1f}s -> {path}", flush=True)


def ensure_toy_assets(root, seed: int = 0, spec: str = "toy") -> ToyAssets:
    from helios_train.data.encode_latents import encode_shards
    from helios_train.data.toy_checkpoint import build_toy_checkpoint
    from helios_train.data.toy_videos import build_toy_videos

    root = Path(root)
    home = root if spec == "toy" else root / spec
    home.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _part(home / "model", f"{spec} checkpoint", lambda: build_toy_checkpoint(home / "model", seed, spec))
            _part(root / "raw", "videos", lambda: build_toy_videos(root / "raw", seed=seed))
            raw = sorted((root / "raw").glob("raw-*.tar"))
            # Other specs check production settings, not learning: two shards (6 videos) are enough to feed
            # two ranks and cost a quarter of the encoding.
            mine = raw if spec == "toy" else raw[:2]
            _part(home / "latents", f"{spec} latents",
                  lambda: encode_shards(mine, home / "latents", home / "model", min_frames=99, seed=seed))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return ToyAssets(home / "model", raw, sorted((home / "latents").glob("latent-*.tar")))
