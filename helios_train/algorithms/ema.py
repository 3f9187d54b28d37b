"""EMA of the trainable tensors, for the Distilled stage (official `use_ema`, `EMAModel_Zero3_LoRA` in
helios/utils/create_ema_zero3_lora.py): diffusers-style warmup decay.

k = max(0, step − update_after_step − 1); the decay is 0 (a plain copy) while k ≤ 0 and
min((1 + k) / (10 + k), max_decay) after, reaching 0.99 about 890 EMA steps after the start. Only
trainable tensors are averaged (LoRA + extras; the frozen base is shared with the live model), in fp32.

Where the averaged tensors live (`Layout`; the sharded layouts: helios_train/backends/ema_shards.py): with `stage.ema.sharded=true` (default) each
rank keeps the EMA of 1/N of the trainables — under ZeRO-3 the slice of every parameter that rank's
partition holds, otherwise whole tensors assigned to ranks by size — as the official EMA does in its own
ZeRO-3 engine; `sharded=false` keeps a whole copy on every rank (not possible under ZeRO-3). Either way
the checkpoint holds the whole EMA (`generator.ema.safetensors`, gathered by rank 0), resume gives each
rank its slice again, and `python -m helios_train export --ema` reads that file.
"""
from __future__ import annotations

import contextlib

import torch

from helios_train.config.mechanisms import EMAConfig  # noqa: F401  (the schema's; re-exported)


def ema_decay(step: int, cfg: EMAConfig) -> float:
    k = max(0, step - cfg.update_after_step - 1)
    return 0.0 if k <= 0 else min((1 + k) / (10 + k), cfg.decay)


class Layout:
    """Where a rank's share of the EMA lives; this base: whole tensors on every rank. Sharded layouts subclass it
    (helios_train/backends/ema_shards.py)."""

    def assign(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.shapes = {n: tuple(p.shape) for n, p in params.items()}

    def owns(self, name: str) -> bool:
        return True

    def local(self, param: torch.nn.Parameter) -> torch.Tensor:
        return param.data

    def gather(self, shadow: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().contiguous() for n, t in shadow.items()}

    def for_rendering(self, shadow: dict[str, torch.Tensor], renders: bool) -> dict[str, torch.Tensor]:
        return shadow if renders else {}

    def local_from_whole(self, name: str, whole: torch.Tensor) -> torch.Tensor:
        if tuple(whole.shape) != self.shapes[name]:
            raise ValueError(f"EMA tensor {name}: shape {tuple(whole.shape)} in the checkpoint, {self.shapes[name]} "
                             "in the model (a different LoRA rank or model?)")
        return whole


class WholeOnEveryRank(Layout):
    """Every rank averages every trainable tensor (one process, or `stage.ema.sharded=false`)."""


class EMA:
    def __init__(self, module: torch.nn.Module, cfg: EMAConfig, layout: Layout | None = None):
        self.cfg = cfg
        self.layout = layout or WholeOnEveryRank()
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.layout.assign({n: params[n] for n in self.names})
        # this rank's share: name → fp32 copy of its local view (a whole tensor or a ZeRO-3 partition)
        self.shadow = {n: self.layout.local(params[n]).detach().float().clone()
                       for n in self.names if self.layout.owns(n)}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> float:
        d = ema_decay(step, self.cfg)
        params = dict(module.named_parameters())
        for n, shadow in self.shadow.items():
            # ema ← ema − (1 − d)(ema − θ); d = 0 is a plain copy
            shadow.sub_((1 - d) * (shadow - self.layout.local(params[n]).float()))
        return d

    @contextlib.contextmanager
    def swap_into(self, module: torch.nn.Module, renders: bool = True):
        """The EMA weights in `module` inside the block, the live ones restored after. Every rank enters
        (a sharded EMA is gathered for the ranks that render: `renders`)."""
        params = dict(module.named_parameters())
        full = self.layout.for_rendering(self.shadow, renders)  # name → tensor to write into this rank's view
        live = {n: self.layout.local(params[n]).detach().clone() for n in full}
        with torch.no_grad():
            for n, value in full.items():
                view = self.layout.local(params[n])
                view.copy_(value.to(view.device, view.dtype))
        try:
            yield module
        finally:
            with torch.no_grad():
                for n, value in live.items():
                    self.layout.local(params[n]).copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole EMA on the main rank ({} elsewhere for a sharded layout); collective when sharded."""
        return self.layout.gather(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:5]}")
        self.shadow = {n: self.layout.local_from_whole(n, state[n]).float().clone().to(self.shadow[n].device)
                       for n in self.shadow}
