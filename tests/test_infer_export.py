"""Inference entry (T2V / I2V / V2V → mp4), export to diffusers layout, in-loop validation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import train

TINY = ["--height", "64", "--width", "128", "--steps", "2", "--guidance", "5.0"]


@pytest.fixture(scope="module")
def base_run(toy_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    train(toy_root, out, ["trainer.max_steps=4", "trainer.checkpoint_every=4", "validation.every=0",
                          "data.num_workers=0", "run_name=b"])
    return out / "b"


def decoded(path: Path) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def test_t2v_i2v_v2v_write_mp4s_with_expected_frames(base_run, tmp_path, capsys):
    from PIL import Image

    from helios_train.sampling.infer import main

    t2v = main(["--checkpoint", str(base_run), "--prompt", "a red circle", "--num-frames", "40",
                "--out", str(tmp_path / "t2v"), *TINY])[0]
    # The chunk bar counts each chunk's VAE decode (the pipeline's own bars stop before it).
    err = capsys.readouterr().err
    assert "chunks generated: 100%" in err and "2/2" in err and "VAE decode" in err
    frames = decoded(t2v)
    assert frames.shape == (65, 64, 128, 3)  # 40 → 2 chunks (66 frames) → 4n+1 trim = 65
    meta = json.loads(t2v.with_suffix(".json").read_text())
    assert meta["task"] == "t2v" and meta["frames"] == 65 and meta["variant"] == "base" and meta["fps"] == 24
    Image.fromarray(frames[10]).save(tmp_path / "first.png")
    i2v = main(["--checkpoint", str(base_run), "--prompt", "a red circle", "--num-frames", "33",
                "--image", str(tmp_path / "first.png"), "--out", str(tmp_path / "i2v"), *TINY])[0]
    assert decoded(i2v).shape == (33, 64, 128, 3)
    assert json.loads(i2v.with_suffix(".json").read_text())["task"] == "i2v"
    v2v = main(["--checkpoint", str(base_run), "--prompt", "a red circle", "--num-frames", "33",
                "--video", str(t2v), "--out", str(tmp_path / "v2v"), *TINY])[0]
    assert decoded(v2v).shape == (33, 64, 128, 3)
    assert json.loads(v2v.with_suffix(".json").read_text())["task"] == "v2v"


def test_export_loads_in_diffusers_and_matches_infer_entry(base_run, tmp_path):
    from diffusers import HeliosPipeline

    from helios_train.sampling.export import export
    from helios_train.sampling.infer import generate, load_pipeline
    from helios_train.model.variants import DEFAULTS, SamplerSettings

    out = export(base_run, tmp_path / "exported")
    manifest = json.loads((out / "helios_export.json").read_text())
    assert manifest["variant"] == "base" and manifest["step"] == 4 and len(manifest["config_hash"]) == 16
    pipe = HeliosPipeline.from_pretrained(out)  # diffusers' own loader, unchanged layout
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())
    s = SamplerSettings(**{**DEFAULTS["base"].__dict__, "num_inference_steps": 2})
    ours, variant = load_pipeline(base_run)  # training checkpoint, LoRA attached, not fused
    a = generate(pipe, "base", "a red circle", s, 33, 64, 128, seed=3)
    b = generate(ours, variant, "a red circle", s, 33, 64, 128, seed=3)
    assert a.shape == b.shape == (33, 64, 128, 3)
    np.testing.assert_allclose(a, b, atol=2e-3)
    # The export carries the trained weights: the fully trained memory patch equals the checkpoint's,
    # and a LoRA-adapted linear differs from the untrained toy base by the fused B·A update.
    from diffusers import HeliosTransformer3DModel
    from safetensors.torch import load_file

    trained = load_file(str(base_run / "checkpoint-4/generator.trainable.safetensors"))
    torch.testing.assert_close(pipe.transformer.patch_mid.weight, trained["patch_mid.weight"])
    toy_base = HeliosTransformer3DModel.from_pretrained(_model_path(base_run), subfolder="transformer")
    delta = (pipe.transformer.blocks[0].attn1.to_q.weight - toy_base.blocks[0].attn1.to_q.weight).abs().max()
    assert delta > 0


def _model_path(run: Path) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.load(run / "config.yaml").model.path


def test_validation_logs_videos_and_drift_to_offline_wandb(toy_root, tmp_path, capsys):
    train(toy_root, tmp_path, ["trainer.max_steps=2", "validation.every=2", "data.num_workers=0", "run_name=val"])
    assert "validation step 2: 100%" in capsys.readouterr().err  # 1 prompt × 3 chunks, one bar step per chunk
    run = tmp_path / "val"
    records = [json.loads(x) for x in (run / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]
    for r in records:
        assert len(r["videos"]) == 1 and Path(r["videos"][0]).is_file()
        assert set(r["drift"]) == {"brightness", "saturation", "motion"}
        assert len(r["drift"]["brightness"]) == 3 and r["drift"]["brightness"][0] == 1.0
    assert decoded(Path(records[0]["videos"][0])).shape == (97, 64, 128, 3)
    wandb_files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert wandb_files
    blob = wandb_files[0].read_bytes()
    assert b"validation/video_0" in blob and b"validation/drift" in blob
    media = list((run / "wandb").glob("offline-run-*/files/media/videos/**/*.mp4"))
    assert media, "validation video not stored in the W&B run"


def test_mid_renders_64x64_with_cfg_zero_star(toy_root, tmp_path):
    """At 64×64 the lowest pyramid level has one 2×2 patch, where HeliosTransformer3DModel's unpatchify returns a
    non-contiguous view and diffusers' CFG-Zero* (`noise_pred_text.view(batch_size, -1)`) raised; every pipeline we
    build makes the output contiguous (model/variants.py: contiguous_transformer_output). Covers in-loop
    validation (build_pipeline on the live model), infer on a training checkpoint (build_pipeline) and on an
    export (load_pipeline's from_pretrained path, also pipeline-check's)."""
    from helios_train.model.variants import DEFAULTS, SamplerSettings
    from helios_train.sampling.export import export
    from helios_train.sampling.infer import generate, load_pipeline, main

    tiny = ["validation.height=64", "validation.width=64", "validation.num_frames=33", "validation.pyramid_steps=[1,1,1]"]
    train(toy_root, tmp_path, ["stage=mid", "trainer.max_steps=2", "trainer.checkpoint_every=2", "validation.every=2",
                               "data.num_workers=0", "run_name=mid", *tiny])
    records = [json.loads(x) for x in (tmp_path / "mid" / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]
    assert decoded(Path(records[-1]["videos"][0])).shape == (33, 64, 64, 3)
    video = main(["--checkpoint", str(tmp_path / "mid"), "--prompt", "a red circle", "--height", "64", "--width", "64",
                  "--pyramid-steps", "1", "1", "1", "--num-frames", "33", "--cfg-zero-star", "--guidance", "5.0",
                  "--out", str(tmp_path / "out")])[0]
    assert decoded(video).shape == (33, 64, 64, 3)
    pipe, variant = load_pipeline(export(tmp_path / "mid", tmp_path / "export"))
    assert variant == "mid" and pipe.config.is_cfg_zero_star
    s = SamplerSettings(**{**DEFAULTS["mid"].__dict__, "pyramid_steps": [1, 1, 1]})
    frames = generate(pipe, variant, "a red circle", s, 33, 64, 64, seed=0)
    assert frames.shape == (33, 64, 64, 3) and np.isfinite(frames).all()


def test_bad_inputs_fail_naming_the_file_before_any_model_loads(tmp_path, capsys):
    """An empty prompt file, a file that is not an image, a video that does not decode: each stops the command
    with the file's path — with a checkpoint path that does not exist, so any model load would fail first."""
    from helios_train.data.encode_text import encode_text
    from helios_train.sampling.ode_pair_capture import make_ode_pairs
    from helios_train.sampling.infer import main
    from helios_train.runtime.prompt_file import InputError

    nowhere = str(tmp_path / "no_checkpoint")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    not_image, not_video = tmp_path / "photo.png", tmp_path / "clip.mp4"
    not_image.write_text("not a png")
    not_video.write_bytes(b"\x00" * 64)
    for args, named in ((["--prompt-file", str(empty)], "empty.txt: no prompt"),
                        (["--prompt", "x", "--image", str(not_image)], "photo.png: not a readable image"),
                        (["--prompt", "x", "--video", str(not_video)], "clip.mp4: not a decodable video"),
                        (["--prompt", "x", "--video", str(tmp_path / "gone.mp4")], "gone.mp4: no such file")):
        with pytest.raises(SystemExit) as exit_:
            main(["--checkpoint", nowhere, *args])
        assert exit_.value.code == 2 and named in capsys.readouterr().err, args
    for make in (lambda: encode_text(empty, tmp_path / "text", nowhere),
                 lambda: make_ode_pairs(nowhere, empty, tmp_path / "ode")):
        with pytest.raises(InputError, match="empty.txt: no prompt"):
            make()
    assert not (tmp_path / "text").exists() and not (tmp_path / "ode").exists()  # nothing written


