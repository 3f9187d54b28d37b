"""Resumable stream of Base-stage batches from WebDataset shards, split over ranks and workers by
reader (helios_train/data/readers.py).

Ordering (deterministic from `data.seed`):
- reader q of Q reads, in epoch e, the shards `perm_e[q::Q]` — disjoint data; which reader serves
  which micro-batch is the layout's business (readers.py), so the order can survive a change of world
  size or accumulation;
- inside a shard, samples pass a shuffle buffer seeded by (seed, epoch, shard), reset per shard so a
  resumed reader only has to replay the shard it was in, never the whole epoch;
- every reader streams epochs forever, so ranks with unequal shard counts never run dry (no DDP
  hang); the trainer stops at `trainer.max_steps`.

Each yielded batch carries its reader's position and skip counters (`_position`), which the trainer
keeps per reader (`DataPosition`) and checkpoints; a resumed loader starts at the local batch the
run stopped at, so batch order continues exactly.
"""
from __future__ import annotations

import copy
import logging
import random
from typing import Iterator, Optional

import torch
from torch.utils.data import IterableDataset, get_worker_info

from helios_train.data.decoding import BadSample
from helios_train.data.readers import ReaderLayout, fresh_position, merge_counters, resplit, resume_layout, work_list
from helios_train.data.samples import collate, latent_sample, ode_sample, raw_sample
from helios_train.data.shards import DAMAGED, iter_shard_samples

log = logging.getLogger(__name__)
MIN_READ_FOR_SKIP_LIMIT = 20  # do not judge the skip fraction on the first handful of samples


class TooManyBadSamples(RuntimeError):
    pass


class HistoryShardDataset(IterableDataset):
    def __init__(
        self,
        shards: list[str],
        data_cfg,
        history_cfg,
        rank: int = 0,
        layout: Optional[ReaderLayout] = None,
        positions: Optional[dict[int, dict]] = None,
        first_batch: int = 0,
    ):
        super().__init__()
        self.layout = layout or ReaderLayout(1, 1, 1)
        if len(shards) < self.layout.readers:
            raise ValueError(f"data: {len(shards)} shard(s) cannot feed {self.layout.describe()}; every reader "
                             "needs a shard of its own")
        self.shards = list(shards)
        self.data_cfg = data_cfg
        self.history_cfg = history_cfg
        self.rank = rank
        self.positions = positions or {}
        self.first_batch = first_batch  # local batch index the loader starts at (step × accumulation)
        self.convert = {"latents": latent_sample, "raw": raw_sample, "ode_pairs": ode_sample}[data_cfg.mode]

    def _shuffled(self, shard_idx: int, epoch: int, on_error) -> Iterator[dict]:
        rng = random.Random(f"{self.data_cfg.seed}/{epoch}/{shard_idx}")
        size = max(1, self.data_cfg.shuffle_buffer)
        buffer: list[dict] = []
        for raw in iter_shard_samples(self.shards[shard_idx], on_error):
            buffer.append(raw)
            if len(buffer) >= size:
                yield buffer.pop(rng.randrange(len(buffer)))
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))

    def _count_skip(self, pos: dict, reason: str, shard: str, message: str) -> None:
        pos["skipped"][reason] = pos["skipped"].get(reason, 0) + 1
        pos["skipped_by_shard"][shard] = pos["skipped_by_shard"].get(shard, 0) + 1
        log.warning("skipping sample (%s): %s", reason, message)
        total = sum(pos["skipped"].values())
        if pos["read"] >= MIN_READ_FOR_SKIP_LIMIT and total / pos["read"] > self.data_cfg.max_skip_fraction:
            worst = sorted(pos["skipped_by_shard"].items(), key=lambda kv: -kv[1])[:3]
            raise TooManyBadSamples(
                f"{total} of {pos['read']} samples read were bad (> data.max_skip_fraction="
                f"{self.data_cfg.max_skip_fraction}); reasons {pos['skipped']}; worst shards: "
                + ", ".join(f"{s} ({n})" for s, n in worst)
            )

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num_workers = info.num_workers if info is not None else 1
        worker = info.id if info is not None else 0
        if self.layout.per_rank % num_workers:
            raise ValueError(f"{num_workers} loader workers cannot split {self.layout.per_rank} readers per rank")
        streams: dict[int, Iterator[dict]] = {}
        i = self.first_batch + worker  # the DataLoader takes local batch i from worker i mod W (readers.py)
        while True:
            reader = self.layout.global_reader(self.rank, i % self.layout.per_rank)
            if reader not in streams:
                streams[reader] = self._reader_batches(reader)
            yield next(streams[reader])
            i += num_workers

    def _reader_batches(self, reader: int) -> Iterator[dict]:
        """Batches of one reader, forever: its current work list, then each epoch's share."""
        readers = self.layout.readers
        pos = copy.deepcopy(self.positions.get(reader) or fresh_position())
        batch: list[dict] = []
        epochs: list[int] = []  # each batched sample's epoch (a batch may span a re-split's pieces)
        while True:
            pieces = work_list(pos, self.data_cfg.seed, len(self.shards), reader, readers)
            read_before = pos["read"]
            # A pass resumed at the epoch's end (checkpoint on its last batch) reads nothing new: only a
            # pass from the start of the work list can prove the epoch empty.
            whole_pass = pos["cursor"] == 0 and pos["in_shard"] == 0
            while pos["cursor"] < len(pieces):
                epoch, shard_idx, start = pieces[pos["cursor"]]
                shard = self.shards[shard_idx]
                skip = max(start, pos["in_shard"])
                producing = [0]  # index of the sample the shard iterator is producing

                def on_error(exn: Exception, shard=shard) -> None:
                    # A replayed member (while producing a sample before `skip`) was counted before the
                    # checkpoint; counting it again would inflate the skip totals on every resume.
                    if producing[0] >= skip:
                        pos["read"] += 1
                        self._count_skip(pos, "unreadable_member", shard, f"{shard}: {exn}")

                for i, raw in enumerate(self._shuffled(shard_idx, epoch, on_error)):
                    producing[0] = i + 1
                    if i < skip:
                        continue  # replaying the part of this shard consumed before a resume
                    pos["in_shard"] = i + 1
                    pos["read"] += 1
                    damaged = raw.pop(DAMAGED, None)
                    try:
                        sample = self.convert(raw, self.data_cfg, self.history_cfg, epoch)
                    except BadSample as bad:
                        # A sample cut by a damaged member is one skip, under the damage (not "missing member").
                        reason, why = ("unreadable_member", f"{bad} — {damaged}") if damaged else (bad.reason, str(bad))
                        self._count_skip(pos, reason, shard, why)
                        continue
                    batch.append(sample)
                    epochs.append(epoch)
                    if damaged:  # whole despite the damage right after it: used; the lost rest is the one skip
                        self._count_skip(pos, "unreadable_member", shard, f"after sample {raw['__key__']}: {damaged}")
                    if len(batch) == self.data_cfg.batch_size:
                        out = collate(batch)
                        out["epochs"] = epochs
                        out["_position"] = {"reader": reader, **copy.deepcopy(pos)}
                        batch, epochs = [], []
                        yield out
                pos["cursor"] += 1
                pos["in_shard"] = 0
            if pos["pieces"] is not None:  # a re-split's pieces are done: the share of `epoch` follows
                pos["pieces"] = None
            else:
                if whole_pass and pos["read"] == read_before:
                    raise TooManyBadSamples(f"reader {reader} (rank {self.rank}) read no sample in a whole epoch")
                pos["epoch"] += 1
            pos["cursor"] = 0


