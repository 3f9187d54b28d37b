"""Raw-mode batches (decoded frames) → the latent sample contract, on the trainer's device.

Why here and not in the data workers: the VAE and UMT5 belong on the accelerator, and workers are
CPU processes. Each 33-frame chunk is encoded independently (spec §1.3), so a context chunk encoded
online equals the one `data_prep/encode_latents.py` would have stored.
"""
from __future__ import annotations

import torch

from helios_train.history import assemble_history_sample
from helios_train.model.text_codec import encode_prompts
from helios_train.model.vae_codec import encode_chunks, encode_first_frame


class OnlineEncoder:
    def __init__(self, vae, tokenizer, text_encoder, history_cfg, text_max_length: int, device, seed: int = 0):
        self.vae = vae.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.history_cfg = history_cfg
        self.text_max_length = text_max_length
        self.device = device
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        frames = batch.pop("context_frames").to(self.device)  # [B, n+1, 3, 33, H, W]
        valid = batch.pop("context_valid").to(self.device)  # [B, n+1]
        first = batch.pop("first_frame").to(self.device)  # [B, 3, 1, H, W]
        b, n1 = frames.shape[:2]
        # Chunks become the batch axis: one VAE call, each chunk encoded on its own.
        flat = frames.flatten(0, 1)  # [B*(n+1), 3, 33, H, W]
        latents = encode_chunks(self.vae, flat, generator=self.generator)[:, 0]  # [B*(n+1), C, 9, h, w]
        latents = latents.unflatten(0, (b, n1)) * valid[:, :, None, None, None, None]
        x0_all = encode_first_frame(self.vae, first)  # [B, C, 1, h, w]
        xs, hs, ts = [], [], []
        for i in range(b):
            # The target is the last context slot; padded slots are zero, like the official prepend.
            _, history, target = assemble_history_sample(latents[i], n1 - 1, self.history_cfg)
            x0 = x0_all[i] * (batch["chunk_index"][i] > 0)  # chunk 0 ⇒ pure T2V start: no anchor
            xs.append(x0)
            hs.append(history)
            ts.append(target)
        batch["x0"], batch["history"], batch["target"] = torch.stack(xs), torch.stack(hs), torch.stack(ts)
        batch["prompt_embeds"] = encode_prompts(
            self.tokenizer, self.text_encoder, batch["caption"], max_length=self.text_max_length, device=self.device
        )
        return batch
