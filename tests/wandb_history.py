"""The history steps a W&B offline run file (`run-<id>.wandb`) holds, read without W&B's service.

The file is W&B's record log: a 7-byte file header, then 32 KiB blocks of records, each a 7-byte header
(CRC32C, little-endian length, type: 1 whole, 2 first, 3 middle, 4 last piece) and a piece of a serialized
`wandb_internal_pb2.Record`; a block's tail shorter than a header is zero padding. wandb 0.31 ships no reader
of its own (the Go service writes the file), so the tests read it to compare W&B's history with metrics.jsonl.
"""
from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (starts {data[:4]!r})")
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero padding to the end of the block
            pos += room
            continue
        piece = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            out.append(piece)
        elif kind == FIRST:
            pending = piece
        elif kind == MIDDLE:
            pending += piece
        elif kind == LAST:
            out.append(pending + piece)
            pending = b""
    return out


def history_steps(path: Path) -> list[int]:
    """The step of every history record in the file, in file order."""
    from wandb.proto import wandb_internal_pb2

    steps = []
    for raw in records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            steps.append(record.history.step.num)
    return steps
