"""The Helios family (`model.family=helios`): diffusers' `HeliosTransformer3DModel`, its multi-term memory
patches and history inputs. Loading: helios_train/model/loading.py; trainables: model/trainables.py; forward
arguments and token counts: model/inputs.py; where the GAN reads it: model/gan_taps.py."""
from __future__ import annotations

from helios_train.model.adapter import ModelAdapter


class HeliosAdapter(ModelAdapter):
    family = "helios"

    def load(self, model_cfg, trainables_cfg=None, device="cpu", history: bool = True):
        from helios_train.model.loading import load_transformer

        return load_transformer(model_cfg, trainables_cfg, device=device, history=history)

    def add_trainables(self, model, trainables_cfg, adapter_name: str = "default") -> list[str]:
        from helios_train.model.trainables import apply_trainable_policy

        return apply_trainable_policy(model, trainables_cfg, adapter_name)

    def forward_kwargs(self, noisy, x0, history, timestep, prompt_embeds, history_cfg) -> dict:
        from helios_train.model.inputs import model_inputs

        return model_inputs(noisy, x0, history, timestep, prompt_embeds, history_cfg)

    def token_counts(self, model, latent_hw, history_cfg) -> dict[str, int]:
        from helios_train.model.inputs import token_counts

        return token_counts(model, latent_hw, history_cfg)

    def meta_model(self, model_cfg):
        import torch
        from diffusers import HeliosTransformer3DModel

        from helios_train.model.fake_weights import transformer_config

        with torch.device("meta"):
            return HeliosTransformer3DModel.from_config(transformer_config(model_cfg))
