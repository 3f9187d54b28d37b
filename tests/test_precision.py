"""Precision: `model.weight_dtype` and `trainer.mixed_precision` agree or stop before any work; bf16 runs
train (bf16 frozen base, fp32 trainables), validate, export, sample and record ODE pairs in the dtype asked."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import compose, train
from helios_train.runtime.precision import PrecisionError, check_precision, mixed_precision


def test_auto_follows_the_weight_dtype_and_14b_needs_no_override():
    assert mixed_precision(compose(["model=helios_14b", "model.path=/nonexistent"])) == "bf16"
    assert mixed_precision(compose([])) == "no"  # the fp32 toy
    assert mixed_precision(compose(["trainer.mixed_precision=bf16"])) == "bf16"  # fp32 weights + bf16 autocast: allowed


@pytest.mark.parametrize("overrides,names", [
    (["model.weight_dtype=bf16", "trainer.mixed_precision=no"], ["model.weight_dtype=bf16", "trainer.mixed_precision=no"]),
    (["model.weight_dtype=fp16"], ["model.weight_dtype=fp16", "loss scaling"]),
    (["trainer.mixed_precision=fp16"], ["trainer.mixed_precision=fp16"]),
    (["model.weight_dtype=int8"], ["model.weight_dtype='int8'"]),
])
def test_impossible_combinations_name_both_keys_and_the_fix(overrides, names):
    from helios_train.config import ConfigError

    # A dtype outside the schema's choices fails when the config is composed (helios_train/config/choices.py);
    # a choice that cannot run here, at start-up (check_precision).
    with pytest.raises((PrecisionError, ConfigError)) as err:
        check_precision(compose(overrides), torch.device("cpu"))
    assert isinstance(err.value, ConfigError if "int8" in overrides[0] else PrecisionError)
    for name in names:
        assert name in str(err.value)


def test_deepspeed_fp16_json_is_refused(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"fp16": {"enabled": True}}))
    with pytest.raises(PrecisionError, match="fp16.enabled"):
        check_precision(compose(["launcher=deepspeed_zero2", f"launcher.deepspeed_config={user}"]), None)


def test_a_device_without_bf16_is_refused_before_any_work(monkeypatch, toy_root, tmp_path):
    """The CPU probe passes on this machine; a device whose probe fails stops the run with both keys named."""
    import helios_train.runtime.precision as precision

    assert precision.bf16_problem(torch.device("cpu")) is None
    monkeypatch.setattr(precision, "bf16_problem", lambda device: "no bf16 kernels on this test device")
    with pytest.raises(PrecisionError, match=r"model.weight_dtype=bf16 with trainer.mixed_precision=auto needs bf16.*"
                                             r"no bf16 kernels"):
        train(toy_root, tmp_path, ["model.weight_dtype=bf16", "run_name=nobf16"])
    assert not (tmp_path / "nobf16").exists()  # nothing written


def test_bf16_weights_with_autocast_off_stop_before_any_work(toy_root, tmp_path):
    with pytest.raises(PrecisionError, match="trainer.mixed_precision=no"):
        train(toy_root, tmp_path, ["model.weight_dtype=bf16", "trainer.mixed_precision=no", "run_name=off"])
    assert not (tmp_path / "off").exists()


@pytest.fixture(scope="module")
def bf16_run(toy_root, tmp_path_factory) -> Path:
    """The toy Base stage with bf16 frozen weights (autocast from `auto`), validated at steps 0 and 2."""
    out = tmp_path_factory.mktemp("bf16")
    train(toy_root, out, ["model.weight_dtype=bf16", "trainer.max_steps=2", "trainer.checkpoint_every=2",
                          "validation.every=2", "validation.steps=2", "run_name=bf16"])
    return out / "bf16"


def test_bf16_run_trains_validates_and_keeps_trainables_fp32(bf16_run, toy_root):
    from helios_train.training.tracking import read_metrics

    metrics = read_metrics(bf16_run)
    assert len(metrics) == 2 and all(m["loss"] == m["loss"] and m["grad_norm"] > 0 for m in metrics)
    assert "mixed_precision: bf16" in (bf16_run / "config.yaml").read_text()  # `auto` resolved, recorded
    assert sorted(p.name for p in (bf16_run / "validation").iterdir()) == ["step-0", "step-2"]
    saved = bf16_run / "checkpoint-2" / "generator.trainable.safetensors"
    with safe_open(str(saved), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        lora_b = next(f.get_tensor(k) for k in f.keys() if "lora_B" in k)
    assert dtypes == {torch.float32}
    assert lora_b.abs().max() > 0  # B starts at 0: the bf16 steps changed it


def test_bf16_checkpoint_and_export_sample_in_bf16_with_an_fp32_vae(bf16_run, tmp_path):
    from helios_train.sampling.export import export
    from helios_train.sampling.infer import generate, load_pipeline
    from helios_train.model.loading import keeps_fp32
    from helios_train.model.variants import DEFAULTS

    exported = export(bf16_run, tmp_path / "export")  # default dtype: the run's model.weight_dtype
    assert json.loads((exported / "helios_export.json").read_text())["dtype"] == "bf16"
    for source in (bf16_run, exported):
        pipe, variant = load_pipeline(source, dtype=torch.bfloat16)
        t = pipe.transformer
        cast = {p.dtype for n, p in t.named_parameters() if not keeps_fp32(t, n)}
        kept = {p.dtype for n, p in t.named_parameters() if keeps_fp32(t, n)}
        assert cast == {torch.bfloat16} and kept == {torch.float32}, source
        assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}
        settings = DEFAULTS[variant]
        settings.num_inference_steps = 2
        frames = generate(pipe, variant, "a red circle", settings, 33, 64, 128, 0, "")
        assert frames.shape == (33, 64, 128, 3) and frames.std() > 0


def test_ode_pairs_record_in_bf16(bf16_run, tmp_path):
    from helios_train.sampling.ode_pair_capture import make_ode_pairs

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves\n")
    summary = make_ode_pairs(bf16_run, prompts, tmp_path / "ode", num_chunks=1, height=64, width=128,
                             steps=(2, 2, 2), per_shard=1, dtype="bf16")
    assert summary["samples"] == 1
    import webdataset as wds

    sample = next(iter(wds.WebDataset(str(tmp_path / "ode" / "ode-000-000000.tar"), shardshuffle=False)))
    assert json.loads(sample["json"])["dtype"] == "bf16"
    from helios_train.sampling.ode_pair_capture import load_teacher

    teacher = load_teacher(str(bf16_run), "cpu", torch.bfloat16)
    assert teacher.transformer.dtype == torch.bfloat16 and teacher.vae.dtype == torch.float32
