"""Raw mp4 shards → latent shards (VAE latents per 33-frame chunk + UMT5 prompt embedding).

    python -m data_prep.encode_latents --raw 'raw/raw-{000000..000099}.tar' --out latents/ --model /weights/helios
    torchrun --nproc_per_node=8 -m data_prep.encode_latents ...   # disjoint shards per rank

One output shard per input shard (`raw-000007.tar` → `latent-000007.tar`), written to `.tmp` and
renamed, so a re-run skips finished shards. Members per sample (no pickles): `latents.npy` float32
[S, C, 9, h, w] (normalised, each chunk encoded independently — spec inference_data §1.3),
`prompt_embed.npy` float32 [L, D] (zero rows after the prompt), `first_frame.png`, `json`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from helios_train.data.decoding import BadSample, caption_of, decode_json, decode_mp4
from helios_train.data.shards import expand_shards, iter_shard_samples

CHUNK = 33


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _png(frame: torch.Tensor) -> bytes:
    from PIL import Image

    rgb = ((frame.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def output_name(raw_path: str) -> str:
    name = Path(raw_path).name
    return ("latent-" + name[len("raw-"):]) if name.startswith("raw-") else f"latent-{name}"


def encode_shards(raw_shards, out_dir, model_dir, chunk_frames: int = CHUNK, min_frames: int = 99, device="cpu",
                  seed: int = 0, text_max_length: int = 512, rank: int = 0, world_size: int = 1,
                  sample: bool = True) -> dict:
    import webdataset as wds
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    from helios_train.model.text_codec import encode_prompts
    from helios_train.model.vae_codec import encode_chunks

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine = [str(p) for i, p in enumerate(raw_shards) if i % world_size == rank]
    todo = [p for p in mine if not (out / output_name(p)).is_file()]
    summary = {"shards_written": 0, "shards_skipped_existing": len(mine) - len(todo), "samples": 0, "skipped": {}}
    if not todo:
        return summary
    vae = AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae", dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    enc = UMT5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder").to(device).eval()
    gen = torch.Generator(device="cpu").manual_seed(seed + rank)
    errors: list[str] = []
    for raw_path in tqdm(todo, desc="encode shards", disable=rank != 0):
        dst = out / output_name(raw_path)
        tmp = dst.with_suffix(".tar.tmp")
        with wds.TarWriter(str(tmp)) as sink:
            for raw in iter_shard_samples(raw_path, lambda e: errors.append(str(e))):
                key = raw["__key__"]
                try:
                    if "mp4" not in raw:
                        raise BadSample("missing_member", f"{key}: no mp4 member")
                    meta = decode_json(raw.get("json"), f"{key}.json")
                    caption = caption_of(meta, key)
                    frames = decode_mp4(raw["mp4"], key)
                    if frames.shape[1] < max(min_frames, chunk_frames):
                        raise BadSample("too_short", f"{key}: {frames.shape[1]} frames < {max(min_frames, chunk_frames)}")
                except BadSample as bad:
                    summary["skipped"][bad.reason] = summary["skipped"].get(bad.reason, 0) + 1
                    continue
                latents = encode_chunks(vae, frames[None].to(device), chunk_frames, generator=gen, sample=sample)[0]
                embed = encode_prompts(tok, enc, [caption], max_length=text_max_length, device=device)[0]
                meta.update({"num_chunks": latents.shape[0], "latent_shape": list(latents.shape)})
                sink.write({"__key__": key, "latents.npy": _npy(latents.cpu().numpy().astype(np.float32)),
                            "prompt_embed.npy": _npy(embed.cpu().numpy().astype(np.float32)),
                            "first_frame.png": _png(frames[:, 0]), "json": json.dumps(meta).encode()})
                summary["samples"] += 1
        os.replace(tmp, dst)
        summary["shards_written"] += 1
    if errors:
        summary["skipped"]["unreadable_member"] = len(errors)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", required=True, help="raw shard pattern (brace pattern, glob or comma list)")
    ap.add_argument("--out", required=True, help="output folder for latent-*.tar")
    ap.add_argument("--model", required=True, help="diffusers-layout folder with vae/, text_encoder/, tokenizer/")
    ap.add_argument("--min-frames", type=int, default=121, help="drop shorter videos (official: 121)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--text-max-length", type=int, default=512)
    ap.add_argument("--mode", action="store_true", help="store the posterior mode instead of a sample "
                    "(official: sample)")
    a = ap.parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    summary = encode_shards(expand_shards(a.raw), a.out, a.model, CHUNK, a.min_frames, a.device, a.seed,
                            a.text_max_length, rank, world, sample=not a.mode)
    print(json.dumps({"rank": rank, **summary}))


if __name__ == "__main__":
    main()
