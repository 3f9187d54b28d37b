"""Folder of mp4s + captions → raw WebDataset shards (mp4 + json), filtered, cropped and resized.

    python -m data_prep.videos_to_shards --videos /data/clips --captions /data/clips/meta.json --out raw/

Captions: a JSON list like the official `toy_filter.json` (`path`, `cut` [start, end), `crop`
[x0, x1, y0, y1], `fps`, `cap` list — only `cap[0]` is used), or CSV / JSONL rows with `path` and
`caption`. As in the official helios/dataset/dataloader_mp4_dist.py: clips shorter than `--min-frames`
(121) are dropped; the nearest resolution bucket of the (cropped) clip must be the target size
(`--height 384 --width 640`, the official single-resolution setting); the clip is centre-cropped to the
target aspect and resized (bilinear, antialiased), then re-encoded as h264 at its fps. Videos are assigned to shards
in sorted order, `--per-shard` each, so a re-run skips the shards already written.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

# Official "640" bucket family (h, w), helios/dataset/dataloader_mp4_dist.py.
BUCKETS = [(768, 320), (768, 384), (640, 384), (768, 512), (576, 448), (512, 512), (448, 576), (512, 768),
           (384, 640), (384, 768), (320, 768)]


def nearest_bucket(height: int, width: int) -> tuple[int, int]:
    """min |h·bw − w·bh| over the buckets; ties go to the later entry (official comparison)."""
    best, best_err = None, None
    for bh, bw in BUCKETS:
        err = abs(height * bw - width * bh)
        if best_err is None or err <= best_err:
            best, best_err = (bh, bw), err
    return best


def read_captions(path: Path) -> list[dict]:
    """Normalise the caption file to records {path, caption, cut, crop}."""
    text = path.read_text()
    if path.suffix == ".json":
        rows = json.loads(text)
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        raise ValueError(f"{path}: caption file must be .json (list), .jsonl or .csv")
    out = []
    for i, row in enumerate(rows):
        if "path" not in row:
            raise ValueError(f"{path}: record {i} has no 'path'")
        cap = row.get("caption", row.get("cap"))
        cap = cap[0] if isinstance(cap, list) and cap else cap
        out.append({"path": row["path"], "caption": cap, "cut": row.get("cut"), "crop": row.get("crop")})
    return out


def process_clip(rec: dict, video_dir: Path, height: int, width: int, min_frames: int,
                 bucket: tuple[int, int] | None = None):
    """→ (uint8 frames [F, height, width, 3], fps) or a skip reason string."""
    import decord

    path = video_dir / rec["path"]
    if not path.is_file():
        return "missing_file"
    if not rec["caption"]:
        return "missing_caption"
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        fps = float(reader.get_avg_fps())
        start, end = rec["cut"] or (0, len(reader))
        end = min(end, len(reader))
        if end - start < min_frames:
            return "too_short"
        frames = reader.get_batch(list(range(start, end))).asnumpy()
    except Exception:
        return "decode_error"
    if rec["crop"]:
        x0, x1, y0, y1 = rec["crop"]
        frames = frames[:, y0:y1, x0:x1]
    h, w = frames.shape[1:3]
    if nearest_bucket(h, w) != (bucket or (height, width)):
        return "wrong_aspect"  # official single_res: keep only clips whose nearest bucket is the target
    # Centre-crop to the target aspect, then resize (bilinear + antialias; no torchvision).
    if h * width > w * height:
        nh = round(w * height / width)
        frames = frames[:, (h - nh) // 2 : (h - nh) // 2 + nh]
    else:
        nw = round(h * width / height)
        frames = frames[:, :, (w - nw) // 2 : (w - nw) // 2 + nw]
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy(), fps


def videos_to_shards(video_dir, captions, out_dir, height=384, width=640, min_frames=121, per_shard=64,
                     bucket: tuple[int, int] | None = None) -> dict:
    """`bucket` (default: (height, width)) is the resolution bucket clips must fall in; the output
    size may be smaller with the same aspect (e.g. 192×320 for quick experiments)."""
    import webdataset as wds

    from helios_train.data.video_io import encode_mp4

    video_dir, out = Path(video_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = sorted(read_captions(Path(captions)), key=lambda r: (r["path"], str(r["cut"])))
    summary = {"shards_written": 0, "shards_skipped_existing": 0, "samples": 0, "skipped": {}}
    groups = [records[i : i + per_shard] for i in range(0, len(records), per_shard)]
    for index, group in enumerate(tqdm(groups, desc="shards")):
        dst = out / f"raw-{index:06d}.tar"
        if dst.is_file():
            summary["shards_skipped_existing"] += 1
            continue
        tmp = dst.with_suffix(".tar.tmp")
        with wds.TarWriter(str(tmp)) as sink:
            for rec in group:
                result = process_clip(rec, video_dir, height, width, min_frames, bucket)
                if isinstance(result, str):
                    summary["skipped"][result] = summary["skipped"].get(result, 0) + 1
                    continue
                frames, fps = result
                stem = Path(rec["path"]).stem
                cut = rec["cut"] or (0, len(frames))
                key = f"{stem}_{cut[0]}-{cut[1]}".replace(".", "_")
                meta = {"caption": rec["caption"], "num_frames": len(frames), "fps": fps, "height": height,
                        "width": width, "source": rec["path"]}
                sink.write({"__key__": key, "mp4": encode_mp4(frames, round(fps)), "json": json.dumps(meta).encode()})
                summary["samples"] += 1
        os.replace(tmp, dst)
        summary["shards_written"] += 1
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", required=True, help="folder the caption paths are relative to")
    ap.add_argument("--captions", required=True, help=".json list (toy_filter.json style), .jsonl or .csv")
    ap.add_argument("--out", required=True)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--min-frames", type=int, default=121)
    ap.add_argument("--per-shard", type=int, default=64, help="videos per shard")
    ap.add_argument("--bucket", default=None, help="HxW bucket clips must match (default: --height x --width)")
    a = ap.parse_args()
    bucket = tuple(int(v) for v in a.bucket.split("x")) if a.bucket else None
    print(json.dumps(videos_to_shards(a.videos, a.captions, a.out, a.height, a.width, a.min_frames, a.per_shard,
                                      bucket)))


if __name__ == "__main__":
    main()
