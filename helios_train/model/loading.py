"""Load the Helios components from one diffusers-layout folder — the same code for the toy and the 14B.

transformer: `HeliosTransformer3DModel.from_pretrained(path, subfolder="transformer")`; a Wan2.1
checkpoint (no memory patches) loads too, the patches then being initialised from the loaded patch
embedding (model/memory_patches.py). VAE and text encoder are only needed for raw-mode data and
validation, so they are loaded on demand.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os

import torch

from helios_train.model.memory_patches import init_memory_patches, materialise_memory_patches, memory_patches_missing

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The weights source: None = the files under model.path; FakeWeights (helios_train/model/fake_weights.py)
# during a dry run, RandomWeights (same file) for the GPU check — so the stages build their full-size
# roles through this module unchanged.
_WEIGHTS_SOURCE: contextvars.ContextVar = contextvars.ContextVar("helios_fake_weights", default=None)


@contextlib.contextmanager
def use_weights_source(source):
    token = _WEIGHTS_SOURCE.set(source)
    try:
        yield source
    finally:
        _WEIGHTS_SOURCE.reset(token)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def keeps_fp32(model, name: str) -> bool:
    """True for a parameter diffusers keeps in fp32 whatever the load dtype (`_keep_in_fp32_modules`:
    time embedder, norms, scale-shift tables, history key scale), matched on name components as
    `from_pretrained(dtype=...)` matches them."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    return any(k in name.split(".") for k in keep)


def cast_weights(model, dtype: torch.dtype):
    """Cast every floating parameter/buffer to `dtype` except the fp32-kept modules — what
    `from_pretrained(dtype=...)` does, for a model already in memory (`model.to(dtype)` would cast the
    norms and time embedder too; diffusers warns about exactly that)."""
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and tensor.dtype != dtype and not keeps_fp32(model, name):
                tensor.data = tensor.data.to(dtype)
    return model


def transformer_config_file(model_cfg) -> str:
    root = model_cfg.transformer_path or os.path.join(model_cfg.path, model_cfg.transformer_subfolder)
    return os.path.join(root, "config.json")


def check_model_dir(model_cfg) -> None:
    """Fail before any work when the folder is not a diffusers-layout Helios/Wan checkpoint."""
    cfg_file = transformer_config_file(model_cfg)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(
            f"model.path: no transformer config at {cfg_file!r}; expected a diffusers-layout folder with "
            f"'{model_cfg.transformer_subfolder}/config.json' (set model.path=... or model.transformer_path=...)"
        )


def load_transformer(model_cfg, trainables_cfg=None, device="cpu", history: bool = True):
    """`history`: the stage feeds history, so the model must have its multi-term memory patches — a folder whose
    config has none (a Wan2.1-style base, the miniature's stage=t2v export) gets them, initialised below. False
    (stage=t2v): the folder's architecture as it is."""
    from diffusers import HeliosTransformer3DModel

    source = _WEIGHTS_SOURCE.get()
    if source is not None:
        return source.transformer(model_cfg)
    if getattr(model_cfg, "transformer_overrides", None):
        raise ValueError(f"model.transformer_overrides={dict(model_cfg.transformer_overrides)} changes the architecture "
                         "of a model built from its config (dry_run=true, plan=true); a checkpoint's weights "
                         "have one architecture: drop the overrides to train")
    check_model_dir(model_cfg)
    if model_cfg.transformer_path:
        kwargs = {"pretrained_model_name_or_path": model_cfg.transformer_path}
    else:
        kwargs = {"pretrained_model_name_or_path": model_cfg.path, "subfolder": model_cfg.transformer_subfolder}
    dtype = torch_dtype(model_cfg.weight_dtype)
    if history:
        kwargs["has_multi_term_memory_patch"] = True  # overrides the folder's config.json
    model, info = HeliosTransformer3DModel.from_pretrained(**kwargs, dtype=dtype, output_loading_info=True)
    policy = trainables_cfg.memory_patch_init if trainables_cfg is not None else "after_load"
    if memory_patches_missing(info):
        # Starting from Wan2.1 (stage 1 init): the checkpoint has no memory patches. diffusers leaves
        # tensors it did not find on the meta device (no storage), so they are materialised here in
        # the patch embedding's dtype before being initialised. A checkpoint that has them
        # (Helios-Base, our exports) is never re-initialised: they were trained.
        materialise_memory_patches(model)
        if policy == "after_load":
            init_memory_patches(model)
            log.info("memory patches initialised from the loaded patch_embedding")
        else:
            # Official order bug (train_helios.py builds the patches in __init__, before the Wan weights
            # load): the init ran on the *random* patch embedding.
            random_embed = torch.nn.Conv3d(
                model.patch_embedding.in_channels, model.patch_embedding.out_channels,
                model.patch_embedding.kernel_size, model.patch_embedding.stride,
            )
            init_memory_patches(model, source=random_embed)
            log.warning("memory_patch_init=official: memory patches derived from a random patch embedding")
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ValueError(f"{kwargs['pretrained_model_name_or_path']}: the checkpoint lacks {len(still_meta)} tensors "
                         f"besides the memory patches (e.g. {still_meta[:3]}); is it a Helios / Wan2.1-T2V folder?")
    if model_cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.to(device)


def apply_speed_options(transformer, model_cfg) -> None:
    """Attention backend and regional compile; call after adapters are attached (compile last)."""
    if model_cfg.attention_backend and model_cfg.attention_backend != "native":
        transformer.set_attention_backend(model_cfg.attention_backend)
    if model_cfg.compile_blocks:
        # Regional compilation: one compiled HeliosTransformerBlock graph reused by every block, so
        # compile time does not grow with depth (diffusers' _repeated_blocks).
        transformer.compile_repeated_blocks(fullgraph=False)


def load_vae(model_cfg, device="cpu"):
    from diffusers import AutoencoderKLWan

    # The Wan VAE runs in fp32 in every official script (train_helios.py, infer_helios.py, tools/offload_data/).
    return AutoencoderKLWan.from_pretrained(model_cfg.path, subfolder="vae", dtype=torch.float32).to(device)


def load_text_stack(model_cfg, device="cpu"):
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(model_cfg.path, subfolder="tokenizer")
    dtype = torch.bfloat16 if model_cfg.weight_dtype == "bf16" else torch.float32
    encoder = UMT5EncoderModel.from_pretrained(model_cfg.path, subfolder="text_encoder", dtype=dtype)
    return tokenizer, encoder.to(device)


def encode_text(model_cfg, prompts: list[str], device="cpu") -> torch.Tensor:
    """UMT5 embeddings [len(prompts), text_max_length, D] of fixed prompts (e.g. the negative prompt);
    the text encoder is loaded for this and freed."""
    source = _WEIGHTS_SOURCE.get()
    if source is not None:
        return source.prompt_embeds(model_cfg, len(prompts))
    from helios_train.model.text_codec import encode_prompts

    tok, enc = load_text_stack(model_cfg, device)
    return encode_prompts(tok, enc, list(prompts), model_cfg.text_max_length, device)
