"""The miniature's world (helios_train/data/miniature_world.py) and the pieces the miniature adds to the framework:
the history-free T2V stage and sampler, a Wan2.1-style folder gaining its memory patches, the untrained-Base export."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helios_train.data import miniature_world as world


def test_clips_are_long_bounded_and_their_captions_invert():
    clips = world.split_clips("train", 40) + world.split_clips("heldout", 20)
    for clip in clips:
        s = world.states(clip, np.arange(world.CLIP_FRAMES))
        margin = clip.radius * (1 + world.PULSE_GAIN) - 1e-9
        assert s["x"].min() >= margin and s["x"].max() <= world.SIZE - margin  # bounces, never leaves the frame
        assert s["y"].min() >= margin and s["y"].max() <= world.SIZE - margin
        parsed = world.parse_caption(clip.caption())
        assert parsed == {"shape": clip.shape, "colour": clip.colour, "colour2": clip.colour2, "motion": clip.motion,
                          "speed": clip.speed, "pulse": clip.pulse, "background": clip.background}
    assert world.parse_caption("a red circle moves left to right on a dark blue background") is None  # the toy's


def test_objects_move_at_the_caption_speed_and_bounce():
    clip = world.Clip("c", "circle", "red", "left and right", "quickly", "black", None, None, False, 7.0, 20.0, 32.0,
                      1, 1)
    x = world.states(clip, np.arange(world.CLIP_FRAMES))["x"]
    steps = np.abs(np.diff(x))
    assert np.allclose(np.median(steps), world.SPEEDS["quickly"])
    assert (np.diff(np.sign(np.diff(x))) != 0).sum() >= 4  # it turns at the walls, again and again
    frames = world.render(clip, [0, 10])
    assert frames.shape == (2, 64, 64, 3) and frames.dtype == np.uint8
    assert not np.array_equal(frames[0], frames[1])


def test_heldout_split_has_unseen_combinations_and_training_never_does():
    train = world.split_clips("train", 200)
    heldout = world.split_clips("heldout", 60)
    assert not {(c.shape, c.motion) for c in train} & world.UNSEEN_IN_TRAINING
    assert {(c.shape, c.motion) for c in heldout} & world.UNSEEN_IN_TRAINING
    assert all(c.combo_seen == ((c.shape, c.motion) not in world.UNSEEN_IN_TRAINING) for c in heldout)
    assert {c.name for c in train}.isdisjoint({c.name for c in heldout})
    assert world.split_clips("train", 3) == world.split_clips("train", 3)  # deterministic


def test_written_split_is_reused_and_decodes_close_to_the_render(tmp_path):
    captions = world.write_split(tmp_path, "heldout", 2)
    rows = [json.loads(line) for line in captions.read_text().splitlines()]
    first = (tmp_path / "heldout" / rows[0]["path"]).stat().st_mtime_ns
    world.write_split(tmp_path, "heldout", 2)
    assert (tmp_path / "heldout" / rows[0]["path"]).stat().st_mtime_ns == first  # kept, not re-encoded
    import decord

    reader = decord.VideoReader(str(tmp_path / "heldout" / rows[0]["path"]))
    assert len(reader) == world.CLIP_FRAMES
    clip = world.clip_from_record(rows[0])
    decoded = reader.get_batch([0, 200]).asnumpy().astype(np.float32)
    assert np.abs(decoded - world.render(clip, [0, 200])).mean() < 6  # h264 at crf 18


def _tiny_without_patches(path):
    from diffusers import HeliosTransformer3DModel

    torch.manual_seed(0)
    HeliosTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
                             freq_dim=32, ffn_dim=64, num_layers=2, rope_dim=(4, 6, 6),
                             has_multi_term_memory_patch=False).save_pretrained(path / "transformer")


def test_a_folder_without_memory_patches_gains_them_from_its_patch_embedding(tmp_path):
    from omegaconf import OmegaConf

    from helios_train.config.run import ModelConfig
    from helios_train.model.loading import load_transformer
    from helios_train.model.memory_patches import expanded_kernel

    _tiny_without_patches(tmp_path)
    cfg = OmegaConf.structured(ModelConfig(name="t", path=str(tmp_path)))
    plain = load_transformer(cfg, history=False)
    assert not hasattr(plain, "patch_short")  # stage=t2v: the folder as it is
    helios = load_transformer(cfg)  # every Helios stage: memory patches, initialised after loading
    w = helios.patch_embedding.weight
    assert torch.equal(helios.patch_short.weight, w)
    assert torch.allclose(helios.patch_long.weight, expanded_kernel(w, 4))


def test_history_free_sampling_ignores_the_history(tmp_path):
    """variant t2v: HeliosPipeline on a model without memory patches generates; each chunk sees no history, so a
    two-chunk video's second chunk is what the model makes of the caption alone."""
    from helios_train.model.variants import _drop_history, without_history

    _tiny_without_patches(tmp_path)
    from diffusers import HeliosTransformer3DModel

    model = HeliosTransformer3DModel.from_pretrained(tmp_path / "transformer")
    x = torch.randn(1, 4, 9, 4, 4)
    kw = {"hidden_states": x, "timestep": torch.tensor([500.0]), "encoder_hidden_states": torch.randn(1, 8, 32)}
    history = {"latents_history_short": torch.randn(1, 4, 2, 4, 4),
               "indices_latents_history_short": torch.tensor([[0, 19]])}
    with pytest.raises(AttributeError):  # the pipeline's history reaches layers this model does not have
        model(**kw, **history, return_dict=False)
    without_history(model)
    without_history(model)  # once only
    assert sum(h is _drop_history for h in model._forward_pre_hooks.values()) == 1
    with torch.no_grad():
        assert torch.equal(model(**kw, **history, return_dict=False)[0], model(**kw, return_dict=False)[0])


