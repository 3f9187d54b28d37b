"""Unified history injection as `HeliosTransformer3DModel` takes it (official
``prepare_stage1_clean_input_from_latents``, helios/modules/transformer_helios.py): a Base-stage sample
(x0 anchor, history oldest → newest, noisy chunk; helios_train/algorithms/history.py) → the model's keyword
arguments, and the token counts its patch layers make of it.

Model input of one sample (history_sizes [16, 2, 1], window 9):

    time index   0      1 … 16     17 18     19          20 … 28
    term         x0     long (16)  mid (2)   short-1×    noisy chunk (9)
    model input  short  long       mid       short       hidden_states

The indices are the same for every chunk of a video ("relative RoPE"): absolute time is never exposed.
"""
from __future__ import annotations

import torch

from helios_train.algorithms.history import HistoryConfig, history_term_sizes


def frame_indices(cfg: HistoryConfig, batch: int, device=None) -> dict[str, torch.Tensor]:
    """The four RoPE frame-index tensors, keyed by the model's argument names (official
    ``prepare_stage1_clean_input_from_latents``).

    arange(1 + Σsizes + window) split [1, long, mid, short-1×, window]: for the defaults the noisy
    chunk is 20..28, short = {0, 19} (anchor + newest frame), mid = {17, 18}, long = 1..16.
    """
    n_long, n_mid, n_short = history_term_sizes(cfg)
    window = int(cfg.latent_window_size)
    idx = torch.arange(1 + n_long + n_mid + n_short + window, device=device)
    prefix, long_, mid, short1x, noisy = idx.split([1, n_long, n_mid, n_short, window])
    # Deliberate difference: with keep_x0 false the official code still puts the prefix index in
    # the short indices (one more index than short frames); we drop it so the two agree.
    short = torch.cat([prefix, short1x]) if cfg.keep_x0 else short1x
    expand = lambda t: t.unsqueeze(0).expand(batch, -1)  # noqa: E731
    return {
        "indices_hidden_states": expand(noisy),
        "indices_latents_history_short": expand(short),
        "indices_latents_history_mid": expand(mid),
        "indices_latents_history_long": expand(long_),
    }


def split_history(
    x0: torch.Tensor | None, history: torch.Tensor, cfg: HistoryConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """history [B,C,Σsizes,h,w] (oldest → newest) → (short = x0 ⊕ newest frames, mid, long)."""
    n_long, n_mid, n_short = history_term_sizes(cfg)
    if history.shape[2] != n_long + n_mid + n_short:
        raise ValueError(f"history has {history.shape[2]} frames, history_sizes sum to {n_long + n_mid + n_short}")
    long_, mid, short1x = history.split([n_long, n_mid, n_short], dim=2)
    if cfg.keep_x0:
        if x0 is None:
            raise ValueError("keep_x0 is set but x0 is None")
        short = torch.cat([x0.to(history.dtype), short1x], dim=2)
    else:
        short = short1x
    return short, mid, long_


def model_inputs(
    noisy: torch.Tensor,
    x0: torch.Tensor | None,
    history: torch.Tensor | None,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    cfg: HistoryConfig,
) -> dict[str, torch.Tensor]:
    """Keyword arguments of ``HeliosTransformer3DModel.forward`` for one Base-stage micro-batch.

    ``timestep`` is the noisy chunk's t = 1000·σ per sample [B]; the model itself gives every
    history token t = 0 (``zero_history_timestep``, official ``HeliosTransformer3DModel.forward``). Add
    ``return_dict`` yourself. ``history`` None: the chunk alone, no history tokens at all (the bidirectional
    Wan2.1-style forward of stage=t2v).
    """
    if history is None:
        return {"hidden_states": noisy, "timestep": timestep, "encoder_hidden_states": prompt_embeds}
    if noisy.shape[2] != cfg.latent_window_size:
        raise ValueError(f"noisy chunk has {noisy.shape[2]} frames, latent_window_size is {cfg.latent_window_size}")
    short, mid, long_ = split_history(x0, history, cfg)
    return {
        "hidden_states": noisy,
        "timestep": timestep,
        "encoder_hidden_states": prompt_embeds,
        **frame_indices(cfg, noisy.shape[0], device=noisy.device),
        "latents_history_short": short,
        "latents_history_mid": mid,
        "latents_history_long": long_,
    }


def _replicate_pad(x: torch.Tensor, kernel: tuple[int, int, int]) -> torch.Tensor:
    # The model replicate-pads mid/long inputs to multiples of the kernel before the conv (official pad_for_3d_conv).
    pads = [(k - d % k) % k for d, k in zip(x.shape[2:], kernel)]
    return torch.nn.functional.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate")


def _run_patch(conv: torch.nn.Conv3d, frames: int, latent_hw: tuple[int, int], pad: bool) -> int:
    """Tokens the model's own conv produces for [1, C, frames, h, w], run on meta tensors."""
    conv = getattr(conv, "base_layer", conv)  # a PEFT LoRA wrapper keeps the real conv here
    x = torch.empty(1, conv.in_channels, frames, *latent_hw, device="meta")
    if pad:
        x = _replicate_pad(x, tuple(conv.kernel_size))
    # The conv's own weight shape, kernel, stride, padding and dilation on meta tensors: no compute,
    # no weight copy, whatever device the model lives on, and no module hooks fired (ZeRO-3 hooks
    # would try to gather the real parameters; it keeps their true shape in `ds_shape`).
    weight = torch.empty(tuple(getattr(conv.weight, "ds_shape", conv.weight.shape)), device="meta")
    out = torch.nn.functional.conv3d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return int(out.shape[2] * out.shape[3] * out.shape[4])


def token_counts(transformer, latent_hw: tuple[int, int], cfg: HistoryConfig) -> dict[str, int]:
    """Sequence lengths of one sample, from the real model's patch layers (official
    ``HeliosTransformer3DModel.process_input_hidden_states``).

    At 48×80 latents with the defaults: short 1920, mid 240, long 240 (history 2400), noisy 8640.
    """
    n_long, n_mid, n_short = history_term_sizes(cfg)
    counts = {
        "noisy": _run_patch(transformer.patch_embedding, int(cfg.latent_window_size), latent_hw, pad=False),
        "short": _run_patch(transformer.patch_short, n_short + int(bool(cfg.keep_x0)), latent_hw, pad=False),
        "mid": _run_patch(transformer.patch_mid, n_mid, latent_hw, pad=True),
        "long": _run_patch(transformer.patch_long, n_long, latent_hw, pad=True),
    }
    counts["history"] = counts["short"] + counts["mid"] + counts["long"]
    counts["total"] = counts["history"] + counts["noisy"]
    return counts
