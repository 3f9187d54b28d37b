"""UMT5 prompt embeddings the Helios way (spec inference_data §1.8).

Clean the text like the pipelines (ftfy, html unescape, whitespace), tokenise to `max_length`, run the
encoder with its mask, then zero every position past the prompt's real length. The mask is not kept:
the DiT attends to the zero rows, as in Wan.
"""
from __future__ import annotations

import torch
from diffusers.pipelines.helios.pipeline_helios import prompt_clean


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_length: int = 512, device=None) -> torch.Tensor:
    device = device or text_encoder.device
    tokens = tokenizer(
        [prompt_clean(p) for p in prompts],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    mask = tokens.attention_mask.to(device)
    hidden = text_encoder(tokens.input_ids.to(device), mask).last_hidden_state.float()
    return hidden * mask[..., None].to(hidden.dtype)  # zero rows beyond each prompt's length
