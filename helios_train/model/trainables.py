"""Trainable-parameter policy: PEFT LoRA on every non-norm Linear, plus named full-trained tensors.

Official train_helios.py and stage yamls: all stages train a LoRA (`lora_layers: all-linear`, names
containing "norm" dropped, gaussian init, alpha = rank) and a few extra tensors (memory patches fully
trained in stage 1; patch embedding through a Conv3d LoRA). We list the targets explicitly instead of PEFT's
"all-linear" shorthand because that shorthand drops the output layer (`proj_out`) on
transformers models, while the official code adapts it.
"""
from __future__ import annotations

import logging

from peft import LoraConfig as PeftLoraConfig
from torch import nn

from helios_train.model.fake_weights import same_mode_as

MEMORY_PATCHES = ("patch_short", "patch_mid", "patch_long")
log = logging.getLogger(__name__)


def lora_targets(transformer: nn.Module, trainables_cfg) -> list[str]:
    lora = trainables_cfg.lora
    if lora.target != "all-linear":
        return [t.strip() for t in lora.target.split(",") if t.strip()]
    names = [
        name
        for name, module in transformer.named_modules()
        if isinstance(module, nn.Linear) and not any(x in name for x in lora.exclude)
    ]
    if trainables_cfg.patch_embedding == "lora":
        names.append("patch_embedding")
    if trainables_cfg.memory_patches == "lora":
        names.extend(p for p in MEMORY_PATCHES if hasattr(transformer, p))
    return names


def _add_lora(transformer: nn.Module, trainables_cfg, adapter_name: str) -> None:
    lora = trainables_cfg.lora
    if lora.rank <= 0:
        return
    transformer.add_adapter(
        PeftLoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha or lora.rank,
            init_lora_weights=lora.init,
            lora_dropout=lora.dropout,
            target_modules=lora_targets(transformer, trainables_cfg),
        ),
        adapter_name=adapter_name,
    )


def apply_trainable_policy(transformer: nn.Module, trainables_cfg, adapter_name: str = "default") -> list[str]:
    """Freeze the base, add the LoRA adapter, unfreeze full-trained tensors. Returns trainable names.
    `full_model`: every parameter trains, no adapter (pretraining from scratch, stage=t2v)."""
    if getattr(trainables_cfg, "full_model", False):
        if trainables_cfg.lora.rank > 0:  # e.g. the toy preset's rank 8 under stage=t2v
            log.warning("stage.trainables.full_model=true trains every weight: stage.trainables.lora.rank=%d is not "
                        "used", trainables_cfg.lora.rank)
        transformer.requires_grad_(True)
        for p in transformer.parameters():
            p.data = p.data.float()
        return [n for n, _ in transformer.named_parameters()]
    transformer.requires_grad_(False)
    with same_mode_as(transformer):  # adapters on a fake (dry-run) model are fake too
        _add_lora(transformer, trainables_cfg, adapter_name)
    full = []
    if trainables_cfg.patch_embedding == "full":
        full.append("patch_embedding")
    if trainables_cfg.memory_patches == "full":
        full.extend(p for p in MEMORY_PATCHES if hasattr(transformer, p))
    for name in full:
        # With a LoRA wrapper on the module the original weights live under base_layer.
        getattr(transformer, name).requires_grad_(True)
    trainable = [n for n, p in transformer.named_parameters() if p.requires_grad]
    for n, p in transformer.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trainables in fp32 (official train_helios.py cast_training_params)
    if not trainable:
        raise ValueError("stage.trainables leaves nothing to train (LoRA rank 0 and no full-trained tensor)")
    return trainable
