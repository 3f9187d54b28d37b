"""The shared VAE / text codecs: chunk independence, normalisation, and equality with diffusers' pipeline."""
from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from helios_train.model.text_codec import encode_prompts, prompt_clean  # noqa: E402
from helios_train.model.vae_codec import (  # noqa: E402
    decode_chunks,
    denormalize_latents,
    encode_chunks,
    encode_first_frame,
    normalize_latents,
)


@pytest.fixture(scope="module")
def vae(toy_root):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(toy_root / "model", subfolder="vae").eval()


@pytest.fixture(scope="module")
def pipe(toy_root):
    from diffusers import HeliosPipeline

    return HeliosPipeline.from_pretrained(toy_root / "model")


@pytest.fixture(scope="module")
def frames():
    # 70 frames: two whole 33-frame chunks + 4 trailing frames that must be dropped.
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 70, 32, 64, generator=g) * 2 - 1


def test_normalisation_is_per_channel_and_invertible():
    fake_vae = SimpleNamespace(config=SimpleNamespace(latents_mean=[1.0, -2.0, 0.5], latents_std=[2.0, 0.5, 4.0]))
    z = torch.randn(2, 3, 5, 4, 4)
    n = normalize_latents(z, fake_vae)
    torch.testing.assert_close(n[:, 1], (z[:, 1] + 2.0) / 0.5)  # channel 1 uses its own mean/std
    torch.testing.assert_close(n[:, 2], (z[:, 2] - 0.5) / 4.0)
    assert n.dtype == torch.float32
    torch.testing.assert_close(denormalize_latents(n, fake_vae), z)


def test_encode_chunks_shape_and_batched_windows_equal_separate_calls(vae, frames):
    lat = encode_chunks(vae, frames, sample=False)
    assert lat.shape == (2, 2, 4, 9, 4, 8) and lat.dtype == torch.float32
    for b in range(2):
        for k in range(2):
            alone = encode_chunks(vae, frames[b : b + 1, :, 33 * k : 33 * (k + 1)], sample=False)[0, 0]
            torch.testing.assert_close(lat[b, k], alone, rtol=1e-4, atol=1e-4)
    # Capping the VAE batch (memory) does not change the result either.
    torch.testing.assert_close(encode_chunks(vae, frames, sample=False, max_windows_per_call=3), lat,
                               rtol=1e-4, atol=1e-4)
    # Chunk 1 is encoded from scratch: it differs from the continuation of a 66-frame causal encode.
    whole = normalize_latents(vae.encode(frames[:1, :, :65]).latent_dist.mode(), vae)  # 65 frames -> 17 latents
    assert not torch.allclose(whole[0, :, 9:17], lat[0, 1, :, 1:], atol=1e-3)


def test_encode_chunks_rejects_videos_shorter_than_a_chunk(vae, frames):
    with pytest.raises(ValueError, match="fewer than one 33-frame chunk"):
        encode_chunks(vae, frames[:, :, :32])


def test_first_frame_latent_equals_first_latent_of_its_chunk(vae, frames):
    chunks = encode_chunks(vae, frames, sample=False)
    first = encode_first_frame(vae, frames[:, :, 33:], sample=False)
    assert first.shape == (2, 4, 1, 4, 8)
    torch.testing.assert_close(first, chunks[:, 1, :, :1], rtol=1e-4, atol=1e-4)
    # ...and only that latent: the second latent of the chunk sees frames 1-4 as well.
    assert not torch.allclose(first, chunks[:, 1, :, 1:2], atol=1e-3)


def test_sampling_is_seeded_and_differs_from_mode(vae, frames):
    def draw(seed):
        return encode_chunks(vae, frames, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(draw(3), draw(3))
    assert not torch.allclose(draw(3), draw(4))
    assert not torch.allclose(draw(3), encode_chunks(vae, frames, sample=False))


def test_decode_chunks_goes_chunk_by_chunk(vae, frames):
    lat = encode_chunks(vae, frames, sample=False)
    video = decode_chunks(vae, lat)
    assert video.shape == (2, 3, 66, 32, 64) and video.dtype == torch.float32
    torch.testing.assert_close(video[:, :, 33:], decode_chunks(vae, lat[:, 1:2]), rtol=1e-4, atol=1e-4)
    raw = vae.decode(denormalize_latents(lat[:, 1], vae)).sample
    torch.testing.assert_close(video[:, :, 33:], raw, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        decode_chunks(vae, lat[:, 0])


def test_text_embeddings_match_pipeline_encode_prompt(pipe):
    prompts = ["a red circle moves left to right", "  another blue square &amp;amp; a gray\n background  ",
               "bright tones, overexposed, static"]
    ours = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, max_length=64)
    ref = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=64)[0]
    assert ours.shape == (3, 64, 32)
    torch.testing.assert_close(ours, ref.float())
    # Rows past each prompt's real length are zero, rows inside are not.
    for i, p in enumerate(prompts):
        n_tokens = len(pipe.tokenizer(prompt_clean(p)).input_ids)
        assert ours[i, n_tokens:].abs().sum() == 0
        assert (ours[i, :n_tokens].abs().sum(-1) > 0).all()
    # The default length is the official 512, and a single prompt is accepted as a plain string.
    default = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts[0])
    assert default.shape == (1, 512, 32)
    torch.testing.assert_close(default[:, :64], ours[:1])


def test_prompt_is_cleaned_like_the_pipeline(pipe):
    messy = "a  red\tcircle &amp;amp; a blue square\n"
    assert prompt_clean(messy) == "a red circle & a blue square"
    a = encode_prompts(pipe.tokenizer, pipe.text_encoder, [messy], max_length=32)
    b = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red circle & a blue square"], max_length=32)
    torch.testing.assert_close(a, b)


def test_fallback_prompt_clean_matches_diffusers(monkeypatch):
    """Without diffusers' Helios module the codec cleans prompts itself, identically."""
    import helios_train.model.text_codec as tc

    monkeypatch.setitem(__import__("sys").modules, "diffusers.pipelines.helios.pipeline_helios", None)
    spec = importlib.util.spec_from_file_location("_text_codec_fallback", tc.__file__)
    fallback = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fallback)
    assert fallback.prompt_clean is not tc.prompt_clean  # the fallback really was used
    for text in ["a  red\tcircle &amp;amp; x\n", "caf\u00c3\u00a9 &lt;b&gt;", "  plain  "]:
        assert fallback.prompt_clean(text) == tc.prompt_clean(text)
