"""Data throughput, side by side on the same clips: bare decord decode vs our loader (raw, latents).

    python bench/data_throughput.py [--toy-root checkpoints/_toy] [--samples 96] [--workers 0,2]

Rows (clips/s = training samples per second):
- decord: a plain loop decoding exactly the frames our raw loader needs per sample (frame 0 and the
  context chunks up to the sampled one) from bytes already in memory, `--workers` processes — the
  ceiling (it skips tar reading, captions, shuffling and collation, which ours pays for);
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
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def decode_job(args):
    data, first, count = args
    import decord

    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    span = list(range(first, first + count))
    # The frames a sample needs: its context chunks and frame 0 (the x0 anchor).
    return reader.get_batch(span if first == 0 else [0] + span).asnumpy().shape[0]


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
    jobs = (jobs * math.ceil(n / len(jobs)))[:n]
    t0 = time.perf_counter()
    if workers == 0:
        for j in jobs:
            decode_job(j)
    else:
        with Pool(workers) as pool:
            list(pool.imap(decode_job, jobs, chunksize=1))
    return n / (time.perf_counter() - t0)


def time_loader(shards, mode: str, workers: int, n: int) -> float:
    from tests.conftest import compose

    from helios_train.data.video_dataset import DataPosition, build_loader
    from helios_train.history import HistoryConfig

    cfg = compose(["data=toy_raw" if mode == "raw" else "data=toy", f"data.num_workers={workers}",
                   "data.batch_size=1", "data.shards=x"]).data
    loader = build_loader([str(s) for s in shards], cfg, HistoryConfig(), 0, 1, DataPosition())
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy-root", default=str(REPO / "checkpoints/_toy"))
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--workers", default="0,2")
    a = ap.parse_args()
    from data_prep.toy_data import ensure_toy_assets

    assets = ensure_toy_assets(Path(a.toy_root))
    jobs = decord_jobs(assets.raw_shards, seed=0)
    print(f"\n{'workers':>7} {'decord clips/s':>15} {'ours raw':>10} {'raw/decord':>11} {'ours latents':>13} "
          f"{'latents/decord':>15}")
    for w in (int(x) for x in a.workers.split(",")):
        base = time_decord(jobs, w, a.samples)
        raw = time_loader(assets.raw_shards, "raw", w, a.samples)
        lat = time_loader(assets.latent_shards, "latents", w, a.samples * 4)
        print(f"{w:>7} {base:15.1f} {raw:10.1f} {raw / base:11.2f} {lat:13.1f} {lat / base:15.1f}")
    print("goals: raw/decord >= 0.9, latents/decord >= 20 (toy clips: 64x128, 33-132 frames decoded per sample)")


if __name__ == "__main__":
    main()
