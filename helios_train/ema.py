"""EMA of the trainable tensors (spec §1.5): diffusers-style warmup decay, for the Distilled stage.

k = max(0, step − update_after_step − 1); the decay is 0 (a plain copy) while k ≤ 0 and
min((1 + k) / (10 + k), max_decay) after, reaching 0.99 about 890 EMA steps after the start. Only
trainable tensors are averaged (LoRA + extras; the frozen base is shared with the live model), so
the EMA costs N_trainable fp32 per rank instead of a second 14B copy; `swap_into` puts the averaged
tensors into the model for validation/export and restores the live ones afterwards.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.99
    update_after_step: int = 250  # official ema_start_step: 250 (ODE) / 750 (DMD)


def ema_decay(step: int, cfg: EMAConfig) -> float:
    k = max(0, step - cfg.update_after_step - 1)
    return 0.0 if k <= 0 else min((1 + k) / (10 + k), cfg.decay)


class EMA:
    def __init__(self, module: torch.nn.Module, cfg: EMAConfig):
        self.cfg = cfg
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = {n: params[n].detach().float().clone() for n in self.names}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> float:
        d = ema_decay(step, self.cfg)
        params = dict(module.named_parameters())
        for n in self.names:
            # ema ← ema − (1 − d)(ema − θ); d = 0 is a plain copy
            self.shadow[n].sub_((1 - d) * (self.shadow[n] - params[n].detach().float()))
        return d

    @contextlib.contextmanager
    def swap_into(self, module: torch.nn.Module):
        params = dict(module.named_parameters())
        live = {n: params[n].detach().clone() for n in self.names}
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(self.shadow[n].to(params[n].dtype))
        try:
            yield module
        finally:
            with torch.no_grad():
                for n in self.names:
                    params[n].copy_(live[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:5]}")
        self.shadow = {n: state[n].float().clone() for n in self.names}
