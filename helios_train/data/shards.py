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


DAMAGED = "__damaged__"


def _describe(exn: Exception) -> str:
    first = exn.args[0] if exn.args else exn
    return f"{type(exn).__name__}: {str(first).split(' @ <')[0]}"


def iter_shard_samples(path: str, on_error: Callable[[Exception], None]) -> Iterator[dict]:
    """Yield raw samples (`{"__key__", "__url__", "<ext>": bytes}`) of one tar shard.

    Member bytes are never decoded here (in particular nothing is unpickled). A damaged tar member or
    a truncated shard is reported once, on the sample it damaged: webdataset raises for one truncation
    twice (the member read, then the tar header after it) and then yields the half-assembled sample,
    so the next sample yielded after an error carries `DAMAGED` = the error text, and the consumer
    counts that sample once (as unreadable if it is unusable). An error after the last sample, or on a
    shard that cannot be opened, calls `on_error` once.
    """
    pending: list[Exception] = []

    def handler(exn: Exception) -> bool:
        pending.append(exn)
        return True  # keep going with what can still be read

    try:
        for sample in tariterators.tarfile_samples([{"url": path}], handler=handler):
            if pending:
                sample[DAMAGED] = f"{path}: {_describe(pending[0])}"
                pending.clear()
            yield sample
    except Exception as exn:  # a shard that cannot even be opened
        pending.append(exn)
    if pending:
        on_error(pending[0])
