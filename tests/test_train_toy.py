"""End-to-end toy Base training in-process: loss falls, checkpoints + offline W&B, exact resume, bad samples."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from safetensors.torch import load_file

from conftest import train
from helios_train.training.tracking import read_metrics

FAST = ["trainer.log_every=1", "data.num_workers=0"]


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir)]


def test_loss_decreases_and_run_is_recorded(toy_root, tmp_path):
    result = train(toy_root, tmp_path, FAST + ["trainer.max_steps=40", "trainer.checkpoint_every=20", "run_name=fall"])
    run_dir = tmp_path / "fall"
    hist = losses(run_dir)
    assert result["step"] == 40 and len(hist) == 40
    first, last = np.mean(hist[:8]), np.mean(hist[-8:])
    assert last < 0.9 * first, f"loss did not fall: first-8 mean {first:.4f}, last-8 mean {last:.4f}"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-40"]
    ckpt = run_dir / "checkpoint-40"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "generator.trainable.safetensors").is_file()
    names = load_file(str(ckpt / "generator.trainable.safetensors")).keys()
    assert any("lora_A" in n for n in names) and any(n.startswith("patch_mid") for n in names)
    assert (run_dir / "config.yaml").is_file()
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline, "no offline W&B run file written"


@pytest.mark.parametrize("data", ["toy", "toy_raw"])
def test_resume_reproduces_uninterrupted_run(toy_root, tmp_path, data):
    common = FAST + ["trainer.checkpoint_every=3", "data.shuffle_buffer=4", f"data={data}"]
    train(toy_root, tmp_path, common + ["trainer.max_steps=6", "run_name=straight"])
    train(toy_root, tmp_path, common + ["trainer.max_steps=3", "run_name=split"])
    result = train(toy_root, tmp_path, common + ["trainer.max_steps=6", "run_name=split", "resume=latest"])
    assert result["step"] == 6
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    wa = load_file(str(tmp_path / "straight/checkpoint-6/generator.trainable.safetensors"))
    wb = load_file(str(tmp_path / "split/checkpoint-6/generator.trainable.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k].numpy(), wb[k].numpy(), rtol=0, atol=1e-6, err_msg=k)


def test_resume_refuses_changed_model_config(toy_root, tmp_path, capsys):
    train(toy_root, tmp_path, FAST + ["trainer.max_steps=1", "run_name=compat"])
    with pytest.raises(ValueError, match=r"stage.trainables.lora.rank: 8 -> 4"):
        train(toy_root, tmp_path, FAST + ["trainer.max_steps=2", "run_name=compat", "stage.trainables.lora.rank=4"])
    # what decides the next samples and their random draws: the saved data positions would point elsewhere
    for change, shown in (("trainer.seed=7", "trainer.seed: 43 -> 7"),
                          ("data.batch_size=1", r"global batch of 2 \(1 rank\(s\) x 1 micro-batch\(es\) of 2 \(single\)\), "
                                                r"this run has 1"),
                          ("trainer.grad_accum_steps=2", r"this run has 4 .*trainer.grad_accum_steps=1.*allow_batch_change")):
        with pytest.raises(ValueError, match=shown):
            train(toy_root, tmp_path, FAST + ["trainer.max_steps=2", "run_name=compat", change])
    # another worker count is a new shape of the same run: the one reader is re-split over two
    capsys.readouterr()
    assert train(toy_root, tmp_path, FAST + ["trainer.max_steps=2", "run_name=compat", "data.num_workers=2"])["step"] == 2
    assert "re-split from 1 to 2 reader(s)" in capsys.readouterr().out
    assert train(toy_root, tmp_path, FAST + ["trainer.max_steps=3", "run_name=compat"])["step"] == 3  # max_steps may grow


def _bad_shard(src: Path, dst: Path, corrupt) -> None:
    """Copy a shard and add one broken sample made by `corrupt(sample) -> sample`."""
    samples = list(wds.WebDataset(str(src), shardshuffle=False))
    with wds.TarWriter(str(dst)) as sink:
        sink.write(corrupt(dict(samples[0])))
        for s in samples:
            sink.write({k: v for k, v in s.items() if k != "__url__" and not k.startswith("__local")})


def test_corrupt_mp4_and_bad_latent_are_skipped_and_counted(toy_root, tmp_path):
    def broken_mp4(s):
        s["__key__"] = "broken_mp4"
        s["mp4"] = s["mp4"][: len(s["mp4"]) // 3] + b"\x00" * 64  # truncated stream
        return s

    def wrong_latent(s):
        s["__key__"] = "wrong_latent"
        buf = io.BytesIO()
        np.save(buf, np.zeros((3, 4, 9, 8, 12), np.float32), allow_pickle=False)  # width 12 ≠ 16
        s["latents.npy"] = buf.getvalue()
        return s

    _bad_shard(toy_root / "raw/raw-000000.tar", tmp_path / "raw-bad.tar", broken_mp4)
    _bad_shard(toy_root / "latents/latent-000000.tar", tmp_path / "latent-bad.tar", wrong_latent)
    from helios_train.__main__ import done_line

    result = train(toy_root, tmp_path, FAST + ["data=toy_raw", f"data.shards={tmp_path}/raw-bad.tar",
                                               "trainer.max_steps=3", "run_name=raw_bad"])
    train(toy_root, tmp_path, FAST + [f"data.shards={tmp_path}/latent-bad.tar", "trainer.max_steps=3",
                                      "run_name=lat_bad"])
    raw_last = read_metrics(tmp_path / "raw_bad")[-1]
    lat_last = read_metrics(tmp_path / "lat_bad")[-1]
    assert raw_last.get("data/skipped_decode_error", 0) >= 1, raw_last
    assert lat_last.get("data/skipped_bad_latent_shape", 0) >= 1, lat_last
    assert np.isfinite(raw_last["loss"]) and np.isfinite(lat_last["loss"])  # training went on, finite
    assert raw_last["step"] == lat_last["step"] == 3
    # The final line names what was skipped, by reason, next to how much was read.
    assert f"'samples_read': {int(raw_last['data/samples_read'])}, 'skipped': {{'decode_error': 1}}" in done_line(result)


def test_correct_recipe_trains_and_logs_degradation_fractions(toy_root, tmp_path):
    """experiment=stage_1_correct (issue-#38 corrections) on the toy: loss falls, W&B/metrics carry
    the fractions of noise / blur / saturation / task drops over each log window."""
    train(toy_root, tmp_path, ["experiment=stage_1_correct", "model=toy", "trainer.optim.lr=1e-3",
                               "stage.trainables.lora.rank=8", "trainer.max_steps=40", "trainer.log_every=5",
                               "trainer.checkpoint_every=40", "data.num_workers=0", "run_name=correct"])
    hist = read_metrics(tmp_path / "correct")
    assert [m["step"] for m in hist] == [5, 10, 15, 20, 25, 30, 35, 40]
    for key in ("degrade/noise", "degrade/blur", "degrade/clean", "degrade/saturation", "task/t2v", "task/i2v"):
        assert all(0.0 <= m[key] <= 1.0 for m in hist), key
    mean = {k: np.mean([m[k] for m in hist]) for k in ("degrade/noise", "degrade/blur", "degrade/saturation")}
    assert mean["degrade/noise"] > mean["degrade/blur"]  # random mode: noise 90 %, blur 10 % (of non-clean)
    assert mean["degrade/saturation"] > 0.3  # saturation really runs in stage 1 (official: a no-op)
    assert any(0 < m["degrade/noise"] < 1 for m in hist)  # window fractions, not a single step's 0/1
    cfg = (tmp_path / "correct/config.yaml").read_text()
    assert "i2v_ratio: 0.1" in cfg and "mode: random" in cfg and "saturation: true" in cfg
    assert hist[-1]["loss"] < hist[0]["loss"]
