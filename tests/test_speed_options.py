"""GPU speed options are plumbed through config and run on CPU (same numbers as the plain path)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import compose, train
from helios_train.training.tracking import read_metrics


@pytest.mark.slow
def test_compile_blocks_and_attention_backend_give_the_same_losses(toy_root, tmp_path):
    """Regional compile plus a non-default attention backend (_native_math: torch's SDPA math kernel, the one
    that runs on CPU; on H100 one would pick flash / _native_cudnn / sage) train like the plain path."""
    common = ["trainer.max_steps=3", "validation.every=0", "data.num_workers=0", "trainer.perf.count_flops=false"]
    train(toy_root, tmp_path, common + ["run_name=plain"])
    train(toy_root, tmp_path, common + ["run_name=fast", "model.compile_blocks=true",
                                        "model.attention_backend=_native_math"])
    a = [m["loss"] for m in read_metrics(tmp_path / "plain")]
    b = [m["loss"] for m in read_metrics(tmp_path / "fast")]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_same_losses(toy_root, tmp_path):
    common = ["trainer.max_steps=3", "validation.every=0", "data.num_workers=0"]
    train(toy_root, tmp_path, common + ["run_name=nockpt"])
    train(toy_root, tmp_path, common + ["run_name=ckpt", "model.gradient_checkpointing=true"])
    a = [m["loss"] for m in read_metrics(tmp_path / "nockpt")]
    b = [m["loss"] for m in read_metrics(tmp_path / "ckpt")]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_attention_backend_fails_naming_it(toy_root, tmp_path):
    with pytest.raises(Exception, match="no_such_backend"):
        train(toy_root, tmp_path, ["trainer.max_steps=1", "validation.every=0", "run_name=bad",
                                   "model.attention_backend=no_such_backend"])
    assert not (tmp_path / "bad").exists()  # the failed start-up leaves no run folder behind


def test_attention_backend_reaches_every_attention_processor(toy_root):
    from diffusers import HeliosTransformer3DModel

    from helios_train.model.loading import apply_speed_options

    model = HeliosTransformer3DModel.from_pretrained(toy_root / "model", subfolder="transformer")
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    assert processors and all(p._attention_backend is None for p in processors)
    apply_speed_options(model, compose([f"toy_root={toy_root}", "model.attention_backend=_native_math"]).model)
    assert all(str(p._attention_backend) in ("_native_math", "AttentionBackendName._NATIVE_MATH") for p in processors)