def test_t2v_stage_trains_every_weight_and_hands_base_a_history_free_model(toy_root, tmp_path):
    """stage=t2v: every weight trains (no adapter), the loss falls, the export samples without history (variant
    t2v, chunks independent of each other) and the untrained-Base export of it takes history again."""
    from conftest import train
    from safetensors.torch import load_file

    from helios_train.sampling.export import export, export_initial
    from helios_train.sampling.infer import load_pipeline

    result = train(toy_root, tmp_path, ["stage=t2v", "trainer.max_steps=12", "trainer.checkpoint_every=12",
                                        "run_name=t2v"])
    rows = [json.loads(line) for line in (tmp_path / "t2v" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) and result["step"] == 12
    saved = load_file(str(tmp_path / "t2v" / "checkpoint-12" / "generator.trainable.safetensors"))
    assert any(".attn1.to_q.weight" in k for k in saved) and not any("lora" in k for k in saved)
    folder = export(tmp_path / "t2v", tmp_path / "exp_t2v")
    assert json.loads((folder / "helios_export.json").read_text())["variant"] == "t2v"
    pipe, variant = load_pipeline(folder)
    assert variant == "t2v" and type(pipe).__name__ == "HeliosPipeline"
    assert any(True for _ in pipe.transformer._forward_pre_hooks.values())  # the history is dropped
    untrained = export_initial(folder, tmp_path / "untrained", "base")
    pipe, variant = load_pipeline(untrained)
    assert variant == "base" and hasattr(pipe.transformer, "patch_long")
    assert not any(True for _ in pipe.transformer._forward_pre_hooks.values())  # history reaches this one


def test_the_documented_commands_make_clips_the_data_tools_accept(tmp_path):
    """`python -m data_prep.miniature_videos` then `videos_to_shards` with the options the docstring gives: every clip
    is kept (64×64 is in the 512×512 bucket, 396 frames pass --min-frames 396) and decodes whole."""
    import subprocess
    import sys

    from conftest import REPO
    from helios_train.data.raw_clips import decoded_clips

    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=REPO, check=True, capture_output=True,  # noqa: E731
                                       text=True)
    run("data_prep.miniature_videos", "--out", str(tmp_path), "--train", "2", "--heldout", "1")
    out = run("data_prep.videos_to_shards", "--videos", str(tmp_path / "train"), "--captions",
              str(tmp_path / "train" / "captions.jsonl"), "--out", str(tmp_path / "raw"), "--height", "64", "--width",
              "64", "--bucket", "512x512", "--min-frames", "396")
    assert json.loads(out.stdout.strip().splitlines()[-1])["samples_in_output"] == 2
    clips = decoded_clips(sorted((tmp_path / "raw").glob("raw-*.tar")))
    assert [len(f) for _, _, f in clips] == [world.CLIP_FRAMES] * 2
    assert all(world.parse_caption(c) is not None for _, c, _ in clips)


def test_the_vae_latent_starts_at_unit_scale_on_the_data():
    """normalise_latent_scale: the posterior mean has zero mean and unit std per channel on the batch it saw (a
    fresh VAE's latent barely varies with its input: std ~0.13 here, and the decoder learns to ignore it)."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKLWan

    from helios_train.data.miniature_world import render, split_clips
    from helios_train.model.vae_training import _batch, normalise_latent_scale

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    x = _batch([render(c, np.arange(9)) for c in split_clips("train", 3)], np.random.default_rng(1), 3, 5, 64)
    with torch.no_grad():
        before = vae.encode(x).latent_dist.mean.std(dim=(0, 2, 3, 4))
    normalise_latent_scale(vae, x)
    with torch.no_grad():
        after = vae.encode(x).latent_dist.mean
    assert before.max() < 0.5
    torch.testing.assert_close(after.std(dim=(0, 2, 3, 4)), torch.ones(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(after.mean(dim=(0, 2, 3, 4)), torch.zeros(16), atol=1e-4, rtol=0)
