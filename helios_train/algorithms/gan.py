"""Hierarchical GAN discriminator of the Distilled-stage critic (official `stage_3_post_gan_version.yaml`,
`Discriminator3DHead` in helios/modules/transformer_helios.py, `_critic_loss` / `_generator_loss`).

The critic (real-score base + critic LoRA) doubles as the discriminator's feature extractor: in
"gan mode" small 3D conv heads read the hidden states of the *noisy* tokens after a few transformer
blocks (official: blocks 5, 15, 25, 35 of 40) plus the model's final output, and each head gives one
logit. Only the heads and the critic LoRA learn from the discriminator loss.

Sign convention (the official one, `cal_gan_loss` in helios/utils/utils_helios_post.py): **logit = "fakeness"**.
- discriminator: L_D = d_weight · [mean softplus(−logit_fake) + mean softplus(logit_real)]
  → minimising pushes logit_fake → +∞ and logit_real → −∞;
- generator:     L_G = g_weight · mean softplus(logit_fake)
  → minimising pushes the generator's logits → −∞, i.e. to the "real" side (non-saturating form of
  the same game: −log σ(−logit) = −log P(real));
- approximate R1: r1_weight · MSE(logit(x_real), logit(x_real + σ·ε)) (a finite-difference penalty on
  the discriminator's slope around real data).

Where the heads read the critic (attachment, hidden-state taps, one critic forward with logits):
helios_train/model/gan_taps.py.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from helios_train.config.mechanisms import GanConfig  # noqa: F401  (the schema's; re-exported)


def gan_active(cfg: GanConfig, step: int) -> bool:
    return bool(cfg.enabled) and step >= int(cfg.start_step)


def scaled_blocks(blocks: list[int], num_layers: int, reference_depth: int = 40) -> list[int]:
    """Block indices written for a `reference_depth`-deep model, mapped to a `num_layers`-deep one.

    Rule: keep each block's *relative depth*, measured at block centres:
        i = round((b + ½)·num_layers / reference_depth − ½), clipped to [0, num_layers − 1]
    (identity when num_layers == reference_depth; 4 layers → [0, 1, 2, 3] for [5, 15, 25, 35]).
    Collisions are pushed to the next free index (and back from the end), so the number of taps is
    kept whenever num_layers allows; with num_layers ≤ len(blocks) every block is tapped.
    """
    n, ref = int(num_layers), int(reference_depth)
    wanted = sorted(set(int(b) for b in blocks))
    if n < 1 or ref < 1:
        raise ValueError(f"num_layers={n} and reference_depth={ref} must be positive")
    if any(b < 0 or b >= ref for b in wanted):
        raise ValueError(f"GAN blocks {list(blocks)} must lie in [0, {ref - 1}] (reference_depth {ref})")
    if len(wanted) >= n:
        return list(range(n))
    # math.floor(x + 0.5): half-up rounding, not Python's banker's rounding.
    idx = [min(n - 1, max(0, math.floor((b + 0.5) * n / ref))) for b in wanted]
    for k in range(1, len(idx)):  # strictly increasing …
        idx[k] = max(idx[k], idx[k - 1] + 1)
    for k in range(len(idx) - 1, -1, -1):  # … and within range (enough room since len < n)
        idx[k] = min(idx[k], n - len(idx) + k)
    return idx


class _SafeConv3d(nn.Conv3d):
    """Conv3d that zero-pads (at the end) any dim too small for its kernel, so no output dim is 0.

    At real sizes it is a plain conv with the usual (k−1)//2 padding; only tiny inputs (a 2×4-token
    crop of the toy model, T reduced to 1 by the strided layers) take the extra padding.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = [max(0, k - (d + 2 * p)) for d, k, p in zip(x.shape[2:], self.kernel_size, self.padding)]
        if any(short):
            x = F.pad(x, (0, short[2], 0, short[1], 0, short[0]))
        return super().forward(x)


class Discriminator3DHead(nn.Module):
    """[B, C, T, H, W] → one logit per sample [B] (layers of official `Discriminator3DHead`).

    Conv k3 (→ width) → Conv k4 s2 → Conv k4 s2 → Conv k3 s(2,1,1) → Conv k3 s(2,1,1) → Conv k(1,3,3),
    each + GroupNorm + SiLU; global average pool; Linear(width → 1).
    """

    LAYERS = (  # (kernel, stride)
        ((3, 3, 3), (1, 1, 1)),
        ((4, 4, 4), (2, 2, 2)),
        ((4, 4, 4), (2, 2, 2)),
        ((3, 3, 3), (2, 1, 1)),
        ((3, 3, 3), (2, 1, 1)),
        ((1, 3, 3), (1, 1, 1)),
    )

    def __init__(self, in_channels: int, width: int = 768, groups: int = 32, fp32: bool = True):
        super().__init__()
        self.fp32 = fp32
        if width % groups:
            raise ValueError(f"GAN head_width={width} must be a multiple of groups={groups} (GroupNorm)")
        layers: list[nn.Module] = []
        c = in_channels
        for kernel, stride in self.LAYERS:
            pad = tuple((k - 1) // 2 for k in kernel)
            layers += [_SafeConv3d(c, width, kernel, stride, pad), nn.GroupNorm(groups, width), nn.SiLU()]
            c = width
        self.convs = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.linear = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `fp32` (stage.gan.fp32_heads): fp32 even inside the stage's bf16 autocast, for approximate R1
        # (100·MSE of two nearly equal logits), which bf16 rounding would dominate. (On CPU, oneDNN's bf16
        # conv3d weight-gradient kernel also stalls for minutes on the small strided maps of a toy crop.)
        if not self.fp32:  # official: whatever autocast the caller runs under
            return self.linear(self.pool(self.convs(x)).flatten(1)).squeeze(1)
        kind = x.device.type
        autocasting = kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind)  # (meta: planning only)
        with torch.autocast(kind, enabled=False) if autocasting else contextlib.nullcontext():
            x = x.to(self.linear.weight.dtype)
            return self.linear(self.pool(self.convs(x)).flatten(1)).squeeze(1)


