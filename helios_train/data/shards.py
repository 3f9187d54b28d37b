"""Shard lists and raw sample streams (WebDataset tar format).

Why our own thin layer over webdataset's tar iterators instead of `wds.WebDataset`: exact resume
needs to know, per worker, which shard it is in and how many samples of it were consumed, and to
skip finished shards without opening them. We reuse webdataset for what it does well (brace
expansion, tar member iteration, grouping members by key) and own only the ordering.
"""
from __future__ import annotations

import glob
import os
from typing import Callable, Iterator

from webdataset import shardlists, tariterators


class ShardSpecError(ValueError):
    """A shard pattern that names no readable files (raised at start-up, before any work)."""


def expand_shards(spec: str) -> list[str]:
    """Expand a shard spec: comma-separated items, each a brace pattern (`a-{000..009}.tar`) or a glob.

    Every resulting path must exist; the error names the first missing path and the pattern it came from.
    """
    if not spec or not spec.strip():
        raise ShardSpecError("data.shards is empty: give a brace pattern, glob or comma-separated .tar paths")
    paths: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        for expanded in shardlists.expand_urls(item):
            if any(ch in expanded for ch in "*?["):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise ShardSpecError(f"data.shards: glob {expanded!r} matches no file")
                paths.extend(matches)
            else:
                if not os.path.isfile(expanded):
                    raise ShardSpecError(f"data.shards: shard {expanded!r} does not exist (from pattern {item!r})")
                paths.append(expanded)
    if not paths:
        raise ShardSpecError(f"data.shards: pattern {spec!r} expands to no shard")
    return paths


def iter_shard_samples(path: str, on_error: Callable[[Exception], None]) -> Iterator[dict]:
    """Yield raw samples (`{"__key__", "__url__", "<ext>": bytes}`) of one tar shard.

    Member bytes are never decoded here (in particular nothing is unpickled). A damaged tar member or
    a truncated shard calls `on_error` and iteration continues with what can still be read.
    """

    def handler(exn: Exception) -> bool:
        on_error(exn)
        return True  # keep going

    try:
        stream = tariterators.tarfile_samples([{"url": path}], handler=handler)
        yield from stream
    except Exception as exn:  # a shard that cannot even be opened
        on_error(exn)
