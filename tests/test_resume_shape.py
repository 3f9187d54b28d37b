"""Resume on another cluster shape (helios_train/backends/run_shape.py, helios_train/data/readers.py).

Data-level tests read the real toy shards through the real loader (DataLoader workers included);
the run-level tests train on real torchrun / DeepSpeed processes on gloo.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from safetensors.torch import load_file

from conftest import REPO, compose, run_pooled, train
from helios_train.data.readers import ReaderLayout, choose_layout
from helios_train.data.video_dataset import DataPosition, build_loader, resume_position
from helios_train.algorithms.history import HistoryConfig
from helios_train.training.tracking import read_metrics


def _shards(toy_root: Path) -> list[str]:
    return [str(p) for p in sorted((toy_root / "latents").glob("latent-*.tar"))]


def _data_cfg(toy_root: Path, workers: int = 0):
    return compose([f"toy_root={toy_root}", "data.batch_size=1", f"data.num_workers={workers}",
                    "data.shuffle_buffer=3"]).data


def _micro_batches(toy_root, layout: ReaderLayout, workers: int, steps: int) -> dict[tuple[int, int], list[str]]:
    """(step, global micro-batch) → keys, read by every rank's loader of `layout`."""
    out = {}
    cfg = _data_cfg(toy_root, workers)
    for rank in range(layout.world_size):
        it = iter(build_loader(_shards(toy_root), cfg, HistoryConfig(), rank, DataPosition(layout)))
        for i in range(steps * layout.grad_accum):
            step, micro = divmod(i, layout.grad_accum)
            out[(step, rank * layout.grad_accum + micro)] = next(it)["keys"]
    return out


def test_global_micro_batch_reads_the_same_samples_on_every_shape(toy_root):
    """Global batch 4 per step as 4 ranks x 1, 2 ranks x 2 accumulated, 1 rank x 4 (with 2 workers): the
    default reader count is 4 x workers on each, and micro-batch g of step t gets the same samples."""
    shapes = [(4, 1, 0), (2, 2, 0), (1, 4, 0)]
    reference = None
    for world, accum, workers in shapes:
        layout, _ = choose_layout(8, world, accum, workers, None)
        assert layout.readers == 4 and layout.invariant
        got = _micro_batches(toy_root, layout, workers, steps=5)
        reference = reference or got
        assert got == reference, (world, accum)
    # with workers: 8 readers, each rank's loader splits its readers over 2 processes
    a = _micro_batches(toy_root, choose_layout(8, 2, 2, 2, None)[0], 2, steps=5)
    b = _micro_batches(toy_root, choose_layout(8, 1, 4, 2, None)[0], 2, steps=5)
    assert a == b and a != reference  # 8 readers read another order than 4 (both seeded)


def _consume(toy_root, layout, workers, positions, first_batch, until) -> tuple[list, list[dict]]:
    """Every rank's loader from `positions` (one state dict per rank, or None = fresh); returns the
    (epoch, key) of each sample consumed and each rank's state after `until(rank, batches)` says stop."""
    cfg = _data_cfg(toy_root, workers)
    seen, states = [], []
    for rank in range(layout.world_size):
        pos = positions[rank] if positions else DataPosition(layout)
        batches = []
        for batch in build_loader(_shards(toy_root), cfg, HistoryConfig(), rank, pos, first_batch):
            pos.update(batch)
            batches.append(batch)
            seen += list(zip(batch["epochs"], batch["keys"]))
            if until(pos, batches):
                break
        states.append(json.loads(json.dumps(pos.state_dict())))
    return seen, states


