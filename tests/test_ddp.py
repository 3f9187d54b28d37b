"""Real multi-process runs on gloo: DDP equals single-process with the same global batch; 2-node launch."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from conftest import REPO, train
from helios_train.training.tracking import read_metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_video_shard(toy_root: Path, dst: Path) -> Path:
    """A shard holding a single video: every reader, on any rank, sees the same sample."""
    sample = next(iter(wds.WebDataset(str(toy_root / "latents/latent-000000.tar"), shardshuffle=False)))
    with wds.TarWriter(str(dst)) as sink:
        sink.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})
    return dst


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def overrides(toy_root, out, shard, *extra):
    data = [f"data.shards='{shard},{shard}'"] if shard else []
    return [f"toy_root={toy_root}", f"output_root={out}", *data, "data.batch_size=1",
            "data.num_workers=0", "trainer.max_steps=3", "trainer.checkpoint_every=3", "validation.every=0",
            "tracker.mode=offline", *extra]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_same_global_batch(toy_root, tmp_path):
    """Global batch 2 as 2 ranks × 1 sample (DDP all-reduce) vs 1 rank × 2 accumulated micro-batches.

    Equal by construction when the implementation is right:
    - data: the toy shards; global micro-batch g of a step is read by the same reader on both shapes
      (helios_train/data/readers.py: 2 readers, reader g serves micro-batch g whichever rank runs it);
    - randomness: each micro-batch's draws (timestep, noise, degradations, task dropout) come from a
      generator keyed by (seed, step, global micro-batch index = rank × accum + micro) — with
      `trainer.seed_per_rank=true` rank r of 2 draws exactly what micro-batch r of 1 draws;
    - maths: DDP averages the two ranks' gradients, accumulation averages the two micro-batches'
      (loss / accum), then the same clipping and AdamW step.
    Why not 1 process × batch 2: one micro-batch of 2 draws all its random numbers from one generator
    in a different order, so sample 2 would not get rank 1's draws (equal only in distribution).
    What breaks the equality: a wrong reduction (sum instead of mean, missing sync), rank-independent
    draws (`seed_per_rank=false` would give rank 1 the draws of rank 0), or a reader layout that depends
    on the world size.
    Remaining differences are float summation order (all-reduce vs accumulation): ~1e-7 relative.
    """
    train(toy_root, tmp_path, overrides(toy_root, tmp_path, None, "trainer.grad_accum_steps=2", "run_name=single"))
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "helios_train", "launcher=ddp",
           *overrides(toy_root, tmp_path, None, "run_name=ddp")]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = [m["loss"] for m in read_metrics(tmp_path / "single")]
    b = [m["loss"] for m in read_metrics(tmp_path / "ddp")]
    assert len(a) == len(b) == 3
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    ga = [m["grad_norm"] for m in read_metrics(tmp_path / "single")]
    gb = [m["grad_norm"] for m in read_metrics(tmp_path / "ddp")]
    np.testing.assert_allclose(ga, gb, rtol=1e-4)


@pytest.mark.slow
def test_simulated_two_node_launch_through_launch_script(toy_root, tmp_path):
    port = free_port()
    procs = []
    for node in (0, 1):
        e = {**env(), "NNODES": "2", "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "GPUS_PER_NODE": "1", "RDZV_ID": f"t{port}"}
        procs.append(subprocess.Popen(
            ["bash", "launch/multi_node.sh", f"toy_root={toy_root}", f"output_root={tmp_path}", "trainer.max_steps=3",
             "trainer.checkpoint_every=3", "data.num_workers=0", "run_name=twonode",
             # Rank 0 renders for longer than the collective timeout (3 chunks ≈ 5–10 s here) while rank 1
             # waits in the store, not in a collective: the run must not time out (official issue #17).
             "validation.every=3", "validation.at_first_step=false", "trainer.collective_timeout_s=2"],
            cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    hist = read_metrics(tmp_path / "twonode")
    assert [m["step"] for m in hist] == [1, 2, 3]
    assert (tmp_path / "twonode/checkpoint-3/COMPLETE").is_file()
    assert list((tmp_path / "twonode/validation/step-3").glob("*.mp4"))
    # both ranks wrote their data position (world size 2)
    assert {p.name for p in (tmp_path / "twonode/checkpoint-3").glob("data-rank*.json")} == {"data-rank0.json",
                                                                                              "data-rank1.json"}


def test_gradient_buckets_keep_order_respect_the_cap_and_split_dtypes():
    """The bucketed reduce of multi-forward roles (DMD generator): every gradient in exactly one bucket, in
    order within its dtype, no bucket over the cap unless it holds one tensor larger than the cap."""
    import torch

    from helios_train.backends.ddp import gradient_buckets

    grads = [torch.zeros(n, dtype=d) for n, d in [(10, torch.float32), (20, torch.float32), (300, torch.float32),
                                                  (5, torch.bfloat16), (15, torch.float32), (40, torch.bfloat16)]]
    buckets = gradient_buckets(grads, cap_bytes=128)
    assert sorted(id(g) for b in buckets for g in b) == sorted(id(g) for g in grads)
    for b in buckets:
        assert len({g.dtype for g in b}) == 1
        assert sum(g.numel() * g.element_size() for g in b) <= 128 or len(b) == 1
    fp32 = [g for b in buckets for g in b if g.dtype == torch.float32]
    assert [g.numel() for g in fp32] == [10, 20, 300, 15]
    assert len(buckets) == 4  # [10, 20] | [300] | [15] and the two bf16 gradients [5, 40] (90 bytes)
