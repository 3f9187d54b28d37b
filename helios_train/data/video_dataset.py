"""Resumable, rank/worker-split stream of Base-stage batches from WebDataset shards.

Ordering (deterministic from `data.seed`):
- epoch e permutes the shard list with seed+e; the world is cut into `world_size × num_workers` slots
  (node/rank first, then worker) and slot s reads permuted shards s, s+slots, ... — disjoint data;
- inside a shard, samples pass a shuffle buffer seeded by (seed, epoch, shard), reset per shard so a
  resumed worker only has to replay the shard it was in, never the whole epoch;
- every worker streams epochs forever, so ranks with unequal shard counts never run dry (no DDP
  hang); the trainer stops at `trainer.max_steps`.

Each yielded batch carries the producing worker's read position and skip counters (`_position`),
which the trainer keeps per *logical* worker: batch i always comes from logical worker i % W, and a
resumed loader renumbers its physical workers so that batch order continues exactly.
"""
from __future__ import annotations

import copy
import logging
import random
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from helios_train.data.decoding import BadSample
from helios_train.data.samples import collate, latent_sample, ode_sample, raw_sample
from helios_train.data.shards import DAMAGED, iter_shard_samples

log = logging.getLogger(__name__)
MIN_READ_FOR_SKIP_LIMIT = 20  # do not judge the skip fraction on the first handful of samples


class TooManyBadSamples(RuntimeError):
    pass


def fresh_position() -> dict:
    return {"epoch": 0, "shard_cursor": 0, "in_shard": 0, "read": 0, "skipped": {}, "skipped_by_shard": {}}


def check_slots(num_shards: int, world_size: int, num_workers: int) -> None:
    slots = world_size * max(1, num_workers)
    if num_shards < slots:
        raise ValueError(
            f"data: {num_shards} shard(s) cannot feed {world_size} rank(s) x {max(1, num_workers)} worker(s) = "
            f"{slots} readers; every reader needs at least one shard. Lower data.num_workers or write more shards."
        )


class HistoryShardDataset(IterableDataset):
    def __init__(
        self,
        shards: list[str],
        data_cfg,
        history_cfg,
        rank: int = 0,
        world_size: int = 1,
        positions: Optional[dict[int, dict]] = None,
        batches_consumed: int = 0,
    ):
        super().__init__()
        check_slots(len(shards), world_size, data_cfg.num_workers)
        self.shards = list(shards)
        self.data_cfg = data_cfg
        self.history_cfg = history_cfg
        self.rank = rank
        self.world_size = world_size
        self.positions = positions or {}
        self.batches_consumed = batches_consumed
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
        physical = info.id if info is not None else 0
        logical = (physical + self.batches_consumed) % num_workers
        slot, slots = self.rank * num_workers + logical, self.world_size * num_workers
        pos = copy.deepcopy(self.positions.get(logical) or fresh_position())
        batch: list[dict] = []
        while True:
            order = np.random.default_rng(self.data_cfg.seed + pos["epoch"]).permutation(len(self.shards))
            mine = [int(i) for i in order[slot::slots]]
            while pos["shard_cursor"] < len(mine):
                shard_idx = mine[pos["shard_cursor"]]
                shard = self.shards[shard_idx]
                skip = pos["in_shard"]
                producing = [0]  # index of the sample the shard iterator is producing

                def on_error(exn: Exception, shard=shard) -> None:
                    # A replayed member (while producing a sample before `skip`) was counted before the
                    # checkpoint; counting it again would inflate the skip totals on every resume.
                    if producing[0] >= skip:
                        pos["read"] += 1
                        self._count_skip(pos, "unreadable_member", shard, f"{shard}: {exn}")

                for i, raw in enumerate(self._shuffled(shard_idx, pos["epoch"], on_error)):
                    producing[0] = i + 1
                    if i < skip:
                        continue  # replaying the part of this shard consumed before a resume
                    pos["in_shard"] = i + 1
                    pos["read"] += 1
                    damaged = raw.pop(DAMAGED, None)
                    try:
                        batch.append(self.convert(raw, self.data_cfg, self.history_cfg, pos["epoch"]))
                    except BadSample as bad:
                        # A sample cut by a damaged member is one skip, under the damage (not "missing member").
                        reason, why = ("unreadable_member", f"{bad} — {damaged}") if damaged else (bad.reason, str(bad))
                        self._count_skip(pos, reason, shard, why)
                        continue
                    if damaged:  # whole despite the damage right after it: used; the lost rest is the one skip
                        self._count_skip(pos, "unreadable_member", shard, f"after sample {raw['__key__']}: {damaged}")
                    if len(batch) == self.data_cfg.batch_size:
                        out = collate(batch)
                        out["_position"] = {"worker": logical, **copy.deepcopy(pos)}
                        batch = []
                        yield out
                pos["shard_cursor"] += 1
                pos["in_shard"] = 0
            pos["epoch"] += 1
            pos["shard_cursor"] = 0
            if pos["read"] == 0:
                raise TooManyBadSamples(f"worker {logical} of rank {self.rank} read no sample in a whole epoch")


class DataPosition:
    """Where each logical worker is; saved in checkpoints and fed back to `HistoryShardDataset`."""

    def __init__(self, state: Optional[dict] = None):
        state = state or {}
        self.batches = int(state.get("batches", 0))
        self.workers: dict[int, dict] = {int(k): v for k, v in state.get("workers", {}).items()}

    def update(self, batch: dict) -> None:
        pos = batch.pop("_position")
        self.workers[pos.pop("worker")] = pos
        self.batches += 1

    def skip_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for pos in self.workers.values():
            for reason, n in pos["skipped"].items():
                out[reason] = out.get(reason, 0) + n
        return out

    def samples_read(self) -> int:
        return sum(pos["read"] for pos in self.workers.values())

    def state_dict(self) -> dict:
        return {"batches": self.batches, "workers": {str(k): v for k, v in self.workers.items()}}


def build_loader(shards, data_cfg, history_cfg, rank, world_size, position: DataPosition):
    dataset = HistoryShardDataset(
        shards, data_cfg, history_cfg, rank, world_size, position.workers, position.batches
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # batches are built inside the workers, with their positions
        num_workers=data_cfg.num_workers,
        persistent_workers=False,
        prefetch_factor=2 if data_cfg.num_workers > 0 else None,
    )