@pytest.mark.parametrize("new_world, new_workers", [(3, 0), (1, 3)])
def test_resplit_reads_every_sample_exactly_once_per_epoch_across_the_resize(toy_root, new_world, new_workers):
    """2 ranks x 2 workers (4 readers) read 3 batches each, then the run resumes on 3 ranks without workers
    (3 readers) or on 1 rank with 3 workers: the 4 readers' unread shard pieces are re-split over the 3 new
    ones. Over epoch 0 — before and after the resize together — every key of the dataset is read exactly
    once, and epoch 1 (read wholly by the new readers, from the seed) again holds every key once."""
    all_keys = sorted(s["__key__"] for p in _shards(toy_root) for s in wds.WebDataset(p, shardshuffle=False,
                                                                                       empty_check=False))
    before, states = _consume(toy_root, ReaderLayout(4, 2, 1), 2, None, 0, lambda pos, b: len(b) == 3)
    assert {e for e, _ in before} == {0} and len(before) == 6
    cfg = _data_cfg(toy_root, new_workers)
    resumed = [resume_position(states, 8, rank, new_world, 1, cfg) for rank in range(new_world)]
    position, old_readers, note, _ = resumed[0]
    assert old_readers == 4 and position.layout.readers == 3 and "re-split from 4 to 3" in note
    # the counters of the retired readers are carried (rank 0), so the run's totals stay whole
    assert [r[0].samples_read() for r in resumed] == [len(before)] + [0] * (new_world - 1)
    after, _ = _consume(toy_root, position.layout, new_workers, [r[0] for r in resumed], 3,
                        lambda pos, b: all(p["epoch"] >= 2 for p in pos.readers.values())
                        and len(pos.readers) == pos.layout.per_rank)
    read = before + after
    for epoch in (0, 1):
        keys = sorted(k for e, k in read if e == epoch)
        assert keys == all_keys, epoch  # each exactly once


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


COMMON = ["trainer.log_every=1", "validation.every=0", "data.num_workers=0", "data.batch_size=1",
          "trainer.max_steps=4", "trainer.checkpoint_every=2", "tracker.mode=offline"]


def _torchrun(toy_root, out, *overrides) -> str:
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "helios_train", f"toy_root={toy_root}",
           f"output_root={out}", *COMMON, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _losses(run: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run)]


