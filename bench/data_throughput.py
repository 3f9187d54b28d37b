"""Data throughput, side by side on the same clips: bare decord decode vs our loader (raw, latents).

    python bench/data_throughput.py [--toy-root checkpoints/_toy] [--samples 96] [--workers 0,2]
    python bench/data_throughput.py --videos /data/clips [--captions meta.json] [--height 384 --width 640]

`--videos`: your own mp4 clips, made into raw shards at the training resolution by
helios_train/data/videos_to_shards.py (captions from a toy_filter.json-style file, or the file name) and timed
next to the toy clips; the latents row there reads latent shards of the production geometry
(16 × 9 × h/8 × w/8 per chunk, a 512 × 4096 fp32 prompt embedding) — what a Helios-14B latent shard holds.

Rows (clips/s = training samples per second):
- decord: decoding exactly the frames our raw loader needs per sample (frame 0 and the context chunks
  up to the sampled one) from bytes already in memory, in torch's DataLoader with `--workers`
  processes, frames delivered to the main process — the ceiling (it skips tar reading, captions,
  shuffling and collation, which ours pays for);
- ours raw: `HistoryShardDataset` in raw mode (tar reading, decode, chunk choice, padding, collate);
- ours latents: the same loader on pre-encoded latent shards.
Goals: raw ≥ 0.9× decord at equal workers; latents ≥ 20× decord.
"""
from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def decode_job(args):
    data, first, count = args
    import decord
    import torch

    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    span = list(range(first, first + count))
    # The frames a sample needs: its context chunks and frame 0 (the x0 anchor).
    return torch.from_numpy(reader.get_batch(span if first == 0 else [0] + span).asnumpy())


def decord_jobs(raw_shards, seed: int):
    import webdataset as wds

    from helios_train.data.samples import sample_rng

    jobs = []
    for shard in raw_shards:
        for s in wds.WebDataset(str(shard), shardshuffle=False):
            import decord

            total = len(decord.VideoReader(io.BytesIO(s["mp4"])))
            chunks = total // 33
            c = int(sample_rng(seed, 0, s["__key__"]).integers(chunks))
            first = max(0, c - 3)
            jobs.append((s["mp4"], first * 33, (c + 1 - first) * 33))
    return jobs


def time_decord(jobs, workers: int, n: int) -> float:
    """Bare decode delivered to this process: a loop, or torch's DataLoader over the in-memory clips with
    `workers` processes (the frames travel to the trainer process, as ours do)."""
    import torch

    jobs = (jobs * math.ceil(n / len(jobs)))[:n]
    loader = torch.utils.data.DataLoader(jobs, batch_size=None, num_workers=workers, collate_fn=decode_job,
                                         prefetch_factor=2 if workers else None)
    it = iter(loader)
    next(it)  # worker start-up is not throughput (ours is timed the same way)
    t0 = time.perf_counter()
    for _ in range(n - 1):
        next(it)
    return (n - 1) / (time.perf_counter() - t0)


def time_loader(shards, mode: str, workers: int, n: int, overrides=()) -> float:
    from helios_train.config import compose

    from helios_train.data.readers import choose_layout
    from helios_train.data.video_dataset import DataPosition, build_loader
    from helios_train.algorithms.history import HistoryConfig

    cfg = compose(["data=toy_raw" if mode == "raw" else "data=toy", f"data.num_workers={workers}",
                   "data.batch_size=1", "data.shards=x", *overrides]).data
    loader = build_loader([str(s) for s in shards], cfg, HistoryConfig(), 0,
                          DataPosition(choose_layout(len(shards), 1, 1, workers, None)[0]))
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - t0)


