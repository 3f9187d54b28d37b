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

from dataclasses import dataclass
from pathlib import Path

from helios_train.data.asset_parts import locked_root, part


@dataclass
class ToyAssets:
    model_dir: Path
    raw_shards: list[Path]
    latent_shards: list[Path]


def ensure_toy_assets(root, seed: int = 0, spec: str = "toy", miniature_size: str = "full"):
    """The toy's (or `spec`'s) assets under `root`; spec=miniature builds helios_train/data/miniature_assets.py's."""
    from helios_train.data.encode_latents import encode_shards
    from helios_train.data.toy_checkpoint import build_toy_checkpoint
    from helios_train.data.toy_videos import build_toy_videos

    root = Path(root)
    if spec == "miniature":
        from helios_train.data.miniature_assets import ensure_miniature_assets

        return ensure_miniature_assets(root / "miniature", seed, str(miniature_size))
    home = root if spec == "toy" else root / spec
    home.mkdir(parents=True, exist_ok=True)
    with locked_root(root):
        part(home / "model", f"{spec} checkpoint", lambda: build_toy_checkpoint(home / "model", seed, spec))
        part(root / "raw", "toy videos", lambda: build_toy_videos(root / "raw", seed=seed))
        raw = sorted((root / "raw").glob("raw-*.tar"))
        # Other specs check production settings, not learning: two shards (6 videos) are enough to feed
        # two ranks and cost a quarter of the encoding.
        mine = raw if spec == "toy" else raw[:2]
        part(home / "latents", f"{spec} latents",
             lambda: encode_shards(mine, home / "latents", home / "model", min_frames=99, seed=seed))
    return ToyAssets(home / "model", raw, sorted((home / "latents").glob("latent-*.tar")))
