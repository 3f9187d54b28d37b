"""Unified History Injection, the data side: one video's chunk latents → a Base-stage sample (x0 anchor,
history, target chunk; official ``prepare_stage1_latent``). ``history`` is oldest → newest = long | mid | short-1×
(`history_sizes` frames each). How the model takes it (RoPE frame indices, the three memory-patch inputs, token
counts): helios_train/model/inputs.py.
"""
from __future__ import annotations

import torch

from helios_train.config.mechanisms import HistoryConfig  # noqa: F401  (the schema's; re-exported)


def history_term_sizes(cfg: HistoryConfig) -> tuple[int, int, int]:
    """(long, mid, short-1×) latent frames, sorted descending as the official code does (the order written in
    `history_sizes` does not matter)."""
    sizes = sorted((int(s) for s in cfg.history_sizes), reverse=True)
    if len(sizes) != 3:
        raise ValueError(f"history_sizes needs exactly three terms (long, mid, short), got {list(cfg.history_sizes)}")
    return sizes[0], sizes[1], sizes[2]


def assemble_history_sample(
    chunks_latents: torch.Tensor, chunk_index: int, cfg: HistoryConfig
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One video's chunks [S, C, window, h, w] → (x0 [C,1,h,w], history [C,Σsizes,h,w], target [C,window,h,w]).

    Follows the official loader (``prepare_stage1_latent`` in helios/dataset/dataloader_history_latents_dist.py): chunks
    concatenated in time with Σsizes zero frames prepended; target = chunk c; history = the Σsizes
    frames before it (zero-padded for early chunks); x0 = first latent of chunk 0, zeroed when c = 0
    (that sample is exactly T2V). x0 is None when keep_x0 is off, as in the official code.
    """
    s, c, window, h, w = chunks_latents.shape
    if window != cfg.latent_window_size:
        raise ValueError(f"chunks have {window} frames, latent_window_size is {cfg.latent_window_size}")
    if not 0 <= chunk_index < s:
        raise IndexError(f"chunk_index {chunk_index} out of range for {s} chunks")
    n_hist = sum(history_term_sizes(cfg))
    # Only the chunks the history reaches are laid out in time (not the whole video, twice: a loader cost
    # that grew with video length). Frame f of the video is frame f - base of `part`.
    start = chunk_index * window
    lo = start - n_hist  # first history frame; negative = zero padding before the video
    first = max(0, lo) // window
    part = chunks_latents[first : chunk_index + 1].permute(1, 0, 2, 3, 4).reshape(c, -1, h, w)
    base = first * window
    history = part.new_zeros(c, n_hist, h, w)
    have = max(lo, 0)
    history[:, have - lo :] = part[:, have - base : start - base]
    target = part[:, start - base : start - base + window].clone()
    x0 = None
    if cfg.keep_x0:
        x0 = chunks_latents[0, :, :1].clone()
        if chunk_index == 0:
            x0.zero_()
    return x0, history, target
