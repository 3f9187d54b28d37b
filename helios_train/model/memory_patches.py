"""Multi-term memory patchification: initialise patch_short/mid/long from the patch embedding (official
`HeliosTransformer3DModel.initialize_weight_from_another_conv3d`, helios/modules/transformer_helios.py).

short = copy of `patch_embedding` (1,2,2); mid (2,4,4) = its kernel repeated ×2 in t,h,w and /8;
long (4,8,8) = repeated ×4 and /64; biases copied. A mid/long patch then equals "average-pool the
block, apply the original patchifier" — exactly what the official init intends.

The official code runs this inside `__init__`, i.e. on the random patch embedding *before* the Wan
weights are loaded (`HeliosTransformer3DModel.__init__`). We run it after loading (`memory_patch_init: after_load`);
`official` keeps the checkpoint's / random patches instead.
"""
from __future__ import annotations

import torch
from torch import nn


def expanded_kernel(weight: torch.Tensor, factor: int) -> torch.Tensor:
    """Repeat each kernel element `factor` times along t, h, w and divide by factor³ (block average)."""
    out = weight
    for dim in (2, 3, 4):
        out = out.repeat_interleave(factor, dim=dim)
    return out / factor**3


@torch.no_grad()
def init_memory_patches(transformer: nn.Module, source: nn.Conv3d | None = None) -> None:
    """Copy the (loaded) patch embedding — or `source` — into the three memory patches."""
    src = source if source is not None else transformer.patch_embedding
    for name, factor in (("patch_short", 1), ("patch_mid", 2), ("patch_long", 4)):
        dst = getattr(transformer, name, None)
        if dst is None:
            raise ValueError(f"transformer has no {name}: set has_multi_term_memory_patch=True in its config")
        kernel = expanded_kernel(src.weight.float(), factor)
        if tuple(dst.weight.shape) != tuple(kernel.shape):
            raise ValueError(f"{name} weight is {tuple(dst.weight.shape)}, expected {tuple(kernel.shape)}")
        dst.weight.copy_(kernel.to(dst.weight.dtype))
        dst.bias.copy_(src.bias.to(dst.bias.dtype))


MEMORY_PATCHES = ("patch_short", "patch_mid", "patch_long")


def materialise_memory_patches(transformer: nn.Module) -> None:
    """Give memory patches that a checkpoint did not contain (left on the meta device) real storage in
    the patch embedding's dtype and device; their values are set by `init_memory_patches`."""
    ref = transformer.patch_embedding.weight
    for name in MEMORY_PATCHES:
        patch = getattr(transformer, name, None)
        if patch is not None and any(p.is_meta for p in patch.parameters()):
            patch.to_empty(device=ref.device)
            patch.to(ref.dtype)


def memory_patches_missing(load_info: dict | None) -> bool:
    """True when the loaded checkpoint had no patch_short/mid/long weights (e.g. plain Wan2.1)."""
    if not load_info:
        return False
    return any(k.startswith(MEMORY_PATCHES) for k in load_info.get("missing_keys", []))
