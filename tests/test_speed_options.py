"""GPU speed options are plumbed through config and run on CPU (same numbers as the plain path)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import train
from helios_train.tracking import read_metrics


@pytest.mark.slow
def test_compile_blocks_and_attention_backend_give_the_same_losses(toy_root, tmp_path):
    common = ["trainer.max_steps=3", "validation.every=0", "data.num_workers=0", "trainer.perf.count_flops=false"]
    train(toy_root, tmp_path, common + ["run_name=plain"])
    train(toy_root, tmp_path, common + ["run_name=fast", "model.compile_blocks=true",
                                        "model.attention_backend=native"])
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
