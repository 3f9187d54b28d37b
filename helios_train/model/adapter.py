"""What the framework needs from a transformer family: the seam a second family (a causal Wan-1.3B, a future
Helios-2) plugs into. Stages, the planner, export and validation reach the transformer only through an adapter
(`adapter_for(cfg.model)`, helios_train/model/__init__.py); `model.family` picks it.

A family provides: loading (weights, dtype, checkpointing), its trainable-tensor policy (LoRA and fully trained
tensors), the forward's keyword arguments for a history-conditioned chunk, and the token counts its patch layers
make. The rest is generic and built on those: one prediction under the run's autocast, a velocity function for
samplers, the sequence length of a latent.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from helios_train.algorithms.timesteps import seq_len_for
from helios_train.runtime.precision import autocast


class ModelAdapter:
    family = ""

    # -- what a family implements ------------------------------------------------------------------
    def load(self, model_cfg, trainables_cfg=None, device="cpu", history: bool = True) -> torch.nn.Module:
        """The transformer of `model_cfg` (weights, `model.weight_dtype`, gradient checkpointing), frozen; with the
        layers that take history when `history` (every Helios stage; stage=t2v has none)."""
        raise NotImplementedError

    def add_trainables(self, model: torch.nn.Module, trainables_cfg, adapter_name: str = "default") -> list[str]:
        """Freeze the base, attach what `stage.trainables` trains; returns the trainable parameter names."""
        raise NotImplementedError

    def forward_kwargs(self, noisy: torch.Tensor, x0: Optional[torch.Tensor], history: torch.Tensor,
                       timestep: torch.Tensor, prompt_embeds: torch.Tensor, history_cfg) -> dict:
        """Keyword arguments of the model's forward for a noisy chunk with its history and anchor (history None:
        the chunk alone)."""
        raise NotImplementedError

    def token_counts(self, model: torch.nn.Module, latent_hw: tuple[int, int], history_cfg) -> dict[str, int]:
        """Tokens of one sample by kind ("noisy", "history", "total", ...) at latent size `latent_hw`."""
        raise NotImplementedError

    def meta_model(self, model_cfg) -> torch.nn.Module:
        """The transformer of `model_cfg` on the meta device, built from its config (no weights read): what the
        planner counts and the start-up checks measure."""
        raise NotImplementedError

    # -- generic ---------------------------------------------------------------------------------------
    def patch_size(self, model: torch.nn.Module) -> tuple[int, int, int]:
        return tuple(int(p) for p in model.config.patch_size)

    def predict(self, model, noisy, x0, history, timestep, prompt_embeds, history_cfg, precision: str = "no",
                full_output: bool = False):
        """One forward under the run's autocast (`precision`: "bf16" | "no"): the prediction for the noisy chunk,
        or the whole output tuple (`full_output`: the GAN's logits ride on it, helios_train/model/gan_taps.py)."""
        with autocast(noisy.device, precision):
            out = model(**self.forward_kwargs(noisy, x0, history, timestep, prompt_embeds, history_cfg),
                        return_dict=False)
        return out if full_output else out[0]

    def velocity(self, model, x0, history, prompt_embeds, history_cfg, precision: str = "no"
                 ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """(x_t, t) → the model's fp32 velocity with history, anchor and prompt bound: what samplers call."""
        return lambda x, t: self.predict(model, x, x0, history, t, prompt_embeds, history_cfg, precision).float()

    def seq_len(self, model: torch.nn.Module, latent_shape) -> int:
        """Noisy tokens of a latent [.., T, H, W] under the model's patch (official T·H·W // 4 at (1, 2, 2))."""
        return seq_len_for(latent_shape, self.patch_size(model))