def _weights_close(a: Path, b: Path, rtol=1e-4, atol=1e-6) -> None:
    wa, wb = load_file(str(a / "generator.trainable.safetensors")), load_file(str(b / "generator.trainable.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k].numpy(), wb[k].numpy(), rtol=rtol, atol=atol, err_msg=k)


@pytest.mark.slow
def test_ddp_checkpoint_resumes_on_one_process_and_back(toy_root, tmp_path, capsys):
    """2 ranks x 1 micro-batch <-> 1 rank x 2 accumulated micro-batches (global batch 2 either way).

    Reference: an uninterrupted 1-process accumulation-2 run of 4 steps. (a) 2-process DDP to step 2,
    resumed on 1 process with accumulation 2 to step 4; (b) the reference's checkpoint-2 resumed under
    2-process DDP to step 4. Both equal the reference from step 3 on: the data readers continue (the
    order does not depend on the shape), the draws are keyed by global micro-batch, DDP's mean over
    ranks equals accumulation's mean over micro-batches (float summation order aside, ~1e-7)."""
    train(toy_root, tmp_path, COMMON + ["trainer.grad_accum_steps=2", "run_name=ref"])
    ref = _losses(tmp_path / "ref")
    _torchrun(toy_root, tmp_path, "launcher=ddp", "trainer.max_steps=2", "run_name=a")
    capsys.readouterr()
    train(toy_root, tmp_path, COMMON + ["trainer.grad_accum_steps=2", "run_name=a"])
    said = capsys.readouterr().out
    assert ("on another shape: 2 rank(s) x 1 micro-batch(es) of 1 (ddp) -> 1 rank(s) x 2 micro-batch(es) of 1 "
            "(single); data: 2 reader(s) continue") in said
    a = read_metrics(tmp_path / "a")
    assert [m["step"] for m in a] == [1, 2, 3, 4]
    assert a[2]["resume/world_size_before"] == 2 and a[2]["resume/readers"] == 2  # recorded in the metrics
    np.testing.assert_allclose([m["loss"] for m in a], ref, rtol=1e-5, atol=1e-6)
    _weights_close(tmp_path / "a/checkpoint-4", tmp_path / "ref/checkpoint-4")

    out = _torchrun(toy_root, tmp_path, "launcher=ddp", f"resume={tmp_path}/ref/checkpoint-2", "run_name=b")
    assert "-> 2 rank(s) x 1 micro-batch(es) of 1 (ddp)" in out
    np.testing.assert_allclose(_losses(tmp_path / "b")[-2:], ref[2:], rtol=1e-5, atol=1e-6)
    _weights_close(tmp_path / "b/checkpoint-4", tmp_path / "ref/checkpoint-4")


@pytest.mark.slow
def test_zero_and_ddp_checkpoints_resume_on_the_other_backends_and_rank_counts(toy_root, tmp_path):
    """A ZeRO-2 checkpoint of 2 processes (whole optimizer state gathered next to the shards) resumes under
    ZeRO-3 and DDP on 2 processes, and under ZeRO-2 on 1 process with accumulation 2; a DDP checkpoint
    resumes under ZeRO-3. Each continues its uninterrupted run (steps 3-4 equal to fp32 reduction noise;
    without the AdamW moments step 4 differs by ~1e-4, checked by hand against a loader that skips them)."""
    base = [f"toy_root={toy_root}", f"output_root={tmp_path}", *COMMON]
    from_z2, from_ddp = f"resume={tmp_path}/z2/checkpoint-2", f"resume={tmp_path}/ddp/checkpoint-2"
    configs = [base + ["launcher=deepspeed_zero2", "run_name=z2"],
               base + ["launcher=ddp", "run_name=ddp"],
               base + ["launcher=deepspeed_zero3", from_z2, "run_name=z2_z3"],
               base + ["launcher=ddp", from_z2, "run_name=z2_ddp"],
               base + ["launcher=deepspeed_zero3", from_ddp, "run_name=ddp_z3"]]
    run_pooled(configs, tmp_path)
    train(toy_root, tmp_path, COMMON + ["launcher=deepspeed_zero2", "trainer.grad_accum_steps=2", from_z2,
                                        "run_name=z2_one"])
    for run, reference in (("z2_z3", "z2"), ("z2_ddp", "z2"), ("z2_one", "z2"), ("ddp_z3", "ddp")):
        ref = _losses(tmp_path / reference)
        assert len(ref) == 4 and [m["step"] for m in read_metrics(tmp_path / run)] == [3, 4]
        np.testing.assert_allclose(_losses(tmp_path / run), ref[2:], rtol=1e-5, atol=1e-6, err_msg=run)
        _weights_close(tmp_path / run / "checkpoint-4", tmp_path / reference / "checkpoint-4")


def test_shape_rules_refuse_what_cannot_be_honoured():
    from helios_train.backends.run_shape import RunShape, ShapeError, check_resume_shape

    z2 = RunShape(2, 1, 1, "deepspeed", 2)
    assert check_resume_shape("ckpt", z2, z2, False, portable=False) is None
    ddp_one = RunShape(1, 2, 1, "ddp", None)
    assert check_resume_shape("ckpt", z2, ddp_one, False, portable=True) == (
        "2 rank(s) x 1 micro-batch(es) of 1 (deepspeed zero2) -> 1 rank(s) x 2 micro-batch(es) of 1 (ddp)")
    with pytest.raises(ShapeError, match=r"only as DeepSpeed ZeRO-2 shards of 2 rank\(s\).*portable_checkpoints=false"):
        check_resume_shape("ckpt", z2, ddp_one, False, portable=False)
    bigger = RunShape(4, 1, 1, "deepspeed", 2)
    with pytest.raises(ShapeError, match=r"global batch of 2 .* this run has 4 .*grad_accum_steps=1"):
        check_resume_shape("ckpt", z2, bigger, False, portable=True)
    assert check_resume_shape("ckpt", z2, bigger, True, portable=True).endswith("(deepspeed zero2)")


def test_too_few_shards_fall_back_to_per_rank_readers_and_say_so():
    """8 shards, 4 ranks x accumulation 4 = 16 micro-batches per step: each rank's micro-batches share its 2
    readers (the order then depends on the shape) instead of refusing a run that fits the old rule; fewer
    shards than ranks is refused."""
    layout, notes = choose_layout(8, 4, 4, 2, None)
    assert (layout.readers, layout.per_rank, layout.invariant) == (8, 2, False)
    assert "order depends on the world size" in notes[0]
    # rank 1's batches cycle through its own readers 2 and 3
    assert [layout.global_reader(1, i % layout.per_rank) for i in range(4)] == [2, 3, 2, 3]
    layout, notes = choose_layout(8, 2, 2, 4, None)  # 4 micro-batches x 4 workers = 16 readers > 8 shards
    assert (layout.readers, layout.invariant, notes[0].endswith("using 8 readers")) == (8, True, True)
    with pytest.raises(ValueError, match="data.num_readers=3: must be a multiple of the 2 rank"):
        choose_layout(8, 2, 1, 0, 3)