class DataPosition:
    """Where each reader of this rank is; saved in checkpoints and fed back to `HistoryShardDataset`.

    `carried` holds the counters of readers that a re-split retired (rank 0 only), so the run's totals
    of samples read and skipped stay whole across a resume on another shape."""

    def __init__(self, layout: Optional[ReaderLayout] = None, readers: Optional[dict[int, dict]] = None,
                 carried: Optional[dict] = None):
        self.layout = layout or ReaderLayout(1, 1, 1)
        self.readers: dict[int, dict] = dict(readers or {})
        self.carried = carried or merge_counters()

    def update(self, batch: dict) -> None:
        pos = batch.pop("_position")
        self.readers[pos.pop("reader")] = pos

    def skip_counts(self) -> dict[str, int]:
        return merge_counters(self.carried, *self.readers.values())["skipped"]

    def samples_read(self) -> int:
        return merge_counters(self.carried, *self.readers.values())["read"]

    @classmethod
    def from_state_dict(cls, state: dict) -> "DataPosition":
        return cls(ReaderLayout(**state["layout"]), {int(q): p for q, p in state["readers"].items()}, state["carried"])

    def state_dict(self) -> dict:
        return {"layout": self.layout.state_dict(), "readers": {str(k): v for k, v in self.readers.items()},
                "carried": self.carried}


def resume_position(states: list[dict], num_shards: int, rank: int, world_size: int, grad_accum: int, data_cfg
                    ) -> tuple[DataPosition, int, str, list[str]]:
    """This rank's position on resume from every rank's saved `DataPosition.state_dict()`: the saved readers
    continue when the new shape can carry their count, else what they left of the epochs in flight is
    re-split over the new readers (readers.py). Returns (position, old reader count, what happened in
    words, warnings)."""
    positions = [DataPosition.from_state_dict(s) for s in states]
    old = positions[0].layout
    readers = {q: p for pos in positions for q, p in pos.readers.items()}
    carried = merge_counters(*(pos.carried for pos in positions))
    layout, split, warnings = resume_layout(old, num_shards, world_size, grad_accum, data_cfg.num_workers,
                                            data_cfg.num_readers)
    if split:
        readers, retired, pieces = resplit(readers, old.readers, layout.readers, data_cfg.seed, num_shards)
        carried = merge_counters(carried, retired)
        note = (f"the {pieces} shard piece(s) left in the epochs in flight re-split from {old.readers} to "
                f"{layout.readers} reader(s), each remaining sample read once")
    else:
        note = f"{layout.readers} reader(s) continue where they stopped ({layout.describe()})"
    mine = range(rank * layout.per_rank, (rank + 1) * layout.per_rank)
    position = DataPosition(layout, {q: readers[q] for q in mine if q in readers}, carried if rank == 0 else None)
    return position, old.readers, note, warnings


def build_loader(shards, data_cfg, history_cfg, rank, position: DataPosition, first_batch: int = 0):
    workers = position.layout.worker_count(data_cfg.num_workers)
    dataset = HistoryShardDataset(shards, data_cfg, history_cfg, rank, position.layout, position.readers, first_batch)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # batches are built inside the workers, with their positions
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=2 if workers > 0 else None,
    )
