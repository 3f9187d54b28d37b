"""Rollouts the evaluation scores: a model continuing a given first chunk (V2V), a model generating from its caption
alone (T2V), and the copy-last-frame baseline — through diffusers' own Helios pipelines
(helios_train/sampling/infer.py), as a user's inference would run, with the transformer's forward calls counted.

Continuation: the first 33 frames of a held-out clip go in as the pipeline's `video` (encoded per chunk and lightly
noised as the official V2V path does), `chunks` new chunks come out; chunk k of the output is compared with chunk
k + 1 of the clip. A history-free model (variant `t2v`) ignores the given video and every earlier chunk, so its
"continuation" is independent chunks of its caption: the no-history baseline.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from helios_train.data.miniature_world import CHUNK_FRAMES


@dataclass
class Cost:
    """What generating cost, summed over the rollouts it watched."""

    chunks: int = 0
    forwards: int = 0
    flops: float = 0.0  # transformer forwards only (FlopCounterMode), counted on the rollouts with `count_flops`
    flop_chunks: int = 0  # chunks `flops` covers
    seconds: float = 0.0  # wall time of whole pipeline calls (VAE encode / decode and text encoding included)

    def per_chunk(self) -> dict[str, float]:
        return {"forwards": self.forwards / max(self.chunks, 1),
                "tflops": self.flops / max(self.flop_chunks, 1) / 1e12 if self.flop_chunks else float("nan"),
                "seconds": self.seconds / max(self.chunks, 1)}


class ForwardCounter:
    """Counts the transformer's forward calls; with `flops`, runs each inside torch's FlopCounterMode."""

    def __init__(self, transformer, cost: Cost):
        self.cost, self.flops, self._mode = cost, False, None
        self._handles = [transformer.register_forward_pre_hook(self._before),
                         transformer.register_forward_hook(self._after)]

    def _before(self, module, args):
        self.cost.forwards += 1
        if self.flops:
            self._mode = FlopCounterMode(display=False)
            self._mode.__enter__()

    def _after(self, module, args, output):
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.cost.flops += self._mode.get_total_flops()
            self._mode = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _as_uint8(frames: np.ndarray) -> np.ndarray:
    return frames if frames.dtype == np.uint8 else (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


def rollout(pipe, variant: str, settings, caption: str, chunks: int, seed: int, counter: ForwardCounter,
            size: tuple[int, int], given: np.ndarray | None = None, count_flops: bool = False) -> np.ndarray:
    """uint8 frames [≤ chunks·33, height, width, 3] generated after `given` (uint8 [33, H, W, 3]; None = T2V)."""
    from PIL import Image

    from helios_train.sampling.infer import generate

    height, width = size
    video = [Image.fromarray(f) for f in given] if given is not None else None
    counter.flops = count_flops
    began = time.perf_counter()
    with torch.no_grad():
        frames = generate(pipe, variant, caption, settings, chunks * CHUNK_FRAMES, height, width, seed, video=video)
    counter.flops = False
    counter.cost.seconds += time.perf_counter() - began
    counter.cost.chunks += chunks
    counter.cost.flop_chunks += chunks if count_flops else 0
    return _as_uint8(frames)


def copy_last_frame(given: np.ndarray, chunks: int) -> np.ndarray:
    """The baseline that never moves: the last given frame, held for `chunks` chunks."""
    return np.repeat(given[-1:], chunks * CHUNK_FRAMES, axis=0)


def chunk_pairs(generated: np.ndarray, truth: np.ndarray, chunks: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(generated chunk k, ground-truth chunk k + 1) for k < chunks, cut to the frames both have (the pipeline trims
    its output to 4n + 1 frames, so the last chunk may be two frames short)."""
    out = []
    for k in range(chunks):
        g = generated[k * CHUNK_FRAMES:(k + 1) * CHUNK_FRAMES]
        t = truth[(k + 1) * CHUNK_FRAMES:(k + 2) * CHUNK_FRAMES]
        n = min(len(g), len(t))
        if n:
            out.append((g[:n], t[:n]))
    return out
