"""The toy assets are real: diffusers loads the checkpoint, decord decodes the mp4s, latents re-encode."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import webdataset as wds

os.environ["HF_HUB_OFFLINE"] = "1"


def _samples(shard):
    return list(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False))


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@pytest.mark.parametrize("num_frames,guidance,expected", [(33, 1.0, 33), (66, 5.0, 65)])
def test_toy_checkpoint_runs_in_diffusers_pipeline(toy_root, num_frames, guidance, expected):
    from diffusers import HeliosPipeline

    pipe = HeliosPipeline.from_pretrained(toy_root / "model")
    assert pipe.scheduler.config.stages == 1 and pipe.scheduler.config.use_dynamic_shifting  # Base sampling
    out = pipe("a red circle moves left to right on a black background", height=64, width=128,
               num_frames=num_frames, num_inference_steps=2, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(0), output_type="np")
    # ceil(F/33) chunks of 33 frames, trimmed to 4n+1 (official `HeliosPipeline.__call__`): 33 → 33, 66 → 65.
    assert out.frames.shape == (1, expected, 64, 128, 3)
    assert np.isfinite(out.frames).all() and out.frames.std() > 0


def test_toy_checkpoint_is_deterministic_and_complete(tmp_path):
    from transformers import AutoTokenizer

    from helios_train.data.toy_checkpoint import build_toy_checkpoint

    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_toy_checkpoint(tmp_path / "a", seed=0)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG stream is left alone
    b, c = build_toy_checkpoint(tmp_path / "b", seed=0), build_toy_checkpoint(tmp_path / "c", seed=1)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (a / weights).read_bytes() == (b / weights).read_bytes()
    assert (a / weights).read_bytes() != (c / weights).read_bytes()
    assert (a / "tokenizer/tokenizer.json").read_bytes() == (b / "tokenizer/tokenizer.json").read_bytes()
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (a / part).is_dir()
    index = json.loads((a / "model_index.json").read_text())
    assert index["_class_name"] == "HeliosPipeline" and index["scheduler"] == ["diffusers", "HeliosScheduler"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    tok = AutoTokenizer.from_pretrained(a, subfolder="tokenizer")
    ids = tok("A red circle moves left to right on a dark blue background").input_ids
    assert tok.unk_token_id not in ids and ids[-1] == tok.eos_token_id and tok.pad_token_id is not None


def test_toy_checkpoint_cli_help():
    out = subprocess.run([sys.executable, "-m", "data_prep.toy_checkpoint", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--out" in out.stdout and "--seed" in out.stdout


def test_raw_shards_decode_to_declared_frames_and_pixels(toy_root):
    import decord

    from helios_train.data.toy_videos import COLOURS, SHAPES, render_video

    shards = sorted((toy_root / "raw").glob("raw-*.tar"))
    samples = [s for shard in shards for s in _samples(shard)]
    assert len(shards) == 8 and len(samples) == 24
    assert [s["__key__"] for s in samples] == [f"toy_{i:05d}" for i in range(24)]
    for s in samples:
        meta = json.loads(s["json"].decode("utf-8"))
        reader = decord.VideoReader(io.BytesIO(s["mp4"]))
        assert len(reader) == meta["num_frames"] in (99, 121, 132, 165)
        assert reader[0].shape == (meta["height"], meta["width"], 3) == (64, 128, 3)
        assert meta["fps"] == 24.0 and round(reader.get_avg_fps()) == 24
        words = meta["caption"].split()
        assert words[0] in ("a", "an") and any(w in SHAPES for w in words) and any(w in COLOURS for w in words)
    # Pixels: re-render the first shard's videos from the same seed and compare (h264 is lossy).
    rng = np.random.default_rng(0)
    for s in samples[:3]:
        frames, caption = render_video(rng, int(rng.choice((99, 121, 132, 165))), 64, 128)
        decoded = decord.VideoReader(io.BytesIO(s["mp4"])).get_batch(list(range(len(frames)))).asnumpy()
        assert np.abs(decoded.astype(np.float32) - frames).mean() < 5
        assert json.loads(s["json"])["caption"] == caption
        # Motion/colour change: the last chunk does not look like the first one.
        assert np.abs(frames[-33:].astype(np.float32) - frames[:33]).mean() > 5


def test_latent_shards_have_declared_shapes(toy_root):
    from PIL import Image

    raw = {s["__key__"]: s for shard in sorted((toy_root / "raw").glob("raw-*.tar")) for s in _samples(shard)}
    latent_shards = sorted((toy_root / "latents").glob("latent-*.tar"))
    assert [p.name[len("latent-"):] for p in latent_shards] == \
        [p.name[len("raw-"):] for p in sorted((toy_root / "raw").glob("raw-*.tar"))]
    n = 0
    for shard in latent_shards:
        for s in _samples(shard):
            meta = json.loads(s["json"])
            lat, emb = _npy(s["latents.npy"]), _npy(s["prompt_embed.npy"])
            S = meta["num_frames"] // 33
            assert lat.dtype == emb.dtype == np.float32
            assert lat.shape == tuple(meta["latent_shape"]) == (S, 4, 9, 8, 16) and meta["num_chunks"] == S
            assert np.isfinite(lat).all() and lat.std() > 0.1
            assert emb.shape == (512, 32)
            nonzero = np.abs(emb).sum(-1) > 0
            length = int(nonzero.sum())
            assert 5 < length < 512 and nonzero[:length].all()  # zero rows only after the prompt
            assert meta["caption"] == json.loads(raw[s["__key__"]]["json"])["caption"]
            first = np.asarray(Image.open(io.BytesIO(s["first_frame.png"])).convert("RGB"))
            import decord

            assert np.array_equal(first, decord.VideoReader(io.BytesIO(raw[s["__key__"]]["mp4"]))[0].asnumpy())
            n += 1
    assert n == 24


def test_latent_chunk_equals_reencoding_that_chunk(toy_root, tmp_path):
    """Latent shards hold each 33-frame chunk encoded alone (checked with mode() on both sides)."""
    from diffusers import AutoencoderKLWan

    from helios_train.data.encode_latents import encode_shards
    from helios_train.data.decoding import decode_mp4
    from helios_train.model.vae_codec import encode_chunks

    raw_shard = toy_root / "raw/raw-000000.tar"
    summary = encode_shards([raw_shard], tmp_path, toy_root / "model", min_frames=99, sample=False,
                            text_max_length=64)
    assert summary["shards_written"] == 1 and summary["samples"] == 3
    vae = AutoencoderKLWan.from_pretrained(toy_root / "model", subfolder="vae")
    for raw, lat in zip(_samples(raw_shard), _samples(tmp_path / "latent-000000.tar")):
        assert raw["__key__"] == lat["__key__"]
        stored = torch.from_numpy(_npy(lat["latents.npy"]))
        frames = decode_mp4(raw["mp4"], raw["__key__"])
        for k in (0, stored.shape[0] - 1):
            alone = encode_chunks(vae, frames[None, :, 33 * k : 33 * (k + 1)], sample=False)[0, 0]
            torch.testing.assert_close(stored[k], alone, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(stored[0], stored[-1], atol=1e-2)  # later chunks differ
        assert _npy(lat["prompt_embed.npy"]).shape == (64, 32)


def _write_raw_shard(path, lengths, captions):
    from helios_train.data.toy_videos import encode_mp4, render_video

    rng = np.random.default_rng(7)
    with wds.TarWriter(str(path)) as sink:
        for i, (n, cap) in enumerate(zip(lengths, captions)):
            frames, _ = render_video(rng, n, 32, 64)
            meta = {"num_frames": n, "fps": 24.0, "height": 32, "width": 64, **({"caption": cap} if cap else {})}
            sink.write({"__key__": f"clip_{i:03d}", "mp4": encode_mp4(frames), "json": json.dumps(meta).encode()})


def test_encode_latents_skips_existing_counts_short_and_batches(toy_root, tmp_path):
    from helios_train.data.encode_latents import encode_shards

    raw = tmp_path / "raw-000000.tar"
    _write_raw_shard(raw, [40, 99, 70, 99, 99], ["short", "a red circle", "short too", "a blue square", None])
    one = encode_shards([raw], tmp_path / "b1", toy_root / "model", min_frames=99, sample=False, text_max_length=16)
    assert one["samples"] == 2 and one["skipped"] == {"too_short": 2, "missing_caption": 1}
    out = tmp_path / "b1/latent-000000.tar"
    assert out.is_file() and not list((tmp_path / "b1").glob("*.tmp"))
    stamp = out.stat().st_mtime_ns
    listed = [json.loads(line)["item"] for line in (tmp_path / "b1/skipped.jsonl").read_text().splitlines()]
    assert [item.rsplit(":", 1)[1] for item in listed] == ["clip_000", "clip_002", "clip_004"]
    again = encode_shards([raw], tmp_path / "b1", toy_root / "model", min_frames=99, sample=False, text_max_length=16)
    assert (again["shards_written"], again["shards_up_to_date"], again["samples_in_output"]) == (0, 1, 2)
    assert again["skipped"] == one["skipped"] and out.stat().st_mtime_ns == stamp
    # Two equal-length videos in one VAE batch give the same latents as one at a time, in input order.
    two = encode_shards([raw], tmp_path / "b2", toy_root / "model", min_frames=99, sample=False,
                        text_max_length=16, batch_size=2)
    assert two["samples"] == 2
    a, b = _samples(out), _samples(tmp_path / "b2/latent-000000.tar")
    assert [s["__key__"] for s in a] == [s["__key__"] for s in b] == ["clip_001", "clip_003"]
    for x, y in zip(a, b):
        np.testing.assert_allclose(_npy(x["latents.npy"]), _npy(y["latents.npy"]), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(_npy(x["prompt_embed.npy"]), _npy(y["prompt_embed.npy"]), rtol=1e-5, atol=1e-5)
    assert json.loads(a[0]["json"])["latent_shape"] == [3, 4, 9, 4, 8]
    # A changed option (posterior sample instead of mode) rebuilds the shard instead of keeping the old one.
    assert encode_shards([raw], tmp_path / "b1", toy_root / "model", min_frames=99, text_max_length=16)[
        "shards_written"] == 1


def test_encode_latents_cli_help():
    out = subprocess.run([sys.executable, "-m", "data_prep.encode_latents", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--batch-size" in out.stdout and "--min-frames" in out.stdout


def test_ensure_toy_assets_reuses_complete_parts_and_waits_for_the_lock(tmp_path):
    import fcntl

    from helios_train.data.toy_assets import ensure_toy_assets

    root = tmp_path / "toy"
    for part in ("model", "raw", "latents"):
        (root / part).mkdir(parents=True)
        (root / part / "COMPLETE").write_text("ok")
    (root / "raw/raw-000000.tar").write_bytes(b"")
    assets = ensure_toy_assets(root)  # every part marked complete: nothing is rebuilt
    assert assets.model_dir == root / "model" and assets.raw_shards == [root / "raw/raw-000000.tar"]
    assert assets.latent_shards == [] and not (root / "model/transformer").exists()
    code = ("import time; from helios_train.data.toy_assets import ensure_toy_assets; "
            f"ensure_toy_assets({str(root)!r}); print(time.time())")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process is "building"
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=repo)
        time.sleep(3)
        released = time.time()
        fcntl.flock(lock, fcntl.LOCK_UN)
    finished = float(proc.communicate(timeout=60)[0].strip().splitlines()[-1])
    assert proc.returncode == 0 and finished >= released  # it waited instead of using half-built parts
