"""Where every random draw of a training step gets its seed.

Draws are functions of (seed, step, phase, global micro-batch index) — never of an RNG stream's
state — so a resumed run continues exactly without saving generator states, and the same global
batch gets the same draws whether it is spread over ranks or over accumulation steps.
"""
from __future__ import annotations

import zlib

import torch

_MOD = 2**63 - 1


def micro_batch_key(seed: int, step: int, phase: int, index: int) -> int:
    """Seed of one micro-batch of one phase of a step (index = global micro-batch index)."""
    return (((seed * 1_000_003 + step) * 101 + phase) * 1_000_033 + index) % _MOD


def shared_generator(seed: int, step: int, purpose: str) -> torch.Generator:
    """A generator every rank and every micro-batch of `step` shares, for draws the recipe makes once per
    step (e.g. the DMD rollout's exit steps, official `generate_and_sync_flag`). `purpose` keeps unrelated
    shared draws apart."""
    key = (micro_batch_key(seed, step, 0, 0) * 31 + zlib.crc32(purpose.encode())) % _MOD
    return torch.Generator(device="cpu").manual_seed(key)
