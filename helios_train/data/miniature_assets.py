"""The miniature's assets, built on first use (`model=miniature`, `python -m helios_train miniature`) under one root
and passed through the project's own data tools, as a user's data would be:

    root/clips/{train,heldout}/   mp4 clips + captions.jsonl (helios_train/data/miniature_world.py)
    root/raw/{train,heldout}/     raw shards (helios_train/data/videos_to_shards.py, 64×64, every clip ≥ 396 frames)
    root/model/                   a random 7 M-parameter Helios without memory patches, a tokenizer of the world's
                                  words, a tiny UMT5 (helios_train/data/toy_checkpoint.py SPECS["miniature"]) and a
                                  VAE trained here on the training clips (helios_train/model/vae_training.py);
                                  model/vae_report.json: its training curve and held-out reconstruction PSNR
    root/latents/train/           latent shards (helios_train/data/encode_latents.py)

Each part is marked complete by a `COMPLETE` file and rebuilt only when missing, so a killed build resumes at the
part it was in (and the data tools inside a part resume at their last complete shard). `MiniatureSize` sets the
counts: `full` for the README's run, `ci` for the suite's learning test (fewer clips, a shorter VAE training).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from helios_train.data import miniature_world as world

log = logging.getLogger(__name__)
CLIPS_PER_SHARD = 8


@dataclass(frozen=True)
class MiniatureSize:
    train_clips: int = 64
    heldout_clips: int = 16
    vae_steps: int = 1200
    vae_batch: int = 2
    text_max_length: int = 32  # the longest caption is ~25 tokens


SIZES = {"full": MiniatureSize(), "ci": MiniatureSize(train_clips=16, heldout_clips=4, vae_steps=300)}


@dataclass
class MiniatureAssets:
    root: Path
    model_dir: Path
    raw_train: list[Path]
    raw_heldout: list[Path]
    latent_shards: list[Path]
    vae_report: dict


def _clips_and_raw(root: Path, size: MiniatureSize, seed: int) -> None:
    from helios_train.data.videos_to_shards import videos_to_shards

    for split, count in (("train", size.train_clips), ("heldout", size.heldout_clips)):
        captions = world.write_split(root / "clips", split, count, seed)
        # 64×64 clips fall in the official 512×512 bucket; every clip is whole (396 frames = 12 chunks).
        videos_to_shards(captions.parent, captions, root / "raw" / split, height=world.SIZE, width=world.SIZE,
                         min_frames=world.CLIP_FRAMES, per_shard=CLIPS_PER_SHARD, bucket=(512, 512))


def _train_vae(model_dir: Path, raw_train: list[Path], raw_heldout: list[Path], size: MiniatureSize,
               seed: int) -> dict:
    """Train the model folder's VAE in place on the training clips; set its latent statistics; report."""
    import torch
    from diffusers import AutoencoderKLWan

    from helios_train.data.raw_clips import decoded_clips
    from helios_train.model.vae_training import latent_statistics, reconstruction_psnr, train_vae

    train = [frames for _, _, frames in decoded_clips(raw_train)]
    heldout = [frames for _, _, frames in decoded_clips(raw_heldout)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 11)
        vae = AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae", dtype=torch.float32)
        curve = train_vae(vae, train, size.vae_steps, batch=size.vae_batch, seed=seed)
    mean, std = latent_statistics(vae, train)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.save_pretrained(model_dir / "vae")
    psnr = reconstruction_psnr(vae, heldout)
    report = {"steps": size.vae_steps, "curve": curve, "heldout_psnr_db": float(np.mean(psnr)),
              "heldout_psnr_per_clip": psnr, "heldout_clips": len(heldout), "latents_mean": mean, "latents_std": std}
    (model_dir / "vae_report.json").write_text(json.dumps(report, indent=1))
    log.info("miniature VAE: held-out reconstruction %.2f dB over %d clips", report["heldout_psnr_db"], len(heldout))
    return report


def ensure_miniature_assets(root, seed: int = 0, size: str = "full") -> MiniatureAssets:
    """Build what is missing under `root` (file-locked: several processes may call it at once) and return it."""
    from helios_train.data.encode_latents import encode_shards
    from helios_train.data.asset_parts import locked_root, part
    from helios_train.data.toy_checkpoint import build_toy_checkpoint

    root = Path(root)
    sizes = SIZES[size]
    with locked_root(root):
        recorded = root / "size.json"
        if recorded.is_file() and json.loads(recorded.read_text())["size"] != size:
            raise ValueError(f"{root} holds the {json.loads(recorded.read_text())['size']!r} miniature, not {size!r}: "
                             "use another root (toy_root=...) or delete it")
        recorded.write_text(json.dumps({"size": size, **asdict(sizes)}))
        part(root / "raw", "miniature clips", lambda: _clips_and_raw(root, sizes, seed))
        raw_train = sorted((root / "raw" / "train").glob("raw-*.tar"))
        raw_heldout = sorted((root / "raw" / "heldout").glob("raw-*.tar"))

        def model() -> None:
            build_toy_checkpoint(root / "model", seed, "miniature")
            _train_vae(root / "model", raw_train, raw_heldout, sizes, seed)

        part(root / "model", "miniature model + VAE", model)
        part(root / "latents", "miniature latents",
             lambda: encode_shards(raw_train, root / "latents" / "train", root / "model", min_frames=world.CLIP_FRAMES,
                                   seed=seed, text_max_length=sizes.text_max_length, sample=False))
    report = json.loads((root / "model" / "vae_report.json").read_text())
    return MiniatureAssets(root, root / "model", raw_train, raw_heldout,
                           sorted((root / "latents" / "train").glob("latent-*.tar")), report)
