"""Precision policy: the dtype of frozen weights, trainables and activations, and the checks that stop an
impossible combination before any work.

The official setting (`train_helios.py`: `weight_dtype` bf16 with accelerate's `mixed_precision: bf16`,
then `cast_training_params` on the trainables): the frozen base in bf16, the trainable tensors and the
AdamW state in fp32, every transformer forward under bf16 autocast, the VAE in fp32. Here:

- `model.weight_dtype` — frozen base weights (fp32 | bf16); trainables are always fp32
  (helios_train/model/trainables.py);
- `trainer.mixed_precision` — `auto` (default: bf16 autocast exactly when the frozen weights are bf16,
  so `model=helios_14b` is the official setting with no further override), `no`, or `bf16`.

Why the checks: bf16 weights without autocast meet fp32 inputs in the first conv (`Input type (float)
and bias type (c10::BFloat16)`), and fp16 would need loss scaling, which no backend here does.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from helios_train.config.errors import UserError

MIXED_CHOICES = ("auto", "no", "bf16")
WEIGHT_CHOICES = ("fp32", "bf16")


class PrecisionError(UserError, ValueError):
    """A precision combination that cannot run; the message names the keys and the fix."""


def mixed_precision(cfg) -> str:
    """The autocast mode a run uses: "bf16" or "no" (`auto` follows `model.weight_dtype`)."""
    mode = cfg.trainer.mixed_precision
    if mode == "auto":
        return "bf16" if cfg.model.weight_dtype == "bf16" else "no"
    return mode


def autocast(device: torch.device | str, mode: str):
    """bf16 autocast on `device` when `mode` is "bf16", else a no-op context."""
    if mode == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def forward_autocast(module: torch.nn.Module, device, mode: str):
    """Run only `module`'s forward under autocast while the block is open.

    For diffusers pipelines driving a live training transformer (bf16 frozen base + fp32 LoRA and
    memory patches, which only work together under autocast): the pipeline's VAE decode and text
    encoding stay outside it, in their own dtypes (the VAE fp32, as in every official script)."""
    if mode != "bf16":
        yield module
        return
    own = module.__dict__.get("forward")
    inner = module.forward

    def forward(*args, **kwargs):
        with autocast(device, mode):
            return inner(*args, **kwargs)

    module.forward = forward
    try:
        yield module
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def bf16_problem(device: torch.device) -> str | None:
    """None when bf16 autocast runs on `device`, else why not.

    CUDA: the device must do bf16 natively (Ampere or newer; a V100 emulates it far too slowly to train).
    CPU: a tiny conv3d + linear + attention under bf16 autocast, the ops a Helios forward needs; a
    build without bf16 kernels fails here instead of at step 1.
    """
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            return f"{torch.cuda.get_device_name(device)} has no native bf16"
        return None
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            conv = torch.nn.Conv3d(2, 4, (1, 2, 2), stride=(1, 2, 2)).to(device=device, dtype=torch.bfloat16)
            x = conv(torch.randn(1, 2, 1, 4, 4, device=device)).flatten(2).transpose(1, 2)
            q = torch.nn.Linear(4, 4).to(device)(x).unsqueeze(1)
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except (RuntimeError, NotImplementedError) as exn:
        return f"bf16 autocast fails on this {device.type} build ({str(exn).splitlines()[0]})"
    return None


def check_precision(cfg, device: torch.device | None) -> None:
    """Fail before any work on a combination that cannot train; names both keys and the fix.
    `device` None (planning, dry runs for another machine) skips the probe of this machine's bf16 support."""
    weight, mode = cfg.model.weight_dtype, cfg.trainer.mixed_precision
    if weight == "fp16" or mode == "fp16":
        key = "model.weight_dtype" if weight == "fp16" else "trainer.mixed_precision"
        raise PrecisionError(f"{key}=fp16 is not supported: fp16 training needs loss scaling, which no backend here "
                             "does; use model.weight_dtype=bf16 with trainer.mixed_precision=auto (or bf16)")
    if weight not in WEIGHT_CHOICES:
        raise PrecisionError(f"model.weight_dtype={weight!r}: expected one of {list(WEIGHT_CHOICES)}")
    if mode not in MIXED_CHOICES:
        raise PrecisionError(f"trainer.mixed_precision={mode!r}: expected one of {list(MIXED_CHOICES)}")
    if weight == "bf16" and mode == "no":
        raise PrecisionError(
            "model.weight_dtype=bf16 with trainer.mixed_precision=no: bf16 frozen weights need bf16 autocast "
            "(fp32 activations would meet bf16 weights in the patch embedding). Set trainer.mixed_precision=bf16 "
            "(or auto, the default), or model.weight_dtype=fp32 to train in full fp32")
    _check_deepspeed_json(cfg)
    if device is not None and mixed_precision(cfg) == "bf16":
        problem = bf16_problem(device)
        if problem:
            raise PrecisionError(
                f"model.weight_dtype={weight} with trainer.mixed_precision={mode} needs bf16, but {problem}. "
                "Set model.weight_dtype=fp32 and trainer.mixed_precision=no (fp32 everywhere), or use a device "
                "with bf16 support")


def _check_deepspeed_json(cfg) -> None:
    path = cfg.launcher.get("deepspeed_config") if cfg.launcher.name == "deepspeed" else None
    if not path or not Path(path).is_file():
        return  # a missing file is reported by the DeepSpeed backend, with its own message
    user = json.loads(Path(path).read_text())
    if isinstance(user.get("fp16"), dict) and user["fp16"].get("enabled"):
        raise PrecisionError(f"launcher.deepspeed_config={path}: fp16.enabled=true is not supported (loss-scaled "
                             "fp16 changes the numbers against every other backend); use trainer.mixed_precision=bf16")


def resolve_precision(cfg, device: torch.device | None) -> str:
    """Check, then write the resolved autocast mode into the config (so the saved config says it)."""
    check_precision(cfg, device)
    mode = mixed_precision(cfg)
    cfg.trainer.mixed_precision = mode
    return mode
