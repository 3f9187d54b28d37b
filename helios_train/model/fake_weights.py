"""Full-size models without weights: the transformer(s) of a stage on fake tensors, for the dry run.

Under torch's `FakeTensorMode` a tensor carries shape, dtype and device but no storage, so the 14B
transformer (and DMD's two of them) is built from its config.json in milliseconds and no memory is
allocated, while every op of a training step still runs shape propagation — which is what
`torch.distributed._tools.mem_tracker.MemTracker` measures memory with (torchtitan estimates memory the
same way).

How the real code paths are reused unchanged:
- `helios_train.model.loading` asks the active source (`use_weights_source`) for transformers and text
  embeddings, so a stage builds its roles exactly as in training, only from this source;
- modules added later to a fake model (PEFT LoRA layers, GAN heads) are created inside the mode of the
  model's own parameters (`same_mode_as`), so they are fake too;
- everything else — data, random draws, schedules — stays real: only ops that touch a fake tensor run
  fake. That keeps Python control flow on random numbers exact.
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, maybe_get_fake_mode


def new_fake_mode() -> FakeTensorMode:
    """A FakeTensorMode that accepts real tensors as inputs (the batch, random draws).

    Why the memo is switched off: the mode memoises every op output by weak reference
    (`FakeTensorConverter.set_tensor_memo` from `from_meta_and_device`, keyed on a fresh meta tensor,
    so the memo can never hit), and `nn.Module._apply` — `.to()`, PEFT's adapter placement — swaps fake
    parameters in place, which `torch.utils.swap_tensors` refuses for any tensor with a weakref.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.fake_tensor_converter.set_tensor_memo = lambda tensor, fake: None
    return mode


def fake_mode_of(module: torch.nn.Module) -> FakeTensorMode | None:
    for p in module.parameters():
        return maybe_get_fake_mode(p)
    return None


def same_mode_as(module: torch.nn.Module):
    """Context in which new modules are created like `module`'s parameters: fake if they are fake."""
    mode = fake_mode_of(module)
    return mode if mode is not None else contextlib.nullcontext()


def config_file(model_cfg) -> str:
    root = model_cfg.transformer_path or os.path.join(model_cfg.path, model_cfg.transformer_subfolder)
    return os.path.join(root, "config.json")


def transformer_config(model_cfg) -> dict:
    """The transformer's config.json (class defaults = the 14B geometry when there is none) with
    `model.transformer_overrides` applied (e.g. num_layers for a quicker dry run)."""
    path = config_file(model_cfg)
    config = {}
    if os.path.isfile(path):
        with open(path) as f:
            config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    config.update(dict(getattr(model_cfg, "transformer_overrides", None) or {}))
    return config


class FakeWeights:
    """The weights source of a dry run: fake transformers and text embeddings of the configured sizes."""

    def __init__(self, mode: FakeTensorMode | None = None):
        self.mode = mode or new_fake_mode()
        self.built: list[torch.nn.Module] = []

    def transformer(self, model_cfg):
        from diffusers import HeliosTransformer3DModel

        from helios_train.model.loading import cast_weights, torch_dtype

        with self.mode:
            model = HeliosTransformer3DModel.from_config(transformer_config(model_cfg))
            cast_weights(model, torch_dtype(model_cfg.weight_dtype))  # as from_pretrained(dtype=...) loads it
        if model_cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.built.append(model)
        return model

    def prompt_embeds(self, model_cfg, count: int) -> torch.Tensor:
        """Text-encoder output [count, text_max_length, text_dim] (the encoder itself runs before training,
        without grad, and is freed: it is not part of a step's memory)."""
        text_dim = transformer_config(model_cfg).get("text_dim", 4096)
        with self.mode:
            return torch.zeros(count, int(model_cfg.text_max_length), int(text_dim))


class RandomWeights(FakeWeights):
    """Real random weights of the configured sizes, initialised on `device` (bench/gpu_check.py: no
    checkpoint to download or read; the numbers do not matter, the kernels and memory do)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.built = []

    def transformer(self, model_cfg):
        from diffusers import HeliosTransformer3DModel

        from helios_train.model.loading import cast_weights, torch_dtype

        with torch.device(self.device):
            model = HeliosTransformer3DModel.from_config(transformer_config(model_cfg))
        cast_weights(model, torch_dtype(model_cfg.weight_dtype))
        if model_cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.built.append(model)
        return model

    def prompt_embeds(self, model_cfg, count: int) -> torch.Tensor:
        text_dim = transformer_config(model_cfg).get("text_dim", 4096)
        return torch.randn(count, int(model_cfg.text_max_length), int(text_dim), device=self.device)
