"""Tests for helios_train.guidance (spec helios_training.md §7.4, helios_inference_data.md §4.5)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import inspect

import pytest
import torch

from helios_train.guidance import (
    GuidanceConfig, apply_guidance, cfg, cfg_zero_star, pipeline_guidance_kwargs, pipeline_init_kwargs,
    zero_init_active,
)


def test_plain_cfg_formula():
    # v = v_u + w (v_c - v_u): [1 + 5*(3-1), 2 + 5*(5-2)] = [11, 17]
    v = cfg(torch.tensor([3.0, 5.0]), torch.tensor([1.0, 2.0]), 5.0)
    assert v.tolist() == [11.0, 17.0]
    # w = 1 returns the conditional prediction, w = 0 the unconditional one
    assert cfg(torch.tensor([3.0]), torch.tensor([1.0]), 1.0).item() == 3.0
    assert cfg(torch.tensor([3.0]), torch.tensor([1.0]), 0.0).item() == 1.0


def test_cfg_zero_star_hand_example():
    """Two samples with different s* (w = 5):
      sample 0: v_c = [1, 2], v_u = [2, 0]: <v_c,v_u> = 2, ||v_u||^2 = 4 -> s* = 0.5
                s*v_u = [1, 0];  v = [1, 0] + 5*([1, 2] - [1, 0]) = [1, 10]
      sample 1: v_c = [3, 0], v_u = [1, 1]: <v_c,v_u> = 3, ||v_u||^2 = 2 -> s* = 1.5
                s*v_u = [1.5, 1.5];  v = [1.5, 1.5] + 5*([1.5, -1.5]) = [9, -6]
    (eps = 1e-8 changes s* by ~1e-9.) Shape [2, 1, 2] checks flattening/broadcast per sample."""
    vc = torch.tensor([[[1.0, 2.0]], [[3.0, 0.0]]])
    vu = torch.tensor([[[2.0, 0.0]], [[1.0, 1.0]]])
    v = cfg_zero_star(vc, vu, 5.0)
    assert v.shape == vc.shape
    assert v.flatten().tolist() == pytest.approx([1.0, 10.0, 9.0, -6.0], abs=1e-6)
    # plain CFG would give v_u + 5 (v_c - v_u) = [-3, 10, 11, -4] for these inputs: the rescale matters
    assert not torch.allclose(v, cfg(vc, vu, 5.0))


def test_cfg_zero_star_dtype_and_zero_uncond():
    vc = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    vu = torch.zeros_like(vc)
    v = cfg_zero_star(vc, vu, 5.0)
    assert v.dtype == torch.bfloat16
    # v_u = 0 -> s* = 0/(0 + 1e-8) = 0 (no NaN) -> v = w v_c
    assert v.float().tolist() == [[5.0, 10.0]]
    with pytest.raises(ValueError):
        cfg_zero_star(torch.zeros(2, 3), torch.zeros(2, 4), 5.0)


def test_cfg_zero_star_matches_diffusers_scale():
    from diffusers.pipelines.helios.pipeline_helios_pyramid import optimized_scale
    g = torch.Generator().manual_seed(0)
    vc, vu = torch.randn(3, 4, 2, 5, 6, generator=g), torch.randn(3, 4, 2, 5, 6, generator=g)
    s = optimized_scale(vc.view(3, -1), vu.view(3, -1)).view(3, 1, 1, 1, 1)
    ref = vu * s + 4.0 * (vc - vu * s)
    assert torch.allclose(cfg_zero_star(vc, vu, 4.0), ref, atol=1e-5)


def test_zero_init_active():
    # zero_steps = 1 -> steps {0, 1} of pyramid stage 0 only
    assert [zero_init_active(i, 0) for i in range(4)] == [True, True, False, False]
    assert not any(zero_init_active(i, s) for s in (1, 2) for i in range(4))
    assert [zero_init_active(i, 0, zero_steps=0) for i in range(3)] == [True, False, False]
    assert zero_init_active(1, None) and not zero_init_active(2, None)


def test_apply_guidance_branches():
    vc, vu = torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 0.0]])
    star = GuidanceConfig(scale=5.0, use_cfg_zero_star=True, use_zero_init=True, zero_steps=1)
    assert torch.equal(apply_guidance(vc, vu, star, step_index=1, stage_index=0), torch.zeros_like(vc))
    assert apply_guidance(vc, vu, star, step_index=2, stage_index=0).flatten().tolist() == pytest.approx([1.0, 10.0])
    assert apply_guidance(vc, vu, star, step_index=0, stage_index=1).flatten().tolist() == pytest.approx([1.0, 10.0])
    plain = GuidanceConfig(scale=5.0, use_cfg_zero_star=False)
    # zero-init belongs to CFG-Zero* only (diffusers checks it inside that branch)
    assert apply_guidance(vc, vu, plain, step_index=0, stage_index=0).tolist() == [[-3.0, 10.0]]  # [2,0] + 5*[-1,2]
    assert torch.equal(apply_guidance(vc, vu, GuidanceConfig(scale=1.0), 0, 0), vc)
    assert torch.equal(apply_guidance(vc, None, star, 5, 0), vc)


def test_pipeline_kwargs_match_diffusers_signature():
    from diffusers import HeliosPyramidPipeline
    call = inspect.signature(HeliosPyramidPipeline.__call__).parameters
    init = inspect.signature(HeliosPyramidPipeline.__init__).parameters
    kw = pipeline_guidance_kwargs(GuidanceConfig(scale=5.0, use_cfg_zero_star=True, zero_steps=1))
    assert kw == {"guidance_scale": 5.0, "use_zero_init": True, "zero_steps": 1}
    assert set(kw) <= set(call)
    # CFG-Zero* is a pipeline config flag, not a call argument
    assert "is_cfg_zero_star" not in call and "is_cfg_zero_star" in init
    assert pipeline_init_kwargs(GuidanceConfig(use_cfg_zero_star=True)) == {"is_cfg_zero_star": True}
    assert pipeline_guidance_kwargs(GuidanceConfig(use_cfg_zero_star=False))["use_zero_init"] is False