class DiscriminatorHeads(nn.Module):
    """One head per tapped block (inner_dim channels, post-patch grid) + one on the final output.

    forward → logits [B, len(block_indices) + 1], hook heads in block order, then the final head.
    """

    def __init__(self, num_layers: int, inner_dim: int, out_channels: int, cfg: GanConfig):
        super().__init__()
        self.block_indices = scaled_blocks(list(cfg.blocks), num_layers, cfg.reference_depth)
        width, groups, fp32 = int(cfg.head_width), int(cfg.groups), bool(cfg.fp32_heads)
        self.block_heads = nn.ModuleList(Discriminator3DHead(inner_dim, width, groups, fp32) for _ in self.block_indices)
        self.final_head = Discriminator3DHead(out_channels, width, groups, fp32)

    @classmethod
    def for_transformer(cls, transformer: nn.Module, cfg: GanConfig) -> "DiscriminatorHeads":
        c = transformer.config
        return cls(c.num_layers, c.num_attention_heads * c.attention_head_dim, c.out_channels or c.in_channels, cfg)

    def forward(self, block_features: list[torch.Tensor], final_output: torch.Tensor) -> torch.Tensor:
        if len(block_features) != len(self.block_heads):
            raise ValueError(f"got {len(block_features)} block features for {len(self.block_heads)} heads")
        logits = [head(f) for head, f in zip(self.block_heads, block_features)]
        logits.append(self.final_head(final_output))
        return torch.stack(logits, dim=1)


def crop_size(hw: tuple[int, int], fraction: float, multiple: int = 1) -> tuple[int, int]:
    """The GAN crop's box: max(1, floor(fraction·H)) × max(1, floor(fraction·W)), rounded down to `multiple` (e.g.
    the patch size, to keep whole tokens) but at least `multiple`, never beyond the input."""
    out = []
    for d in hw:
        size = max(1, math.floor(fraction * d))
        out.append(min(d, max(multiple, size // multiple * multiple)))
    return out[0], out[1]


def random_spatial_crop(tensors: list[torch.Tensor], fraction: float, generator: torch.Generator,
                        multiple: int = 1) -> list[torch.Tensor]:
    """Crop the last two dims of every tensor with ONE random box (fake / real / perturbed alike) of
    `crop_size`; offsets drawn from `generator`."""
    if not tensors:
        return []
    hw = tuple(tensors[0].shape[-2:])
    if any(tuple(t.shape[-2:]) != hw for t in tensors):
        raise ValueError(f"crop needs equal spatial sizes, got {[tuple(t.shape[-2:]) for t in tensors]}")
    box = crop_size(hw, fraction, multiple)
    offsets = [int(torch.randint(0, d - size + 1, (1,), generator=generator)) for d, size in zip(hw, box)]
    (ch, cw), (top, left) = box, offsets
    return [t[..., top:top + ch, left:left + cw] for t in tensors]


def perturb(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """x + σ·N(0, I) with the noise drawn from `generator` (on its device, then moved)."""
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return x + sigma * noise.to(device=x.device, dtype=x.dtype)


def generator_gan_loss(logits_fake: torch.Tensor, cfg: GanConfig) -> torch.Tensor:
    """L_G = g_weight · mean softplus(logit): drives the generator's samples to the "real" (−) side."""
    return cfg.g_weight * F.softplus(logits_fake.float()).mean()


def discriminator_gan_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor, cfg: GanConfig) -> torch.Tensor:
    """L_D = d_weight · [mean softplus(−logit_fake) + mean softplus(logit_real)]: fake → +, real → −."""
    return cfg.d_weight * (F.softplus(-logits_fake.float()).mean() + F.softplus(logits_real.float()).mean())


def approximate_r1(logits_real: torch.Tensor, logits_real_perturbed: torch.Tensor, cfg: GanConfig) -> torch.Tensor:
    """r1_weight · MSE(logit(x_real), logit(x_real + r1_sigma·ε)) (official `aprox_r1`)."""
    return cfg.r1_weight * F.mse_loss(logits_real.float(), logits_real_perturbed.float())


class _InputGradient(torch.autograd.Function):
    """Value `loss`, gradient `grad` w.r.t. x (the official `Gan_D_Loss_With_Cached_Grad` idea)."""

    @staticmethod
    def forward(ctx, x, loss, grad):
        ctx.save_for_backward(grad)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None


def input_gradient_loss(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Evaluate `loss_fn(x)` (e.g. L_G through the critic) and differentiate it w.r.t. `x` right away.

    Returns a scalar equal to the loss whose backward passes only ∂loss/∂x into x's graph (the
    generator). The critic's graph is freed here, and its parameters get no `.grad` (autograd.grad
    only to the input), so the generator step cannot leak gradients into the critic.
    """
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(leaf)
        # backward(inputs=[leaf]) rather than autograd.grad: the same "only x gets a gradient", but it
        # also works while module-level multi-grad hooks are live (FlopCounterMode's ModTracker on the
        # step whose FLOPs are counted raises inside autograd.grad).
        loss.backward(inputs=[leaf])
        grad = leaf.grad
    return _InputGradient.apply(x, loss.detach(), grad.detach())
