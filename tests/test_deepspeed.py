"""DeepSpeed backend: config generation, non-finite skipping, precision, and ZeRO-2 / ZeRO-3 on 2 real
processes (gloo, CPU): train, checkpoint, resume exactly, and match DDP step for step.

JIT op builds stay out of test time: the backend passes torch AdamW as a client optimizer (also under
CPU offload) and skips the shm comm-op build (helios_train/backends/deepspeed.py); the
in-process tests assert a backend start-up of seconds, the 2-process ones a bound on the run.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_pooled
from helios_train.backends.deepspeed import ds_config
from helios_train.training.tracking import read_metrics


def launcher(stage=2, **kw):
    base = dict(name="deepspeed", backend="auto", zero_stage=stage, offload_optimizer=False, offload_param=False,
                deepspeed_config=None)
    return NS(**{**base, **kw})


TRAINER = NS(device="cpu", mixed_precision="no", grad_accum_steps=2)
DATA = NS(batch_size=3)


def test_config_is_generated_from_ours_and_user_json_merges_on_top(tmp_path):
    cfg = ds_config(launcher(2), TRAINER, DATA, world_size=4, max_grad_norm=10.0)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == \
        (3, 2, 24)
    assert cfg["gradient_clipping"] == 10.0  # the role's value, not zero2.json's hard-coded 1.0
    assert cfg["zero_optimization"]["stage"] == 2 and "optimizer" not in cfg
    # bf16 is our autocast; DeepSpeed's bf16 mode would cast LoRA weights and fp32-kept modules to bf16
    assert not ds_config(launcher(3), NS(**{**vars(TRAINER), "mixed_precision": "bf16"}), DATA, 1, 1.0)["bf16"]["enabled"]
    off = ds_config(launcher(3, offload_optimizer=True, offload_param=True), TRAINER, DATA, 1, 1.0)
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert off["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert off["zero_force_ds_cpu_optimizer"] is False  # client torch AdamW allowed: no CPUAdam JIT build
    with pytest.raises(ValueError, match="offload_param"):
        ds_config(launcher(2, offload_param=True), TRAINER, DATA, 1, 1.0)

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1e7}, "bf16": {"enabled": True},
                                "train_batch_size": "auto"}))
    merged = ds_config(launcher(2, deepspeed_config=str(user)), TRAINER, DATA, 4, 1.0)
    assert merged["zero_optimization"] == {**cfg["zero_optimization"], "reduce_bucket_size": 1e7}
    assert merged["bf16"]["enabled"] and merged["train_batch_size"] == 24
    user.write_text(json.dumps({"gradient_accumulation_steps": 8}))
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        ds_config(launcher(2, deepspeed_config=str(user)), TRAINER, DATA, 4, 1.0)


@pytest.fixture
def one_process(monkeypatch):
    """World size 1 in this process; the env is restored afterwards."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(k, v)


@pytest.mark.parametrize("stage,offload", [(2, False), (3, False), (3, True)])
def test_nonfinite_gradients_skip_the_update_and_keep_dtypes(one_process, stage, offload):
    """inf gradient with a finite loss, then a NaN loss: both steps are skipped (weights, LR schedule
    untouched), training continues; frozen bf16 weights stay bf16 and trainables fp32 (no DeepSpeed bf16
    cast), also with ZeRO-3 and CPU offload."""
    from helios_train.backends.deepspeed import DeepSpeedBackend

    torch_linear = torch.nn.functional.linear
    t0 = time.time()
    b = DeepSpeedBackend(launcher(stage, offload_optimizer=offload, offload_param=offload),
                         NS(device="cpu", mixed_precision="bf16", grad_accum_steps=1, collective_timeout_s=60.0),
                         NS(batch_size=1))
    try:
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        m[0].to(torch.bfloat16).requires_grad_(False)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        role = b.prepare("g", m, opt, sched, max_grad_norm=1.0)
        assert time.time() - t0 < 20, "a DeepSpeed JIT build probably ran"
        x = torch.randn(4, 8, dtype=torch.bfloat16)

        def weights():
            return {k: v.clone() for k, v in b._trainable_state(role).items()}

        def step(kind=None):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = role.model(x).float().pow(2).mean()
            w = role.params[0]
            if kind == "inf_grad":
                loss = loss + torch.sqrt((w - w.detach()).abs()).sum()  # value 0, gradient inf
            if kind == "nan_loss":
                loss = loss * float("nan")
            b.backward(role, loss)
            return b.grad_norm_and_step(role)

        norm, stepped = step()
        assert stepped and np.isfinite(norm) and b.current_lr(role) == pytest.approx(5e-3)
        before = weights()
        for kind in ("inf_grad", "nan_loss"):
            norm, stepped = step(kind)
            assert not stepped and not np.isfinite(norm), kind
        after = weights()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert b.current_lr(role) == pytest.approx(5e-3)  # the scheduler did not step on skipped updates
        norm, stepped = step()
        assert stepped and b.current_lr(role) == pytest.approx(1e-2 / 3)
        assert not all(torch.equal(after[k], v) for k, v in weights().items())
        with b.full_parameters(role):
            dtypes = {n: p.dtype for n, p in m.named_parameters()}
        assert dtypes == {"0.weight": torch.bfloat16, "0.bias": torch.bfloat16,
                          "1.weight": torch.float32, "1.bias": torch.float32}
    finally:
        b.shutdown()
    # ZeRO-3 swaps F.linear process-wide for its own autograd function; shutdown puts torch's back (a later
    # run in this process — e.g. a dry run measuring memory — would otherwise allocate differently)
    assert torch.nn.functional.linear is torch_linear