def user_clip_shards(videos: Path, captions: Path | None, out: Path, height: int, width: int, clips: int):
    """Raw shards (one clip each, ≥ `clips` of them, cycling the folder's files) at height × width."""
    import json
    import os

    from helios_train.data.videos_to_shards import read_captions, videos_to_shards

    if captions is not None:
        records = read_captions(captions)
    else:
        records = [{"path": p.name, "caption": p.stem.replace("_", " "), "cut": None, "crop": None}
                   for p in sorted(videos.glob("*.mp4"))]
    if not records:
        raise SystemExit(f"--videos {videos}: no .mp4 file (and no --captions)")
    folder = out / "clips"
    folder.mkdir(parents=True)
    rows = []
    for i in range(max(clips, len(records))):  # distinct names → distinct sample keys
        rec = records[i % len(records)]
        name = f"c{i:03d}_{Path(rec['path']).name}"
        os.symlink((videos / rec["path"]).resolve(), folder / name)
        rows.append({"path": name, "caption": rec["caption"] or name, "cut": rec["cut"], "crop": rec["crop"]})
    (out / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = videos_to_shards(folder, out / "captions.jsonl", out / "raw", height=height, width=width,
                               min_frames=33, per_shard=1)
    print(f"user clips → {summary['samples_in_output']} raw shards at {height}x{width} "
          f"(skipped: {summary['skipped'] or 'none'})")
    return sorted((out / "raw").glob("raw-*.tar"))


def production_latent_shards(out: Path, height: int, width: int, count: int, chunks: int = 3):
    """Latent shards with Helios-14B shapes (random values: the loader's cost does not depend on them)."""
    import io
    import json

    import numpy as np
    import webdataset as wds

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = out / f"latent-{i:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            lat, emb = io.BytesIO(), io.BytesIO()
            np.save(lat, rng.standard_normal((chunks, 16, 9, height // 8, width // 8), dtype=np.float32))
            np.save(emb, rng.standard_normal((512, 4096), dtype=np.float32))
            sink.write({"__key__": f"s{i:05d}", "latents.npy": lat.getvalue(), "prompt_embed.npy": emb.getvalue(),
                        "json": json.dumps({"caption": "a clip"}).encode()})
        paths.append(path)
    return paths


def rows(label, raw_shards, latent_shards, workers, n, overrides=()):
    jobs = decord_jobs(raw_shards, seed=0)
    for w in workers:
        base = time_decord(jobs, w, n)
        raw = time_loader(raw_shards, "raw", w, n, overrides)
        lat = time_loader(latent_shards, "latents", w, n * 4, overrides)
        print(f"{label:>10} {w:>7} {base:15.1f} {raw:10.1f} {raw / base:11.2f} {lat:13.1f} {lat / base:15.1f}")


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy-root", default=str(REPO / "checkpoints/_toy"))
    ap.add_argument("--samples", type=int, default=96, help="samples timed per row on the toy clips")
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--videos", type=Path, help="folder of your mp4 clips (timed at --height x --width)")
    ap.add_argument("--captions", type=Path, help="toy_filter.json-style caption file for --videos")
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--user-samples", type=int, default=16, help="samples timed per row on --videos")
    a = ap.parse_args()
    from helios_train.data.toy_assets import ensure_toy_assets

    workers = [int(x) for x in a.workers.split(",")]
    assets = ensure_toy_assets(Path(a.toy_root))
    print(f"\n{'clips':>10} {'workers':>7} {'decord clips/s':>15} {'ours raw':>10} {'raw/decord':>11} "
          f"{'ours latents':>13} {'latents/decord':>15}")
    rows("toy", assets.raw_shards, assets.latent_shards, workers, a.samples)
    if a.videos:
        with tempfile.TemporaryDirectory() as tmp:
            raw = user_clip_shards(a.videos, a.captions, Path(tmp), a.height, a.width, clips=2 * max(workers + [1]))
            lat = production_latent_shards(Path(tmp), a.height, a.width, count=len(raw))
            geometry = [f"data.latent_height={a.height // 8}", f"data.latent_width={a.width // 8}",
                        "data.latent_channels=16", "data.min_chunks=1"]
            rows(f"{a.height}x{a.width}", raw, lat, workers, a.user_samples, geometry)
    print("goals: raw/decord >= 0.9, latents/decord >= 20")


if __name__ == "__main__":
    main()
