"""The toy assets are real: diffusers loads the checkpoint, decord decodes the mp4s, latents re-encode."""
from __future__ import annotations

import io
import json

import numpy as np
import torch
import webdataset as wds


def test_toy_checkpoint_loads_in_diffusers_pipeline(toy_root):
    from diffusers import HeliosPipeline

    pipe = HeliosPipeline.from_pretrained(toy_root / "model")
    out = pipe("a red circle moves left to right on a black background", height=64, width=128, num_frames=66,
               num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np")
    # 66 requested frames → 2 chunks of 33 → trimmed to 4n+1 = 65 (spec inference_data §4.1)
    assert out.frames.shape == (1, 65, 64, 128, 3)
    assert np.isfinite(out.frames).all()


def test_toy_checkpoint_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from data_prep.toy_checkpoint import build_toy_checkpoint

    a, b, c = (build_toy_checkpoint(tmp_path / n, seed=s) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    wa, wb, wc = (load_file(str(p / "transformer/diffusion_pytorch_model.safetensors")) for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_raw_shards_decode_to_declared_frames(toy_root):
    import decord

    n = 0
    for shard in sorted((toy_root / "raw").glob("raw-*.tar")):
        for s in wds.WebDataset(str(shard), shardshuffle=False):
            meta = json.loads(s["json"])
            reader = decord.VideoReader(io.BytesIO(s["mp4"]))
            assert len(reader) == meta["num_frames"] >= 99
            assert reader[0].shape == (meta["height"], meta["width"], 3) == (64, 128, 3)
            assert meta["caption"].startswith("a ")
            n += 1
    assert n == 24


def test_latent_chunk_equals_reencoding_that_chunk(toy_root, tmp_path):
    """Latent shards hold each 33-frame chunk encoded alone; re-running skips finished shards."""
    from diffusers import AutoencoderKLWan

    from data_prep.encode_latents import encode_shards
    from helios_train.data.decoding import decode_mp4
    from helios_train.model.vae_codec import encode_chunks, encode_first_frame

    raw_shard = toy_root / "raw/raw-000000.tar"
    summary = encode_shards([raw_shard], tmp_path, toy_root / "model", min_frames=99, sample=False, text_max_length=64)
    assert summary["shards_written"] == 1 and summary["samples"] == 3
    again = encode_shards([raw_shard], tmp_path, toy_root / "model", min_frames=99, sample=False)
    assert again["shards_written"] == 0 and again["shards_skipped_existing"] == 1
    vae = AutoencoderKLWan.from_pretrained(toy_root / "model", subfolder="vae")
    raw = next(iter(wds.WebDataset(str(raw_shard), shardshuffle=False)))
    lat = next(iter(wds.WebDataset(str(tmp_path / "latent-000000.tar"), shardshuffle=False)))
    assert raw["__key__"] == lat["__key__"]
    stored = np.load(io.BytesIO(lat["latents.npy"]), allow_pickle=False)
    meta = json.loads(lat["json"])
    frames = decode_mp4(raw["mp4"], raw["__key__"])
    assert stored.shape == (meta["num_frames"] // 33, 4, 9, 8, 16) == tuple(meta["latent_shape"])
    chunk1_alone = encode_chunks(vae, frames[None, :, 33:66], sample=False)[0, 0]
    torch.testing.assert_close(torch.from_numpy(stored[1]), chunk1_alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(torch.from_numpy(stored[1]), torch.from_numpy(stored[2]), atol=1e-3)
    # The causal VAE's first latent of a chunk depends on its first frame only.
    torch.testing.assert_close(encode_first_frame(vae, frames[None, :, 33:], sample=False)[0], chunk1_alone[:, :1],
                               rtol=1e-4, atol=1e-4)
    assert np.load(io.BytesIO(lat["prompt_embed.npy"]), allow_pickle=False).shape == (64, 32)
    # The sampled toy latents (official latent_dist.sample()) have the same layout.
    toy = next(iter(wds.WebDataset(str(toy_root / "latents/latent-000000.tar"), shardshuffle=False)))
    assert np.load(io.BytesIO(toy["latents.npy"]), allow_pickle=False).shape == stored.shape


def test_text_embeddings_match_pipeline_encode_prompt(toy_root):
    from diffusers import HeliosPipeline

    from helios_train.model.text_codec import encode_prompts

    pipe = HeliosPipeline.from_pretrained(toy_root / "model")
    prompts = ["a red circle moves left to right", "another blue square on a gray background"]
    ours = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, max_length=64)
    ref, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=64)[:2]
    torch.testing.assert_close(ours, ref.float())
    n_tokens = len(pipe.tokenizer(prompts[0]).input_ids)
    assert ours[0, n_tokens:].abs().sum() == 0 and ours[0, :n_tokens].abs().sum() > 0
