"""DeepSpeed ZeRO-2 / ZeRO-3 on 2 real processes (gloo, CPU): train, checkpoint, resume exactly.

JIT op builds stay out of test time: the backend passes torch AdamW as a client optimizer and skips
the shm comm-op build (see helios_train/backends/deepspeed.py, ENV_NOTES).
"""
from __future__ import annotations

import os
import subprocess
import time

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import REPO
from helios_train.tracking import read_metrics


def torchrun(toy_root, out, *overrides) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "helios_train", f"toy_root={toy_root}",
           f"output_root={out}", "validation.every=0", "data.num_workers=0", "trainer.checkpoint_every=2", *overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return time.time() - t0


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_checkpoints_and_resumes_exactly(toy_root, tmp_path, stage):
    launcher = f"launcher=deepspeed_zero{stage}"
    took = torchrun(toy_root, tmp_path, launcher, "trainer.max_steps=4", "run_name=full")
    assert took < 120, f"{took:.0f}s: a DeepSpeed JIT build probably ran"
    torchrun(toy_root, tmp_path, launcher, "trainer.max_steps=2", "run_name=split")
    torchrun(toy_root, tmp_path, launcher, "trainer.max_steps=4", "run_name=split")
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([m["loss"] for m in a], [m["loss"] for m in b], rtol=0, atol=1e-6)
    assert a[0]["loss"] != a[-1]["loss"]  # it trained
    ckpt = tmp_path / "full/checkpoint-4"
    assert (ckpt / "generator.deepspeed").is_dir() and (ckpt / "COMPLETE").is_file()
    # The plain trainable tensors (for export) are written under ZeRO-3 too, gathered from the shards.
    weights = load_file(str(ckpt / "generator.trainable.safetensors"))
    assert any("lora_B" in k for k in weights) and all(v.numel() > 0 for v in weights.values())
    wb = load_file(str(tmp_path / "split/checkpoint-4/generator.trainable.safetensors"))
    for k in weights:
        np.testing.assert_allclose(weights[k].numpy(), wb[k].numpy(), rtol=0, atol=1e-5, err_msg=k)
