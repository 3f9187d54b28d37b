"""Which reader serves which micro-batch: a data order that does not depend on the cluster's shape.

A *reader* is one sequential stream of samples. In epoch e reader q of Q reads the shards
`perm_e[q::Q]` (the shard list permuted with `data.seed + e`), each through a shuffle buffer seeded by
(seed, e, shard). Q is `data.num_readers`; by default the global micro-batches of a step
(G = world × accumulation) × max(1, `data.num_workers`).

Invariant layout (G divides Q, K = Q / G readers per micro-batch slot): global micro-batch g of step t —
the g of `Trainer.micro_generator`, rank × accumulation + micro — is read by reader g·K + (t mod K).
Which rank runs micro-batch g does not enter: 2 ranks × 1 micro-batch and 1 rank × 2 accumulated ones
read the same samples in the same order, and a checkpoint written on one shape resumes on the other
with every reader continuing where it stopped (issue "resume on a different cluster shape").

Per-rank layout (fewer shards than G readers): the i-th batch of rank r comes from reader
rR + (i mod R); the order then depends on world size and accumulation, and a resume on another shape
re-splits the epoch's remaining shards (`resplit`).

Either way rank r owns the readers [rR, (r+1)R), R = Q / world, and the DataLoader's physical worker w
of W (W divides R) reads the local readers j ≡ w (mod W): the DataLoader takes batch i from worker
i mod W, and batch i needs local reader i mod R.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
import numpy as np


@dataclass(frozen=True)
class ReaderLayout:
    readers: int  # Q, over the whole job
    world_size: int
    grad_accum: int

    @property
    def per_rank(self) -> int:
        return self.readers // self.world_size

    @property
    def micro_batches(self) -> int:  # G
        return self.world_size * self.grad_accum

    @property
    def invariant(self) -> bool:
        return self.readers % self.micro_batches == 0

    def global_reader(self, rank: int, local: int) -> int:
        """The reader behind local reader index `local` (= local batch index mod R) of `rank`."""
        base = rank * self.per_rank
        if not self.invariant:
            return base + local
        k = self.readers // self.micro_batches
        # local = (t mod K)·A + m  →  reader (r·A + m)·K + (t mod K)
        return base + (local % self.grad_accum) * k + local // self.grad_accum

    def worker_count(self, requested: int) -> int:
        """The largest worker count ≤ `requested` that divides R (0 stays 0: read in the main process)."""
        if requested <= 0:
            return 0
        return max(w for w in range(1, min(requested, self.per_rank) + 1) if self.per_rank % w == 0)

    def describe(self) -> str:
        kind = "order independent of the world size" if self.invariant else "order tied to world size x accumulation"
        return f"{self.readers} reader(s), {self.per_rank} per rank ({kind})"

    def state_dict(self) -> dict:
        return asdict(self)


def choose_layout(num_shards: int, world_size: int, grad_accum: int, num_workers: int,
                  num_readers: int | None) -> tuple[ReaderLayout, list[str]]:
    """The layout of a fresh run (or of a re-split), and the warnings to print about what was lowered."""
    notes: list[str] = []
    g, w = world_size * grad_accum, max(1, num_workers)
    if num_readers is not None:
        if num_readers % world_size or num_readers > num_shards or num_readers < world_size:
            raise ValueError(
                f"data.num_readers={num_readers}: must be a multiple of the {world_size} rank(s) and at most the "
                f"{num_shards} shard(s) (every reader needs a shard of its own)")
        return ReaderLayout(num_readers, world_size, grad_accum), notes
    if num_shards < world_size:
        raise ValueError(
            f"data: {num_shards} shard(s) cannot feed {world_size} rank(s); every rank needs at least one shard. "
            "Write more shards (data_prep splits by --samples-per-shard) or use fewer ranks.")
    if g * w <= num_shards:
        return ReaderLayout(g * w, world_size, grad_accum), notes
    if g <= num_shards:
        notes.append(f"{g * w} readers ({g} micro-batch(es) per step x {w} workers) need as many shards, there "
                     f"are {num_shards}: using {g * (num_shards // g)} readers")
        return ReaderLayout(g * (num_shards // g), world_size, grad_accum), notes
    fit = max(1, min(w, num_shards // world_size))
    notes.append(f"{num_shards} shard(s) < {g} micro-batches per step ({world_size} rank(s) x accumulation "
                 f"{grad_accum}): each rank's micro-batches share its {fit} reader(s), so the data order depends on "
                 "the world size and accumulation (resuming on another shape re-splits the epoch)")
    return ReaderLayout(world_size * fit, world_size, grad_accum), notes


# -- reader positions ---------------------------------------------------------------------------

def fresh_position() -> dict:
    """A reader before its first sample. `pieces` (None = none) is a work list of [epoch, shard, skip] read
    before the default share of `epoch`; `cursor` / `in_shard` say where the reader is in its current
    list (the pieces while any are left, else the share) — `in_shard` counts samples of the shard's
    shuffled order already consumed."""
    return {"epoch": 0, "pieces": None, "cursor": 0, "in_shard": 0, "read": 0, "skipped": {},
            "skipped_by_shard": {}}


def epoch_order(seed: int, epoch: int, num_shards: int) -> list[int]:
    """Epoch `epoch`'s permutation of the shard indices."""
    return [int(i) for i in np.random.default_rng(seed + epoch).permutation(num_shards)]


