"""Ring attention on CPU: diffusers' templated ring attention (`TemplatedRingAttention`) merges each ring step's
partial attention with the log-sum-exp of its scores, and recomputes each step's gradient from the merged output
and log-sum-exp. diffusers' `native` backend cannot give that (its op refuses `return_lse`); torch's CPU flash
kernel can (`aten._scaled_dot_product_flash_attention_for_cpu` returns it, and its backward takes it). So while a
run uses `launcher.ring_degree > 1` on CPU, the native backend's context-parallel ops are these when the ring
asks for the log-sum-exp, and diffusers' own otherwise (Ulysses, one process) — what lets the ring path train,
and be tested, on CPU (tests/test_sequence_parallel.py). CUDA runs use the flash / cuDNN backends' ops
(`model.attention_backend`) and never come here.
"""
from __future__ import annotations

import importlib

import torch

_DISPATCH = "diffusers.models.attention_dispatch"
_ORIGINAL: dict = {}


def _forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                return_lse=False, _save_ctx=True, _parallel_config=None):
    """(B, S, H, D) in, (B, S, H, D) out and the (B, S, H) log-sum-exp when the ring asks for it."""
    if not return_lse or query.device.type != "cpu":
        ctx.cpu_flash = False
        return _ORIGINAL["forward"](ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                    return_lse, _save_ctx=_save_ctx, _parallel_config=_parallel_config)
    if attn_mask is not None or dropout_p or enable_gqa:
        raise ValueError("ring attention on CPU takes no attention mask, dropout or GQA")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
    out, lse = out.transpose(1, 2).contiguous(), lse.transpose(1, 2).contiguous()
    if _save_ctx:
        ctx.cpu_flash = True
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
    return (out, lse) if return_lse else out


def _backward_op(ctx, grad_out, *args, query=None, key=None, value=None, out=None, lse=None, **kwargs):
    """The gradients of one ring step's attention, from the merged output and log-sum-exp the ring passes."""
    if not getattr(ctx, "cpu_flash", False):
        return _ORIGINAL["backward"](ctx, grad_out, *args, **kwargs)
    saved = dict(zip(("query", "key", "value", "out", "lse"), ctx.saved_tensors))
    given = {"query": query, "key": key, "value": value, "out": out, "lse": lse}
    t = {name: (given[name] if given[name] is not None else saved[name]).transpose(1, 2).contiguous() for name in saved}
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.transpose(1, 2).contiguous(), t["query"], t["key"], t["value"], t["out"], t["lse"], 0.0,
        ctx.is_causal, scale=ctx.scale)
    return tuple(g.transpose(1, 2).contiguous() for g in grads)


def install() -> None:
    """Route the native backend's context-parallel ops through the CPU flash kernel where the ring needs it
    (idempotent; diffusers looks the ops up by module name at each call)."""
    dispatch = importlib.import_module(_DISPATCH)
    if _ORIGINAL:
        return
    _ORIGINAL["forward"] = dispatch._native_attention_forward_op
    _ORIGINAL["backward"] = dispatch._native_attention_backward_op
    dispatch._native_attention_forward_op = _forward_op
    dispatch._native_attention_backward_op = _backward_op
