"""Per-channel mean / std of latent shards (official tools/others/get_mean_std_size9.py), streamed (sum, sum²).

    python -m data_prep.latent_stats --shards 'latents/latent-{000000..000099}.tar' [--max-samples 500000]

Prints one row per channel and the overall numbers, for chunk latents (`latents.npy` [S, C, 9, h, w]).
Like the official tool these are informational: training normalises with the VAE config's stats.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from tqdm import tqdm

from helios_train.data.decoding import BadSample, decode_npy
from helios_train.data.shards import expand_shards, iter_shard_samples


def latent_stats(shards: list[str], max_samples: int | None = None) -> dict:
    total = sq = None
    count, samples, bad = 0, 0, 0
    for shard in tqdm(shards, desc="shards"):
        for raw in iter_shard_samples(shard, lambda e: None):
            if "latents.npy" not in raw:
                continue
            try:
                lat = decode_npy(raw["latents.npy"], raw["__key__"]).astype(np.float64)
            except BadSample:
                bad += 1
                continue
            per_c = np.moveaxis(lat, 1, 0).reshape(lat.shape[1], -1)  # [C, N]
            total = per_c.sum(1) if total is None else total + per_c.sum(1)
            sq = (per_c**2).sum(1) if sq is None else sq + (per_c**2).sum(1)
            count += per_c.shape[1]
            samples += 1
            if max_samples and samples >= max_samples:
                break
        if max_samples and samples >= max_samples:
            break
    if not samples:
        raise ValueError("no latents.npy member found in the given shards")
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 0))
    all_mean = total.sum() / (count * len(total))
    all_std = float(np.sqrt(max(sq.sum() / (count * len(total)) - all_mean**2, 0)))
    return {"samples": samples, "bad": bad, "mean": mean.tolist(), "std": std.tolist(),
            "overall_mean": float(all_mean), "overall_std": all_std}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--max-samples", type=int)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = ap.parse_args()
    stats = latent_stats(expand_shards(a.shards), a.max_samples)
    if a.json:
        print(json.dumps(stats))
        return
    print(f"{stats['samples']} samples ({stats['bad']} unreadable)\nchannel      mean       std")
    for c, (m, s) in enumerate(zip(stats["mean"], stats["std"])):
        print(f"{c:7d} {m:9.4f} {s:9.4f}")
    print(f"{'all':>7} {stats['overall_mean']:9.4f} {stats['overall_std']:9.4f}")


if __name__ == "__main__":
    main()
