"""Faults: SIGKILL + resume, SIGTERM/SIGUSR1 preemption, half-written checkpoints, NaN guard."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import REPO, train, wait_until
from helios_train.training.tracking import read_metrics


def launch(toy_root: Path, out: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "helios_train", f"toy_root={toy_root}", f"output_root={out}",
           "data.num_workers=0", "trainer.log_every=1", "validation.every=0", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    wait_until(path.exists, proc, f"{path} appeared", timeout)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(toy_root, tmp_path):
    common = ["trainer.checkpoint_every=2", "trainer.max_steps=8"]
    # The reference runs in this process (the same entry, no process start-up) with the victim's one thread
    # (OMP_NUM_THREADS=1 in `launch`): float reductions depend on the thread count.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(toy_root, tmp_path, [*common, "run_name=ref", "data.num_workers=0", "trainer.log_every=1"])
    finally:
        torch.set_num_threads(threads)
    victim = launch(toy_root, tmp_path, *common, "run_name=victim", "trainer.debug.step_sleep_s=0.3")
    wait_for(tmp_path / "victim/checkpoint-4/COMPLETE", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "victim/checkpoint-8").exists()
    resumed = launch(toy_root, tmp_path, *common, "run_name=victim", "resume=latest")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    a, b = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "victim")
    assert [m["step"] for m in b] == list(range(1, 9))
    np.testing.assert_allclose([m["loss"] for m in a], [m["loss"] for m in b], rtol=0, atol=1e-6)
    wa = load_file(str(tmp_path / "ref/checkpoint-8/generator.trainable.safetensors"))
    wb = load_file(str(tmp_path / "victim/checkpoint-8/generator.trainable.safetensors"))
    for k in wa:
        np.testing.assert_allclose(wa[k].numpy(), wb[k].numpy(), rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_preemption_signal_checkpoints_and_exits_zero(toy_root, tmp_path):
    """SIGUSR1 (SLURM's warning); SIGTERM takes the same handler and is sent in the loop by
    tests/test_process_reliability.py::test_workers_stop_when_torchrun_is_killed (the parent-death signal)."""
    sig = signal.SIGUSR1
    proc = launch(toy_root, tmp_path, "trainer.checkpoint_every=1000", "trainer.max_steps=500",
                  "run_name=pre", "trainer.debug.step_sleep_s=0.2")
    wait_for(tmp_path / "pre/metrics.jsonl", proc)
    time.sleep(1.0)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert f"received {sig.name}" in out
    ckpts = sorted((tmp_path / "pre").glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").is_file()
    step = int(ckpts[0].name.split("-")[1])
    assert 0 < step < 500
    assert read_metrics(tmp_path / "pre")[-1]["step"] == step


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one_naming_the_file(toy_root, tmp_path, capsys):
    """A COMPLETE-marked checkpoint whose safetensors file was truncated afterwards (a full disk, a bad copy):
    resume=auto warns naming the file and resumes from the previous checkpoint; resume=<that dir> and export of
    it fail naming it; the resumed run then equals an uninterrupted one."""
    from helios_train.sampling.export import export

    common = ["trainer.checkpoint_every=2", "data.num_workers=0", "trainer.log_every=1"]
    train(toy_root, tmp_path, common + ["trainer.max_steps=4", "run_name=straight"])
    train(toy_root, tmp_path, common + ["trainer.max_steps=4", "run_name=cut"])
    run = tmp_path / "cut"
    bad = run / "checkpoint-4" / "generator.trainable.safetensors"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(ValueError, match="generator.trainable.safetensors"):
        train(toy_root, tmp_path, common + ["trainer.max_steps=6", "run_name=cut", f"resume={run / 'checkpoint-4'}"])
    with pytest.raises(ValueError, match="generator.trainable.safetensors"):
        export(run / "checkpoint-4", tmp_path / "bad_export")
    capsys.readouterr()
    result = train(toy_root, tmp_path, common + ["trainer.max_steps=4", "run_name=cut"])
    out = capsys.readouterr().out
    assert "skipping checkpoint-4" in out and str(bad) in out and "resumed from" in out and "checkpoint-2" in out
    assert result["step"] == 4
    a, b = read_metrics(tmp_path / "straight"), read_metrics(run)
    np.testing.assert_allclose([m["loss"] for m in a], [m["loss"] for m in b], rtol=0, atol=1e-6)


def test_same_size_corruption_is_found_by_content_and_a_nonfinite_checkpoint_is_refused(toy_root, tmp_path, capsys):
    """The newest checkpoint's tensor bytes overwritten with NaN, sizes unchanged (COMPLETE checked sizes only:
    resume=auto took it, skipped every step as non-finite and wrote NaN weights into the next checkpoint):
    its content hash no longer matches, so resume=auto names the file and takes the previous checkpoint. A
    checkpoint whose hashes match but whose weights are non-finite (a state saved diverged) is refused at
    load, naming the tensor."""
    import json

    import torch
    from safetensors.torch import save_file

    from helios_train.runtime import checkpoint as ckpt

    common = ["trainer.checkpoint_every=2", "data.num_workers=0", "trainer.log_every=1"]
    train(toy_root, tmp_path, common + ["trainer.max_steps=4", "run_name=nanfile"])
    run = tmp_path / "nanfile"
    bad = run / "checkpoint-4" / "generator.trainable.safetensors"
    tensors = load_file(str(bad))
    size = bad.stat().st_size
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, str(bad))
    assert bad.stat().st_size == size  # same header, same sizes: only the content differs
    capsys.readouterr()
    result = train(toy_root, tmp_path, common + ["trainer.max_steps=4", "run_name=nanfile"])
    out = capsys.readouterr().out
    assert f"skipping checkpoint-4: {bad}: content differs from what was written" in out, out[-2000:]
    assert "resumed from" in out and "checkpoint-2" in out and result["step"] == 4
    assert np.isfinite(read_metrics(run)[-1]["loss"])

    # The same NaN tensors in a checkpoint whose marker agrees (as if saved so): refused by content, at load.
    bad = run / "checkpoint-4" / "generator.trainable.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(bad)).items()}, str(bad))
    marker = json.loads((run / "checkpoint-4" / ckpt.MARKER).read_text())
    marker["xxh3_64"][bad.name] = ckpt.file_hash(bad)
    (run / "checkpoint-4" / ckpt.MARKER).write_text(json.dumps(marker))
    with pytest.raises(ValueError, match=f"{bad}: tensor .* has .* non-finite value"):
        train(toy_root, tmp_path, common + ["trainer.max_steps=6", "run_name=nanfile", f"resume={run / 'checkpoint-4'}"])


def test_half_written_checkpoint_is_ignored_and_removed(toy_root, tmp_path):
    train(toy_root, tmp_path, ["trainer.max_steps=2", "trainer.checkpoint_every=2", "run_name=half"])
    run = tmp_path / "half"
    # A write killed before its rename, and one killed after the rename but before the marker.
    (run / ".tmp-checkpoint-4").mkdir()
    (run / ".tmp-checkpoint-4" / "generator.trainable.safetensors").write_bytes(b"partial")
    (run / "checkpoint-3").mkdir()
    result = train(toy_root, tmp_path, ["trainer.max_steps=3", "trainer.checkpoint_every=1", "run_name=half"])
    assert result["step"] == 3
    assert not (run / ".tmp-checkpoint-4").exists()
    assert (run / "checkpoint-3" / "COMPLETE").is_file()  # rewritten properly by the resumed run
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]


def test_nonfinite_loss_is_skipped_counted_and_aborts_after_limit(toy_root, tmp_path):
    result = train(toy_root, tmp_path, ["trainer.max_steps=4", "run_name=nan1",
                                        "trainer.debug.nonfinite_loss_steps=[1]"])
    hist = read_metrics(tmp_path / "nan1")
    assert result["step"] == 4 and hist[-1]["nonfinite_skipped_total"] == 1
    assert not np.isfinite(hist[1]["loss"]) and np.isfinite(hist[2]["loss"])
    from helios_train.training.trainer import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite"):
        train(toy_root, tmp_path, ["trainer.max_steps=6", "run_name=nan2", "trainer.max_consecutive_nonfinite=3",
                                   "trainer.debug.nonfinite_loss_steps=[1,2,3,4]"])


def test_nonfinite_step_leaves_weights_untouched_and_is_never_checkpointed(toy_root, tmp_path, monkeypatch):
    """A skipped (non-finite) step leaves the weights as they were; and a checkpoint is never written from a
    state with no finite step since the last one: the run stops naming the steps instead (it wrote
    checkpoint-2 before)."""
    from helios_train.runtime.checkpoint import trainable_state
    from helios_train.training.trainer import NonFiniteLossError, Trainer

    train(toy_root, tmp_path, ["trainer.max_steps=1", "trainer.checkpoint_every=1", "run_name=nanw"])
    before = load_file(str(tmp_path / "nanw/checkpoint-1/generator.trainable.safetensors"))
    at_save = []
    original = Trainer.save
    monkeypatch.setattr(Trainer, "save", lambda self: (at_save.append(trainable_state(self.roles["generator"].module)),
                                                       original(self))[1])
    with pytest.raises(NonFiniteLossError, match="steps 2-2: every one non-finite, no finite step since the last "
                                                 "checkpoint; not writing checkpoint-2"):
        train(toy_root, tmp_path, ["trainer.max_steps=2", "trainer.checkpoint_every=1", "run_name=nanw",
                                   "trainer.debug.nonfinite_loss_steps=[1]"])
    assert not (tmp_path / "nanw/checkpoint-2").exists()
    for k in before:
        assert np.array_equal(before[k].numpy(), at_save[-1][k].numpy()), k


def test_checkpoints_total_limit_keeps_newest(toy_root, tmp_path):
    train(toy_root, tmp_path, ["trainer.max_steps=5", "trainer.checkpoint_every=1", "trainer.checkpoints_total_limit=2",
                               "run_name=limit"])
    assert sorted(p.name for p in (tmp_path / "limit").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]


def test_checkpoint_directory_operations_never_leave_a_bad_checkpoint_to_choose(tmp_path, monkeypatch):
    """A kill inside a re-save (between its renames) or inside a prune (half the files deleted): at every such
    instant the newest checkpoint that resume would choose is whole, and the next start clears the debris."""
    import shutil

    from helios_train.runtime import checkpoint as ckpt

    run = tmp_path / "run"
    run.mkdir()

    def save(step: int, payload: bytes, keep=None):
        tmp = ckpt.tmp_dir(run, step)
        tmp.mkdir()
        (tmp / "w.bin").write_bytes(payload)
        (tmp / "x.bin").write_bytes(payload)
        return ckpt.finalize(run, step, keep)

    save(2, b"two")
    save(4, b"four")
    real_replace = os.replace
    calls = []

    def killed_on_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between moving the old step 4 aside and the new one in
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save(4, b"four again")
    monkeypatch.setattr(os, "replace", real_replace)
    chosen = ckpt.latest_valid_checkpoint(run)
    assert chosen == run / "checkpoint-2" and ckpt.verify(chosen) is None
    assert {p.name for p in ckpt.remove_incomplete(run)} == {".old-checkpoint-4", ".tmp-checkpoint-4"}

    save(4, b"four")
    real_rmtree = shutil.rmtree

    def killed_mid_delete(path, ignore_errors=False):
        (Path(path) / "w.bin").unlink()  # part of the files are gone, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        save(6, b"six", keep=2)  # prunes checkpoint-2
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert not (run / "checkpoint-2/COMPLETE").exists()  # the marker went first: not a checkpoint any more
    assert ckpt.latest_valid_checkpoint(run) == run / "checkpoint-6"
    assert [s for s, _ in ckpt.checkpoint_dirs(run)] == [4, 6]
    assert run / "checkpoint-2" in ckpt.remove_incomplete(run)
