"""Raw mp4 shards → latent shards (VAE latents per 33-frame chunk + UMT5 prompt embedding).

    python -m data_prep.encode_latents --raw 'raw/raw-{000000..000099}.tar' --out latents/ --model /weights/helios
    torchrun --nproc_per_node=8 -m data_prep.encode_latents ...   # disjoint shards per rank

Input samples: `mp4` + `json` with a caption (see helios_train/data/toy_videos.py). One output shard per input
shard (`raw-000007.tar` → `latent-000007.tar`), written by helios_train/data/shard_writer.py: complete or not
at all, kept on a re-run only while the raw shard, the model and the options are unchanged; skipped
samples are listed with their reasons in `skipped.jsonl` (`skipped-rank<r>.jsonl` under torchrun). Members per sample (no pickles anywhere):
`latents.npy` float32 [S, C, 9, h, w] (normalised, each 33-frame chunk encoded independently — official
tools/offload_data/get_short-latents.py), `prompt_embed.npy` float32 [L, D] (zero rows after the prompt,
official `HeliosPipeline._get_t5_prompt_embeds`),
`first_frame.png` (frame 0, RGB) and `json` {caption, num_frames, fps, height, width, num_chunks,
latent_shape}. Videos shorter than `min_frames` are skipped and counted.
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

from helios_train.data.decoding import BadSample, caption_of, decode_json, open_mp4, read_frames, to_unit_range
from helios_train.data.shard_writer import ShardWriter, file_fingerprint, folder_fingerprint, run_tool
from helios_train.data.shards import DAMAGED, expand_shards, iter_shard_samples

CHUNK = 33


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def output_name(raw_path) -> str:
    name = Path(raw_path).name
    return ("latent-" + name[len("raw-"):]) if name.startswith("raw-") else f"latent-{name}"


def _decode(raw: dict, chunk_frames: int, min_frames: int) -> tuple[str, dict, torch.Tensor]:
    """One raw sample → (key, json meta, uint8 frames [S*33, H, W, 3]); raises BadSample to skip it."""
    key = raw["__key__"]
    if "mp4" not in raw:
        raise BadSample("missing_member", f"{key}: no mp4 member")
    meta = decode_json(raw.get("json"), f"{key}.json")
    meta["caption"] = caption_of(meta, key)
    reader = open_mp4(raw["mp4"], key)
    n = len(reader)
    if n < max(min_frames, chunk_frames):
        raise BadSample("too_short", f"{key}: {n} frames < {max(min_frames, chunk_frames)}")
    # Only whole chunks are encoded (trailing frames are dropped, official get_short-latents.py): do not
    # decode the rest.
    frames = read_frames(reader, key, list(range(n // chunk_frames * chunk_frames)))
    meta.update(num_frames=n, fps=float(meta.get("fps") or reader.get_avg_fps()),
                height=int(frames.shape[1]), width=int(frames.shape[2]))
    return key, meta, frames


def count_samples(path) -> int | None:
    """Samples in a tar shard from its member headers (no payload is read), for the progress bar."""
    import tarfile

    try:
        with tarfile.open(path) as tar:
            return len({m.name.rsplit("/", 1)[-1].split(".", 1)[0] for m in tar if m.isfile()})
    except (OSError, tarfile.TarError):
        return None


class _Encoder:
    """The VAE and text encoder of `model_dir`, encoding batches of decoded videos into a shard sink."""

    def __init__(self, model_dir, device, text_dtype, seed: int, chunk_frames: int, sample: bool,
                 text_max_length: int, bar):
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        # fp32 VAE as in the official offload script; the text encoder may run in bf16 on GPU (official),
        # the stored embedding is fp32 either way.
        self.vae = AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae", dtype=torch.float32).to(device).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
        self.enc = UMT5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder",
                                                    dtype=text_dtype).to(device).eval()
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.device, self.chunk_frames, self.sample, self.text_max_length = device, chunk_frames, sample, text_max_length
        self.bar = bar

    def flush(self, sink, batch: list) -> None:
        from helios_train.model.text_codec import encode_prompts
        from helios_train.model.vae_codec import encode_chunks

        frames = torch.stack([f for _, _, f in batch])  # [B, S*33, H, W, 3] uint8
        latents = encode_chunks(self.vae, to_unit_range(frames).to(self.device), self.chunk_frames, generator=self.gen,
                                sample=self.sample)
        embeds = encode_prompts(self.tok, self.enc, [m["caption"] for _, m, _ in batch],
                                max_length=self.text_max_length, device=self.device)
        for (key, meta, f), lat, emb in zip(batch, latents, embeds):
            meta.update(num_chunks=int(lat.shape[0]), latent_shape=list(lat.shape))
            sink.write({"__key__": key, "latents.npy": _npy(lat.cpu().numpy().astype(np.float32)),
                        "prompt_embed.npy": _npy(emb.cpu().numpy().astype(np.float32)),
                        "first_frame.png": _png(f[0].numpy()), "json": json.dumps(meta).encode("utf-8")})
        self.bar.update(len(batch))
        batch.clear()

    def shard(self, sink, raw_path: str, min_frames: int, batch_size: int) -> None:
        """Every sample of one raw shard into `sink`; bad ones skipped with their reason, in input order."""
        batch: list = []
        errors: list[Exception] = []  # damage after the last sample (once per shard)
        for raw in iter_shard_samples(raw_path, errors.append):
            damaged = raw.pop(DAMAGED, None)
            try:
                item = _decode(raw, self.chunk_frames, min_frames)
            except BadSample as bad:
                reason, why = ("unreadable_member", f"{bad} — {damaged}") if damaged else (bad.reason, str(bad))
                sink.skip(f"{raw_path}:{raw.get('__key__')}", reason, why)
                self.bar.update()
                continue
            if damaged:  # whole despite the damage right after it: kept; the lost rest is listed
                sink.skip(f"{raw_path}:after {raw['__key__']}", "unreadable_member", damaged)
            if batch and batch[0][2].shape != item[2].shape:
                self.flush(sink, batch)  # the VAE batch needs equal shapes
            batch.append(item)
            if len(batch) >= batch_size:
                self.flush(sink, batch)
        if batch:
            self.flush(sink, batch)
        for exn in errors:
            sink.skip(raw_path, "unreadable_member", str(exn))


def encode_shards(raw_shards, out_dir, model_dir, chunk_frames: int = CHUNK, min_frames: int = 99, device="cpu",
                  batch_size: int = 1, seed: int = 0, text_max_length: int = 512, rank: int = 0,
                  world_size: int = 1, sample: bool = True, text_dtype: torch.dtype = torch.float32,
                  require_samples: bool = True) -> dict:
    """Encode every raw shard whose latent shard is missing or out of date (helios_train/data/shard_writer.py:
    the raw shard's size/mtime, the model's files and every option below are in the manifest).
    Returns the ShardWriter summary {"shards_written", "shards_up_to_date", "samples", "skipped": {reason: n}, …}.

    `batch_size` videos with the same frame count and size go through the VAE together (videos of
    other shapes are flushed first, so output order = input order). `rank`/`world_size` split the
    shard list round-robin for torchrun. `sample=False` stores the posterior mode instead of a sample.
    """
    mine = [str(p) for i, p in enumerate(raw_shards) if i % world_size == rank]
    # Options that change the bytes written; the seed is per rank, so the rank split is part of it.
    options = {"chunk_frames": chunk_frames, "min_frames": min_frames, "seed": seed + rank, "sample": sample,
               "text_max_length": text_max_length, "text_dtype": str(text_dtype), "batch_size": batch_size,
               "model": folder_fingerprint(Path(model_dir) / "vae") + folder_fingerprint(Path(model_dir) / "text_encoder")}
    writer = ShardWriter(out_dir, "encode_latents", options, part=f"rank{rank:03d}" if world_size > 1 else None)
    todo = [(p, output_name(p), file_fingerprint(p)) for p in mine]
    todo = [(p, name, fp) for p, name, fp in todo if not writer.up_to_date(name, fp)]
    if not todo:
        return writer.finish(require_samples=require_samples and bool(mine))  # nothing to do: no model loaded
    counts = [count_samples(p) for p, _, _ in todo]
    with tqdm(total=None if None in counts else sum(counts), desc="encode samples", unit="sample",
              disable=rank != 0) as bar:
        encoder = _Encoder(model_dir, device, text_dtype, seed + rank, chunk_frames, sample, text_max_length, bar)
        for raw_path, name, fingerprint in todo:
            bar.set_postfix_str(Path(raw_path).name)
            with writer.shard(name, fingerprint) as sink:
                encoder.shard(sink, raw_path, min_frames, batch_size)
    return writer.finish(require_samples=require_samples)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", required=True, help="raw shard pattern (brace pattern, glob or comma list)")
    ap.add_argument("--out", required=True, help="output folder for latent-*.tar")
    ap.add_argument("--model", required=True, help="diffusers-layout folder with vae/, text_encoder/, tokenizer/")
    ap.add_argument("--min-frames", type=int, default=121, help="drop shorter videos (official: 121)")
    ap.add_argument("--chunk-frames", type=int, default=CHUNK, help="pixel frames per independently encoded chunk")
    ap.add_argument("--batch-size", type=int, default=1, help="videos per VAE call (equal shapes only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--text-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="text encoder weights (official offload: bfloat16 on GPU)")
    ap.add_argument("--seed", type=int, default=42, help="VAE posterior sampling seed (+ rank)")
    ap.add_argument("--text-max-length", type=int, default=512)
    ap.add_argument("--mode", action="store_true", help="store the posterior mode instead of a sample "
                    "(official: sample)")
    a = ap.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    run_tool(lambda: {"rank": rank, **encode_shards(
        expand_shards(a.raw), a.out, a.model, chunk_frames=a.chunk_frames, min_frames=a.min_frames, device=a.device,
        batch_size=a.batch_size, seed=a.seed, text_max_length=a.text_max_length, rank=rank, world_size=world,
        sample=not a.mode, text_dtype=getattr(torch, a.text_dtype))})


if __name__ == "__main__":
    main()