def test_inputs_of_another_size_are_resized_with_a_warning(tmp_path, caplog):
    """--image / --video are resized to the output size: said in a warning naming both sizes (it was silent:
    640x384 became 128x64 without a word); an input already at the output size says nothing."""
    import logging

    import numpy as np
    from PIL import Image

    from helios_train.data.video_io import encode_mp4
    from helios_train.sampling.infer import read_image, read_video_frames

    Image.new("RGB", (96, 64), (200, 10, 10)).save(tmp_path / "wide.png")
    (tmp_path / "square.mp4").write_bytes(encode_mp4(np.zeros((5, 64, 64, 3), np.uint8), 24))
    with caplog.at_level(logging.WARNING, logger="helios_train.sampling.infer"):
        assert read_image(str(tmp_path / "wide.png"), 128, 64).size == (128, 64)
        read_video_frames(str(tmp_path / "square.mp4"), 128, 64)
        said = [r.getMessage() for r in caplog.records]
        assert any(f"--image {tmp_path / 'wide.png'} is 96x64: resized to 128x64" in m and "aspect ratio changes" in m
                   for m in said), said
        assert any(f"--video {tmp_path / 'square.mp4'} is 64x64: resized to 128x64" in m for m in said), said
        caplog.clear()
        read_image(str(tmp_path / "wide.png"), 96, 64)
        assert not caplog.records
