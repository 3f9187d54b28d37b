"""Classifier-free guidance variants used by Helios sampling (spec helios_training.md §7.4,
helios_inference_data.md §4.5).

Guidance is inference/validation-only: no training path uses CFG-Zero*, and the ODE-pair teacher
(training §8.1) uses the classic formula at scale 5.0. The distilled sampler runs at scale 1.0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GuidanceConfig:
    scale: float = 5.0  # guidance "w"; CFG is active only when scale > 1 (diffusers semantics)
    use_cfg_zero_star: bool = False  # Base: classic CFG; Mid: CFG-Zero* (inference §4.5)
    use_zero_init: bool = True  # diffusers' default; only has an effect together with CFG-Zero*
    zero_steps: int = 1  # zero velocity for step idx <= zero_steps, i.e. the first two steps


def cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classic CFG (inference §4.5): v = v_u + w·(v_c - v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)


def cfg_zero_star(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float,
                  eps: float = 1e-8) -> torch.Tensor:
    """CFG-Zero* (training §7.4): per sample s* = <v_c, v_u> / (||v_u||² + eps) on the flattened
    tensors in fp32, then v = s*·v_u + w·(v_c - s*·v_u). The whole combination is done in fp32 and
    cast back once (diffusers casts s* to the input dtype first and combines in that dtype; the
    difference is one bf16 rounding). A zero v_uncond gives s* = 0 instead of NaN thanks to eps."""
    if v_cond.shape != v_uncond.shape:
        raise ValueError(f"shape mismatch: {tuple(v_cond.shape)} vs {tuple(v_uncond.shape)}")
    b = v_cond.shape[0]
    c = v_cond.reshape(b, -1).float()
    u = v_uncond.reshape(b, -1).float()
    s = (c * u).sum(dim=1, keepdim=True) / ((u * u).sum(dim=1, keepdim=True) + eps)
    out = s * u + scale * (c - s * u)
    return out.reshape(v_cond.shape).to(v_cond.dtype)


def zero_init_active(step_index: int, stage_index: int | None, zero_steps: int = 1) -> bool:
    """Zero-init (training §7.4): the guided velocity is 0 for step idx <= zero_steps, only in pyramid
    stage 0 (the condition diffusers' pyramid pipeline checks: ``stage_idx == 0 and i <= zero_steps``).
    ``stage_index=None`` means a non-pyramid sampler, treated as a single stage 0."""
    stage = 0 if stage_index is None else stage_index
    return stage == 0 and step_index <= zero_steps


def apply_guidance(v_cond: torch.Tensor, v_uncond: torch.Tensor | None, config: GuidanceConfig,
                   step_index: int = 0, stage_index: int | None = 0) -> torch.Tensor:
    """One guided velocity, mirroring the pyramid pipeline's branch order: no CFG when scale <= 1 (or
    no uncond pass); with CFG-Zero*, zero-init first, then the s*-rescaled formula; else classic."""
    if v_uncond is None or config.scale <= 1.0:
        return v_cond
    if config.use_cfg_zero_star:
        if config.use_zero_init and zero_init_active(step_index, stage_index, config.zero_steps):
            return torch.zeros_like(v_cond)
        return cfg_zero_star(v_cond, v_uncond, config.scale)
    return cfg(v_cond, v_uncond, config.scale)


def pipeline_guidance_kwargs(config: GuidanceConfig) -> dict:
    """Keyword arguments of diffusers' ``HeliosPyramidPipeline.__call__`` (0.42.1) for guidance:
    ``guidance_scale``, ``use_zero_init``, ``zero_steps``. CFG-Zero* itself is NOT a call argument: it
    is the pipeline config flag ``is_cfg_zero_star`` (constructor argument, see
    :func:`pipeline_init_kwargs`). Without that flag diffusers ignores ``use_zero_init`` and uses the
    classic formula, so we pass ``use_zero_init=False`` in that case to say what actually happens."""
    return {
        "guidance_scale": float(config.scale),
        "use_zero_init": bool(config.use_zero_init and config.use_cfg_zero_star),
        "zero_steps": int(config.zero_steps),
    }


def pipeline_init_kwargs(config: GuidanceConfig) -> dict:
    """Constructor/config keyword for ``HeliosPyramidPipeline`` (``from_pretrained(..., is_cfg_zero_star=)``
    or ``pipe.register_to_config(is_cfg_zero_star=...)``)."""
    return {"is_cfg_zero_star": bool(config.use_cfg_zero_star)}
