"""What the content hashes add to a checkpoint save (helios_train/runtime/checkpoint.py: XXH3-64 per file in
COMPLETE), measured side by side on one set of files:

    python bench/checkpoint_hash.py [--gib 2] [--files 4] [--dir /tmp]

1. write: `safetensors.save_file` of `--files` fp32 tensors totalling `--gib` GiB, each file fsync'ed (what
   `finalize` does before hashing);
2. hash: `hash_files` over the same files (parallel threads; the files were just written, so mostly read from
   the page cache, as in `finalize`);
3. verify: `verify` of a finalized checkpoint (sizes + hashes + safetensors headers), what `resume=auto` runs.
Prints seconds and GB/s for each and the hash / write ratio, then the extrapolation to a 14B save (5 GB of LoRA +
optimizer at rank 256 up to ~35 GB with full optimizer shards) at the measured rates.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from helios_train.runtime import checkpoint as ckpt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ckpt-hash-", dir=args.dir))
    try:
        run = root / "run"
        tmp = ckpt.tmp_dir(run, 1)
        tmp.mkdir(parents=True)
        per_file = int(args.gib * (1 << 30) / args.files / 4)
        total = per_file * 4 * args.files
        t0 = time.perf_counter()
        for i in range(args.files):
            path = tmp / f"shard-{i}.safetensors"
            save_file({"w": torch.rand(per_file)}, str(path))
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        write_s = time.perf_counter() - t0
        rels = sorted(p.name for p in tmp.iterdir())
        t0 = time.perf_counter()
        ckpt.hash_files(tmp, rels)
        hash_s = time.perf_counter() - t0
        final = ckpt.finalize(run, 1, None)
        t0 = time.perf_counter()
        assert ckpt.verify(final) is None
        verify_s = time.perf_counter() - t0
        gb = total / 1e9
        print(f"{gb:.2f} GB in {args.files} files, {os.cpu_count()} CPUs")
        print(f"| step | seconds | GB/s |\n|---|---|---|")
        for name, sec in (("write + fsync", write_s), ("hash (finalize)", hash_s), ("verify (resume)", verify_s)):
            print(f"| {name} | {sec:.2f} | {gb / sec:.2f} |")
        print(f"hash / write = {hash_s / write_s:.3f}")
        for size in (5, 35):
            print(f"14B save of {size} GB at these rates: write {size / (gb / write_s):.0f} s, hash "
                  f"{size / (gb / hash_s):.0f} s, verify {size / (gb / verify_s):.0f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
