"""Shard lists and raw sample streams (WebDataset tar format).

Why our own thin layer over webdataset's tar iterators instead of `wds.WebDataset`: exact resume
needs to know, per worker, which shard it is in and how many samples of it were consumed, and to
skip finished shards without opening them. We reuse webdataset for brace expansion and its key rule
(`base_plus_ext`), and read the tar ourselves: webdataset streams it through tarfile's 10 KB record
reads, which cost about half the loader's time on production latent shards (15 MB per sample,
bench/data_throughput.py); a local shard is read with one read per member instead.
"""
from __future__ import annotations

import glob
import os
import tarfile
from typing import Callable, Iterator

from webdataset import shardlists, tariterators

from helios_train.config.errors import UserError


class ShardSpecError(UserError, ValueError):
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


class DamagedShard(tarfile.ReadError):
    """A tar that ends inside a member or a header, or whose member cannot be read; `member` names the
    member that could not be read (None for a header or the archive's end)."""

    def __init__(self, message: str, member: str | None = None):
        super().__init__(message)
        self.member = member


def _members(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular member of a local tar, in order; raises DamagedShard where it breaks."""
    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as exn:
            raise DamagedShard(f"not a readable tar ({exn})") from None
        while True:
            try:
                info = tar.next()
            except tarfile.ReadError as exn:
                raise DamagedShard(f"bad tar header at byte {tar.offset} ({exn})") from None
            if info is None:
                break
            if not info.isreg():
                continue
            f.seek(info.offset_data)
            data = f.read(info.size)
            if len(data) < info.size:
                raise DamagedShard(f"member {info.name}: unexpected end of data ({len(data)} of {info.size} bytes)",
                                   member=info.name)
            yield info.name, data
        # tarfile stops without a word at a header cut short; a whole archive ends in two zero blocks.
        f.seek(tar.offset)
        tail = f.read(2 * tarfile.BLOCKSIZE)
        if len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(b"\0"):
            raise DamagedShard(f"ends at byte {tar.offset} without the end-of-archive blocks (truncated)")


def iter_shard_samples(path: str, on_error: Callable[[Exception], None]) -> Iterator[dict]:
    """Yield raw samples (`{"__key__", "__url__", "<ext>": bytes}`) of one tar shard, members grouped by
    webdataset's key rule (consecutive members sharing a key).

    Member bytes are never decoded here (in particular nothing is unpickled). Damage ends the shard
    and is reported once: if it cut the sample being assembled (or cannot be placed), that sample is
    yielded carrying `DAMAGED` = the error text and the consumer counts it once if it is unusable;
    if it hit the first member of a new sample, the finished one is yielded whole and `on_error` is
    called once for the lost one. A shard that cannot be opened calls `on_error` once.
    """
    sample: dict | None = None
    try:
        for name, data in _members(path):
            key, ext = tariterators.base_plus_ext(name)
            if key is None:
                continue
            if sample is not None and key != sample["__key__"]:
                yield sample
                sample = None
            if sample is None:
                sample = {"__key__": key, "__url__": path}
            ext = ext.lower()
            if ext in sample:
                raise DamagedShard(f"sample {key}: member {name} appears twice", member=name)
            sample[ext] = data
    except DamagedShard as exn:
        lost = tariterators.base_plus_ext(exn.member)[0] if exn.member else None
        message = f"{path}: {exn}"
        if sample is not None and lost in (None, sample["__key__"]):
            sample[DAMAGED] = message
            yield sample
        else:
            if sample is not None:
                yield sample
            on_error(DamagedShard(message))
        return
    except OSError as exn:
        on_error(DamagedShard(f"{path}: cannot read it ({exn})"))
        return
    if sample is not None:
        yield sample
