"""One packed transformer forward over several pyramid segments (the official NaViT mode, ``is_navit_pyramid``).

The official model takes a list of noisy chunks at different resolutions and packs every segment
as ``[copy of history tokens | level tokens]`` into one sequence, with block-diagonal (varlen)
self-attention so that no token attends outside its own segment. diffusers'
``HeliosTransformer3DModel`` has no list input and its blocks call self-attention with
``attention_mask=None``, so there is no way to pass a segment mask through the stock forward. This
module drives the model's own submodules (patch convs, RoPE, time/text embedder, blocks, output
norm and projection) over a packed sequence instead:

    [ h_0 | h_1 | … | h_{n-1} | x_0 | x_1 | … | x_{n-1} ]      (h_i: history copy, x_i: noisy tokens)

History copies come first and noisy tokens last because each block's guidance cross-attention
treats the last ``original_context_length`` tokens as the noisy ones (only they see the text; the
prompt is the same for every segment of a sample, so that is exact). Self-attention runs per
segment — {h_i, x_i} gathered, attended with whatever attention backend the model is set to, and
scattered back — which is the block-diagonal attention of the official varlen kernel with no S²
waste and no dense mask. Everything else (linear layers, LoRA, norms, per-token modulation, FFN)
runs once over the packed sequence.

The segment layout travels to the attention processor inside the ``rotary_emb`` argument (the
only per-call value a block hands to self-attention untouched), not as ambient state, so a block
recomputed by gradient checkpointing during backward sees the same layout. The packed processor
behaves exactly like diffusers' ``HeliosAttnProcessor`` for ordinary calls, so the stock forward
(validation, export, the other execution modes) is unaffected once it is installed.

Limits: `is_amplify_history` (off in every official config) and diffusers' context parallelism are
not supported. The model is called unwrapped: a DDP wrapper's forward never runs, so the Mid stage
asks the DDP backend for manual gradient averaging; DeepSpeed's hooks sit on parameters and
submodules and work as is (ZeRO-2 and ZeRO-3 tested). With `model.compile_blocks` the compiled
block sees a NamedTuple argument and may recompile when the segment layout changes (not measured).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_helios import (
    HeliosAttnProcessor,
    _get_qkv_projections,
    apply_rotary_emb_transposed,
    center_down_sample_3d,
    pad_for_3d_conv,
)

from helios_train.algorithms.history import HistoryConfig
from helios_train.model.inputs import model_inputs


class PackedRope(NamedTuple):
    """RoPE of the packed sequence plus the token positions of each segment."""

    rope: torch.Tensor  # [B, S, R]
    segments: tuple[torch.Tensor, ...]  # per segment: LongTensor of positions (history copy, then noisy)
    inverse: torch.Tensor  # positions in cat(segments) of each packed token


class SegmentAttnProcessor(HeliosAttnProcessor):
    """HeliosAttnProcessor that, given a `PackedRope`, attends within each segment only."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 original_context_length=None):
        if not isinstance(rotary_emb, PackedRope):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                                    original_context_length)
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("a packed layout is only meaningful for self-attention without a mask")
        if attn.is_amplify_history:
            raise NotImplementedError("packed execution does not support is_amplify_history")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        query = apply_rotary_emb_transposed(query, rotary_emb.rope)
        key = apply_rotary_emb_transposed(key, rotary_emb.rope)
        outs = [
            dispatch_attention_fn(query[:, idx], key[:, idx], value[:, idx], attn_mask=None, dropout_p=0.0,
                                  is_causal=False, backend=self._attention_backend)
            for idx in rotary_emb.segments
        ]
        hidden_states = torch.cat(outs, dim=1)[:, rotary_emb.inverse].flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def install_segment_attention(model) -> None:
    """Swap every block's self-attention processor for `SegmentAttnProcessor` (idempotent), keeping
    the attention backend chosen with `set_attention_backend`."""
    for block in model.blocks:
        old = block.attn1.processor
        if isinstance(old, SegmentAttnProcessor):
            continue
        if type(old) is not HeliosAttnProcessor:
            raise TypeError(f"packed execution expects HeliosAttnProcessor on attn1, found {type(old).__name__}")
        new = SegmentAttnProcessor()
        for attr in ("_attention_backend", "_parallel_config"):
            if attr in vars(old):
                setattr(new, attr, getattr(old, attr))
        block.attn1.set_processor(new)


def _tokens(conv_out: torch.Tensor) -> torch.Tensor:
    return conv_out.flatten(2).transpose(1, 2)


def _rope(model, indices, h, w, device, pool: int | None = None) -> torch.Tensor:
    rope = model.rope(frame_indices=indices, height=h, width=w, device=device)
    if pool:
        rope = center_down_sample_3d(pad_for_3d_conv(rope, (pool,) * 3), (pool,) * 3)
    return _tokens(rope)