def torchrun(toy_root, out, *overrides) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "helios_train", f"toy_root={toy_root}",
           f"output_root={out}", "validation.every=0", "data.num_workers=0", "trainer.checkpoint_every=2", *overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return time.time() - t0


def pooled(toy_root, out, configs: list[list[str]]) -> float:
    """The configs (with this file's common keys) in one torchrun launch; returns the launch's seconds."""
    full = [[f"toy_root={toy_root}", f"output_root={out}", "validation.every=0", "data.num_workers=0",
             "trainer.checkpoint_every=2", "tracker.mode=offline", *c] for c in configs]
    return run_pooled(full, out, timeout=600)[1]


@pytest.mark.slow
@pytest.mark.parametrize("stage,accum", [(2, 1), (3, 2)])
def test_zero_trains_checkpoints_resumes_exactly_and_matches_ddp(toy_root, tmp_path, stage, accum):
    """Same data, seeds and fp32 maths as DDP: the loss history equals a DDP run's; a run stopped at
    step 2 and resumed equals the uninterrupted one. Step 2 (index 1) has a NaN loss on every rank
    (fault drill): DeepSpeed skips that update, as DDP does."""
    common = [f"trainer.grad_accum_steps={accum}", "trainer.max_steps=4", "trainer.debug.nonfinite_loss_steps=[1]"]
    ds = f"launcher=deepspeed_zero{stage}"
    # The uninterrupted, the stopped and the DDP run in one torchrun (tests/matrix_worker.py); the resume in
    # a process of its own, as after a real stop.
    took = pooled(toy_root, tmp_path, [[ds, *common, "run_name=full"],
                                       [ds, f"trainer.grad_accum_steps={accum}", "trainer.max_steps=2",
                                        "trainer.debug.nonfinite_loss_steps=[1]", "run_name=split"],
                                       ["launcher=ddp", *common, "run_name=ddp"]])
    assert took < 120, f"{took:.0f}s: a DeepSpeed JIT build probably ran"
    torchrun(toy_root, tmp_path, ds, *common, "run_name=split")
    a, b, d = (read_metrics(tmp_path / r) for r in ("full", "split", "ddp"))
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    losses = [m["loss"] for m in a]
    np.testing.assert_allclose(losses, [m["loss"] for m in b], rtol=0, atol=1e-6)
    assert np.isnan(losses[1]) and a[-1]["nonfinite_skipped_total"] == 1
    # DeepSpeed ≡ DDP (fp32): gradient averaging, clipping and AdamW are the same maths
    np.testing.assert_allclose(losses, [m["loss"] for m in d], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([m["grad_norm"] for m in a if np.isfinite(m["grad_norm"])],
                               [m["grad_norm"] for m in d if np.isfinite(m["grad_norm"])], rtol=1e-4)
    assert losses[0] != losses[-1]  # it trained
    ckpt = tmp_path / "full/checkpoint-4"
    assert (ckpt / "generator.deepspeed").is_dir() and (ckpt / "COMPLETE").is_file()
    # The plain fp32 trainable tensors (for export) are written under ZeRO-3 too, gathered from the
    # shards, and equal DDP's.
    weights = load_file(str(ckpt / "generator.trainable.safetensors"))
    assert any("lora_B" in k for k in weights) and all(v.numel() > 0 for v in weights.values())
    assert all(v.dtype == torch.float32 for v in weights.values())
    for other in ("split", "ddp"):
        wb = load_file(str(tmp_path / f"{other}/checkpoint-4/generator.trainable.safetensors"))
        assert set(wb) == set(weights)
        for k in weights:
            np.testing.assert_allclose(weights[k].numpy(), wb[k].numpy(), rtol=0, atol=1e-5, err_msg=f"{other}: {k}")


@pytest.mark.slow
def test_zero3_validation_renders_in_lockstep_and_matches_one_process(toy_root, tmp_path):
    """Under ZeRO-3 every forward gathers the sharded weights collectively, so rank 0 cannot render alone
    (the run hung at step 0's validation before). All ranks sample, rank 0 writes: the step-0 video
    (weights = init) equals a one-process run's frame for frame."""
    import decord

    from conftest import train

    val = ["validation.every=1", "validation.num_frames=33", "validation.height=64", "validation.width=128",
           "validation.steps=2", "trainer.max_steps=1", "data.num_workers=0"]
    torchrun(toy_root, tmp_path, "launcher=deepspeed_zero3", *val, "run_name=z3")
    # The ranks run one thread each (torchrun above); the one-process run too, so both sum in the same order: with
    # two threads, this machine's CPU kernels reduce differently (measured: 0.56 % of pixels off by up to 15).
    threads = torch.get_num_threads()
    try:
        train(toy_root, tmp_path, [*val, "run_name=one", "trainer.num_threads=1"])
    finally:
        torch.set_num_threads(threads)  # the rest of the session keeps its own
    videos = {}
    for run in ("z3", "one"):
        files = sorted((tmp_path / run / "validation" / "step-0").glob("*.mp4"))
        assert len(files) == 1, files
        videos[run] = decord.VideoReader(str(files[0]))[:].asnumpy()
        assert (tmp_path / run / "validation" / "step-1" / "drift.json").is_file()
    assert videos["z3"].shape == (33, 64, 128, 3)
    np.testing.assert_array_equal(videos["z3"], videos["one"])
