"""UMT5 prompt embeddings the Helios way (official `HeliosPipeline._get_t5_prompt_embeds`, `prompt_clean`,
helios/pipelines/pipeline_helios.py).

Clean the text like the pipelines (ftfy, double html unescape, whitespace), tokenise to `max_length`,
run the encoder with its mask, then zero every position past the prompt's real length. The mask is
not kept: the DiT attends to the zero rows, as in Wan. Must equal
`HeliosPipeline.encode_prompt(..., max_sequence_length=max_length)` (tests/test_codecs.py).
"""
from __future__ import annotations

import html
import re

import torch

try:  # the pipelines' own cleaner, so training and inference see identical token ids
    from diffusers.pipelines.helios.pipeline_helios import prompt_clean
except ImportError:  # older diffusers without Helios: same three steps here

    def prompt_clean(text: str) -> str:
        try:
            import ftfy

            text = ftfy.fix_text(text)
        except ImportError:
            pass
        text = html.unescape(html.unescape(text)).strip()
        return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_length: int = 512, device=None) -> torch.Tensor:
    """prompts -> fp32 [B, max_length, D], rows beyond each prompt's token count set to 0."""
    if isinstance(prompts, str):
        prompts = [prompts]
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
    # masked_fill rather than a multiply: padded rows are replaced, so even a non-finite value the
    # encoder might produce there (bf16 overflow) cannot leak into the stored embedding.
    return hidden.masked_fill(~mask.bool()[..., None], 0.0)