def history_tokens(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """[long | mid | short] history tokens and their RoPE, as the stock forward builds them."""
    short = model.patch_short(inputs["latents_history_short"])
    h1, w1 = short.shape[-2:]
    dev = short.device
    p = tuple(model.config.patch_size)
    mid = model.patch_mid(pad_for_3d_conv(inputs["latents_history_mid"], tuple(2 * k for k in p)))
    long_ = model.patch_long(pad_for_3d_conv(inputs["latents_history_long"], tuple(4 * k for k in p)))
    tokens = torch.cat([_tokens(long_), _tokens(mid), _tokens(short)], dim=1)
    rope = torch.cat([
        _rope(model, inputs["indices_latents_history_long"], h1, w1, dev, pool=4),
        _rope(model, inputs["indices_latents_history_mid"], h1, w1, dev, pool=2),
        _rope(model, inputs["indices_latents_history_short"], h1, w1, dev),
    ], dim=1)
    return tokens, rope


def packed_forward(model, xs: list[torch.Tensor], timesteps: list[torch.Tensor], x0: torch.Tensor | None,
                   history: torch.Tensor, prompt_embeds: torch.Tensor, cfg: HistoryConfig) -> list[torch.Tensor]:
    """Predictions for every segment (noisy chunks `xs`, any resolutions, each with its own timestep
    [B]) sharing one history, from a single pass through the blocks."""
    if not model.config.has_multi_term_memory_patch:
        raise NotImplementedError("packed execution needs the multi-term memory patches")
    install_segment_attention(model)
    n, b = len(xs), xs[0].shape[0]
    inputs = model_inputs(xs[0], x0, history, timesteps[0], prompt_embeds, cfg)
    hist, hist_rope = history_tokens(model, inputs)
    n_hist, dev = hist.shape[1], hist.device

    noisy, noisy_rope, grids = [], [], []
    for x in xs:
        tok = model.patch_embedding(x)
        grids.append(tuple(tok.shape[2:]))
        noisy.append(_tokens(tok))
        noisy_rope.append(_rope(model, inputs["indices_hidden_states"], *tok.shape[3:], dev))
    lengths = [t.shape[1] for t in noisy]
    context = sum(lengths)

    # Time embeddings per token: history copies at t = 0 (zero_history_timestep) or at their
    # segment's t; noisy tokens at their segment's t. The text goes through the embedder once.
    embeds = [model.condition_embedder(t, prompt_embeds, is_return_encoder_hidden_states=(i == 0))
              for i, t in enumerate(timesteps)]
    text = embeds[0][2]
    if model.zero_history_timestep:
        t0 = torch.zeros(1, dtype=timesteps[0].dtype, device=timesteps[0].device)
        temb0, proj0, _ = model.condition_embedder(t0, prompt_embeds, is_return_encoder_hidden_states=False)
        hist_t = [(temb0.expand(b, -1), proj0.expand(b, -1))] * n  # [1, …] → [B, …]
    else:
        hist_t = [(temb, proj) for temb, proj, _ in embeds]
    per_token = [(temb, proj, n_hist) for temb, proj in hist_t]
    per_token += [(temb, proj, length) for (temb, proj, _), length in zip(embeds, lengths)]
    temb = torch.cat([e.reshape(b, 1, -1).expand(b, k, -1) for e, _, k in per_token], dim=1)
    proj = torch.cat([p.reshape(b, 1, 6, -1).expand(b, k, 6, -1) for _, p, k in per_token],
                     dim=1)

    starts = [n * n_hist + sum(lengths[:i]) for i in range(n)]
    segments = tuple(torch.cat([torch.arange(i * n_hist, (i + 1) * n_hist, device=dev),
                                torch.arange(s, s + length, device=dev)])
                     for i, (s, length) in enumerate(zip(starts, lengths)))
    inverse = torch.argsort(torch.cat(segments))
    hidden = torch.cat([hist] * n + noisy, dim=1).contiguous()
    rope = PackedRope(torch.cat([hist_rope] * n + noisy_rope, dim=1).contiguous(), segments, inverse)
    text = text.contiguous()

    for block in model.blocks:
        if torch.is_grad_enabled() and model.gradient_checkpointing:
            hidden = model._gradient_checkpointing_func(block, hidden, text, proj, rope, context)
        else:
            hidden = block(hidden, text, proj, rope, context)
    out = model.proj_out(model.norm_out(hidden, temb, context))

    pt, ph, pw = model.config.patch_size
    preds = []
    for seg, (f, h, w) in zip(out.split(lengths, dim=1), grids):
        seg = seg.reshape(b, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        preds.append(seg.flatten(6, 7).flatten(4, 5).flatten(2, 3))
    return preds
