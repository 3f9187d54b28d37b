"""Folder of mp4s + captions → raw WebDataset shards (mp4 + json), filtered, cropped and resized.

    python -m data_prep.videos_to_shards --videos /data/clips --captions /data/clips/meta.json --out raw/

Captions: a JSON list like the official `toy_filter.json` (`path`, `cut` [start, end), `crop`
[x0, x1, y0, y1], `fps`, `cap` list — only `cap[0]` is used), or CSV / JSONL rows with `path` and
`caption`. As in the official helios/dataset/dataloader_mp4_dist.py: clips shorter than `--min-frames`
(121) are dropped; the nearest resolution bucket of the (cropped) clip must be the target size
(`--height 384 --width 640`, the official single-resolution setting); the clip is centre-cropped to the
target aspect and resized (bilinear, antialiased), then re-encoded as h264 at its fps. Videos are assigned to shards
in sorted order, `--per-shard` each. Output is written by helios_train/data/shard_writer.py: a re-run keeps a
shard only while its clips, captions and options are unchanged; every skipped clip is listed with its
reason in `skipped.jsonl`; a run where no clip survives exits 1.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from helios_train.data.decoding import BadSample
from helios_train.data.shard_writer import ShardWriter, file_fingerprint, run_tool
from helios_train.runtime.prompt_file import InputError

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
    """Normalise the caption file to records {path, caption, cut, crop}; a bad file or record fails
    naming the file and the record."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exn:
        raise InputError(f"--captions {path}: cannot read it ({exn})") from None
    try:
        if path.suffix == ".json":
            rows = json.loads(text)
            if not isinstance(rows, list):
                raise InputError(f"--captions {path}: expected a JSON list of records, got {type(rows).__name__}")
        elif path.suffix == ".jsonl":
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exn:
                        raise InputError(f"--captions {path}: line {n} is not JSON ({exn.msg})") from None
        elif path.suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
        else:
            raise InputError(f"--captions {path}: must be .json (list), .jsonl or .csv")
    except json.JSONDecodeError as exn:
        raise InputError(f"--captions {path}: not valid JSON at line {exn.lineno} column {exn.colno} ({exn.msg})") from None
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "path" not in row:
            raise InputError(f"--captions {path}: record {i} has no 'path' ({str(row)[:80]})")
        cap = row.get("caption", row.get("cap"))
        cap = cap[0] if isinstance(cap, list) and cap else cap
        for field, size in (("cut", 2), ("crop", 4)):
            value = row.get(field)
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != size):
                raise InputError(f"--captions {path}: record {i} ({row['path']}): '{field}' must be a list of "
                                 f"{size} integers, got {value!r}")
        out.append({"path": row["path"], "caption": cap or None, "cut": row.get("cut"), "crop": row.get("crop")})
    if not out:
        raise InputError(f"--captions {path}: no record in it")
    return out


def process_clip(rec: dict, video_dir: Path, height: int, width: int, min_frames: int,
                 bucket: tuple[int, int] | None = None):
    """→ (uint8 frames [F, height, width, 3], fps), or a BadSample saying why the clip is skipped."""
    import decord

    path = video_dir / rec["path"]
    if not path.is_file():
        return BadSample("missing_file", f"{path} does not exist")
    if not rec["caption"]:
        return BadSample("missing_caption", "no caption in the caption file")
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        fps = float(reader.get_avg_fps())
        start, end = rec["cut"] or (0, len(reader))
        end = min(end, len(reader))
        if end - start < min_frames:
            return BadSample("too_short", f"{end - start} frames in the cut [{start}, {end}) < --min-frames {min_frames}")
        frames = reader.get_batch(list(range(start, end))).asnumpy()
    except Exception as exn:
        return BadSample("decode_error", f"{type(exn).__name__}: {str(exn)[:200]}")
    if rec["crop"]:
        x0, x1, y0, y1 = rec["crop"]
        frames = frames[:, y0:y1, x0:x1]
    h, w = frames.shape[1:3]
    target = bucket or (height, width)
    if nearest_bucket(h, w) != target:  # official single_res: keep only clips whose nearest bucket is the target
        return BadSample("wrong_aspect", f"{h}x{w} falls in bucket {nearest_bucket(h, w)}, not {target}")
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
    size may be smaller with the same aspect (e.g. 192×320 for quick experiments). Returns the
    ShardWriter summary; raises InputError on a bad caption file or folder, NoSamplesWritten when no
    clip survives."""
    from helios_train.data.video_io import encode_mp4

    video_dir = Path(video_dir)
    records = sorted(read_captions(Path(captions)), key=lambda r: (r["path"], str(r["cut"])))
    if not video_dir.is_dir():
        raise InputError(f"--videos {video_dir}: not a folder (the caption paths are relative to it)")
    options = {"height": height, "width": width, "min_frames": min_frames, "per_shard": per_shard,
               "bucket": list(bucket or (height, width))}
    writer = ShardWriter(out_dir, "videos_to_shards", options)
    groups = [records[i : i + per_shard] for i in range(0, len(records), per_shard)]
    bar = tqdm(total=len(records), desc="clips", unit="clip")
    for index, group in enumerate(groups):
        name = f"raw-{index:06d}.tar"
        # A shard's inputs: its caption records and each video file's size and mtime.
        inputs = [{"record": rec, "file": file_fingerprint(video_dir / rec["path"])} for rec in group]
        if writer.up_to_date(name, inputs):
            bar.update(len(group))
            continue
        with writer.shard(name, inputs) as sink:
            for rec in group:
                result = process_clip(rec, video_dir, height, width, min_frames, bucket)
                bar.update()
                if isinstance(result, BadSample):
                    sink.skip(rec["path"], result.reason, str(result))
                    continue
                frames, fps = result
                stem = Path(rec["path"]).stem
                cut = rec["cut"] or (0, len(frames))
                key = f"{stem}_{cut[0]}-{cut[1]}".replace(".", "_")
                meta = {"caption": rec["caption"], "num_frames": len(frames), "fps": fps, "height": height,
                        "width": width, "source": rec["path"]}
                sink.write({"__key__": key, "mp4": encode_mp4(frames, round(fps)), "json": json.dumps(meta).encode()})
    bar.close()
    return writer.finish()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", required=True, help="folder the caption paths are relative to")
    ap.add_argument("--captions", required=True, help=".json list (toy_filter.json style), .jsonl or .csv")
    ap.add_argument("--out", required=True)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--min-frames", type=int, default=121)
    ap.add_argument("--per-shard", type=int, default=64, help="videos per shard")
    ap.add_argument("--bucket", default=None, help="HxW bucket clips must match (default: --height x --width)")
    a = ap.parse_args(argv)
    bucket = tuple(int(v) for v in a.bucket.split("x")) if a.bucket else None
    run_tool(lambda: videos_to_shards(a.videos, a.captions, a.out, a.height, a.width, a.min_frames, a.per_shard,
                                      bucket))


if __name__ == "__main__":
    main()
