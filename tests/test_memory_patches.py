"""Memory-patch init: a mid/long patch on a block-constant input equals the patch embed on its average."""
from __future__ import annotations

import pytest
import torch
from diffusers import HeliosTransformer3DModel

from helios_train.model.memory_patches import init_memory_patches

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
            freq_dim=32, ffn_dim=64, num_layers=1, rope_dim=(4, 6, 6))


def test_patch_init_is_average_then_patchify():
    torch.manual_seed(0)
    model = HeliosTransformer3DModel(**TINY)
    init_memory_patches(model)
    embed = model.patch_embedding
    for name, factor in (("patch_mid", 2), ("patch_long", 4)):
        # Input constant inside each (f, f, f) block: pooled version has one value per block.
        pooled = torch.randn(1, 4, 2, 4, 4)  # [B, C, t, h, w] of block averages
        x = pooled.repeat_interleave(factor, 2).repeat_interleave(factor, 3).repeat_interleave(factor, 4)
        out = getattr(model, name)(x)
        # Reference: the original (1,2,2) patchifier on the block-averaged input, one frame per block.
        ref = embed(pooled)  # [B, D, t, h/2, w/2]: one token per pooled (1,2,2) patch
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.patch_short.weight, embed.weight)
    torch.testing.assert_close(model.patch_long.bias, embed.bias)


def test_init_changes_random_patches():
    torch.manual_seed(1)
    model = HeliosTransformer3DModel(**TINY)
    before = model.patch_mid.weight.clone()
    init_memory_patches(model)
    assert not torch.allclose(before, model.patch_mid.weight)


def _wan_like_checkpoint(root):
    """A Helios transformer folder without patch_short/mid/long: what a Wan2.1-T2V checkpoint gives."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(2)
    HeliosTransformer3DModel(**TINY).save_pretrained(root / "transformer")
    weights = root / "transformer" / "diffusion_pytorch_model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith(("patch_short", "patch_mid", "patch_long"))}
    save_file(state, str(weights))
    return state


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_wan_checkpoint_without_memory_patches_loads_in_both_dtypes(tmp_path, dtype):
    """Stage-1 init from Wan2.1: diffusers leaves the absent patches on the meta device; loading must give
    them storage in the weight dtype and initialise them from the *loaded* patch embedding (this failed
    with 'Cannot copy out of meta tensor' in fp32 and bf16 before)."""
    from types import SimpleNamespace as NS

    from helios_train.model.loading import load_transformer
    from helios_train.model.memory_patches import expanded_kernel

    state = _wan_like_checkpoint(tmp_path)
    cfg = NS(transformer_path=None, path=str(tmp_path), transformer_subfolder="transformer", weight_dtype=dtype,
             gradient_checkpointing=False)
    model = load_transformer(cfg)
    want = torch.float32 if dtype == "fp32" else torch.bfloat16
    assert not any(p.is_meta for p in model.parameters())
    assert model.patch_mid.weight.dtype == model.patch_embedding.weight.dtype == want
    loaded = state["patch_embedding.weight"].to(want).float()
    torch.testing.assert_close(model.patch_embedding.weight.float(), loaded)
    torch.testing.assert_close(model.patch_long.weight.float(), expanded_kernel(loaded, 4).to(want).float())
    torch.testing.assert_close(model.patch_short.bias.float(), state["patch_embedding.bias"].to(want).float())