def epoch_share(seed: int, epoch: int, num_shards: int, reader: int, readers: int) -> list[int]:
    return epoch_order(seed, epoch, num_shards)[reader::readers]


def work_list(pos: dict, seed: int, num_shards: int, reader: int, readers: int) -> list[list[int]]:
    """The reader's current list: its pieces, or its share of `epoch` as pieces."""
    if pos["pieces"] is not None:
        return pos["pieces"]
    return [[pos["epoch"], s, 0] for s in epoch_share(seed, pos["epoch"], num_shards, reader, readers)]


def remaining_pieces(pos: dict, seed: int, num_shards: int, reader: int, readers: int, until_epoch: int
                     ) -> list[list[int]]:
    """Every piece this reader has not consumed, in epochs up to `until_epoch` (exclusive)."""
    current = [list(p) for p in work_list(pos, seed, num_shards, reader, readers)[pos["cursor"]:]]
    if current:
        current[0][2] = max(current[0][2], pos["in_shard"])
    if pos["pieces"] is not None:  # the pieces come before the reader's untouched share of `epoch`
        current += [[pos["epoch"], s, 0] for s in epoch_share(seed, pos["epoch"], num_shards, reader, readers)]
    for e in range(pos["epoch"] + 1, until_epoch):
        current += [[e, s, 0] for s in epoch_share(seed, e, num_shards, reader, readers)]
    return current


def resplit(positions: dict[int, dict], old_readers: int, new_readers: int, seed: int, num_shards: int
            ) -> tuple[dict[int, dict], dict, int]:
    """Deal what the old readers have not consumed over `new_readers` fresh ones.

    Every old reader's unread pieces up to the first epoch no reader has started (E) are collected, sorted
    by (epoch, place in that epoch's permutation), and dealt round-robin; each new reader reads its pieces,
    then the shares of epoch E onward under the new count — so every sample of the epochs in flight is
    read exactly once, and later epochs follow the seed. Returns (new positions, the old readers'
    counters summed, how many pieces were dealt)."""
    old = {q: positions.get(q) or fresh_position() for q in range(old_readers)}
    first_unstarted = max(p["epoch"] for p in old.values()) + 1
    pool: list[list[int]] = []
    for q, pos in old.items():
        pool += remaining_pieces(pos, seed, num_shards, q, old_readers, first_unstarted)
    rank_in_epoch = {e: {s: i for i, s in enumerate(epoch_order(seed, e, num_shards))} for e in {p[0] for p in pool}}
    pool.sort(key=lambda p: (p[0], rank_in_epoch[p[0]][p[1]]))
    new = {}
    for q in range(new_readers):
        pos = fresh_position()
        pos.update(epoch=first_unstarted, pieces=pool[q::new_readers])
        new[q] = pos
    return new, merge_counters(*old.values()), len(pool)


def merge_counters(*positions: dict) -> dict:
    """The read / skipped / skipped_by_shard counters of several positions, summed."""
    out = {"read": 0, "skipped": {}, "skipped_by_shard": {}}
    for pos in positions:
        out["read"] += pos["read"]
        for field in ("skipped", "skipped_by_shard"):
            for k, n in pos[field].items():
                out[field][k] = out[field].get(k, 0) + n
    return out


def resume_layout(saved: ReaderLayout, num_shards: int, world_size: int, grad_accum: int, num_workers: int,
                  num_readers: int | None) -> tuple[ReaderLayout, bool, list[str]]:
    """The layout a resumed run continues with: the saved reader count whenever the new shape can
    carry it (every reader continues, nothing is re-split), else a fresh layout for the new shape
    (returned with `True`: the caller re-splits). It can carry it when the ranks divide it and the
    requested workers divide the readers per rank."""
    kept = ReaderLayout(saved.readers, world_size, grad_accum)
    wanted = num_readers if num_readers is not None else saved.readers
    if (wanted == saved.readers and saved.readers % world_size == 0 and saved.readers <= num_shards
            and (num_workers <= 0 or kept.per_rank % num_workers == 0)):
        return kept, False, []
    layout, notes = choose_layout(num_shards, world_size, grad_accum, num_workers, num_readers)
    return layout, layout.readers != saved.readers, notes
