"""Raw-mode batches (decoded uint8 frames) → the latent sample contract, on the trainer's device.

Why here and not in the data workers: the VAE and UMT5 belong on the accelerator, and workers are
CPU processes. Each 33-frame chunk is encoded independently (official get_short-latents.py), so a context chunk encoded
online equals the one `helios_train/data/encode_latents.py` would have stored. Only real chunks are
encoded; missing context (chunk index < 3) becomes zero latents, as the official loader pads.
"""
from __future__ import annotations

import hashlib

import torch

from helios_train.algorithms.history import assemble_history_sample
from helios_train.data.decoding import to_unit_range
from helios_train.data.samples import PIXEL_FRAMES_PER_CHUNK, context_chunks
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
        self.seed = seed

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        # VAE posterior samples seeded by the batch content: a resumed run re-encodes a batch exactly as
        # the uninterrupted run did, and a clip keeps its latents across epochs like offline encoding.
        digest = hashlib.sha256(f"{self.seed}/{batch['keys']}/{batch['chunk_index'].tolist()}".encode()).digest()
        generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        frames = batch.pop("context_frames")  # list (or stacked) of uint8 [33·k_i, H, W, 3]
        firsts = batch.pop("first_frame")
        n1 = context_chunks(self.history_cfg) + 1
        # All real chunks of the batch in one VAE call, each 33-frame chunk on its own.
        chunks, counts = [], []
        for f in frames:
            k = f.shape[0] // PIXEL_FRAMES_PER_CHUNK
            chunks.append(to_unit_range(f.to(self.device).unflatten(0, (k, PIXEL_FRAMES_PER_CHUNK))))
            counts.append(k)
        latents = encode_chunks(self.vae, torch.cat(chunks), generator=generator)[:, 0]  # [Σk, C, 9, h, w]
        x0_all = encode_first_frame(self.vae, to_unit_range(torch.stack(list(firsts)).to(self.device)),
                                    generator=generator)  # [B, C, 1, h, w]
        xs, hs, ts = [], [], []
        for i, part in enumerate(latents.split(counts)):
            padded = torch.cat([part.new_zeros(n1 - part.shape[0], *part.shape[1:]), part])
            # The target is the last slot; zero slots stand for the official zero-prepended history.
            _, history, target = assemble_history_sample(padded, n1 - 1, self.history_cfg)
            xs.append(x0_all[i] * (batch["chunk_index"][i] > 0))  # chunk 0 ⇒ pure T2V start: no anchor
            hs.append(history)
            ts.append(target)
        batch["x0"], batch["history"], batch["target"] = torch.stack(xs), torch.stack(hs), torch.stack(ts)
        batch["prompt_embeds"] = encode_prompts(
            self.tokenizer, self.text_encoder, batch["caption"], max_length=self.text_max_length, device=self.device
        )
        return batch
