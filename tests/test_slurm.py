"""launch/slurm.sbatch under a real SLURM (tests/slurm_cluster.py: munged, slurmctld and slurmd on this host),
the toy on 2 CPU ranks (GPUS_PER_NODE=2, no GPU GRES asked) with W&B offline on, as a user submits it:

- SIGUSR1 (`scancel -b --signal=USR1`, what `--signal=B:USR1@180` sends before the time limit): the workers
  checkpoint, the segment ends with status 0 and no torchrun traceback, the script requeues the job;
- `scontrol requeue`: SLURM sends SIGTERM to every process of the step, W&B's service included; the trainer
  still checkpoints at the step it reached (it died before: tests/test_process_reliability.py) and SLURM
  requeues the job;
- the job that went through both ends equal to an uninterrupted job (every loss, the final weights);
- plain `scancel`: a checkpoint at the step reached, no requeue.
The time-limit path sends the same SIGUSR1 as the first case and is not run here (it costs a minute a segment).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import REPO
from helios_train.training.tracking import read_metrics
from slurm_cluster import SlurmCluster, available

pytestmark = pytest.mark.slow
STEPS = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = available()
    if missing:
        pytest.skip(f"SLURM {missing}")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def submit(cluster: SlurmCluster, toy_root: Path, out: Path, run: str, *overrides: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", GPUS_PER_NODE="2",
               HELIOS_EXIT_REPORT=str(out / f"exit-{run}.json"))
    return cluster.submit(f"--output={out / run}-%j.out", "--cpus-per-task=2", "launch/slurm.sbatch",
                          f"toy_root={toy_root}", f"output_root={out}", f"run_name={run}", "data.num_workers=0",
                          "trainer.log_every=1", "validation.every=0", "tracker.mode=offline",
                          "trainer.checkpoint_every=1000", f"trainer.max_steps={STEPS}", *overrides,
                          cwd=REPO, env=env)


def wait(cluster: SlurmCluster, job: int, until, what: str, timeout: float = 300) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        state = cluster.job(job)
        if until(state):
            return state
        time.sleep(0.5)
    raise TimeoutError(f"job {job}: no {what} after {timeout:.0f} s; last state {cluster.job(job)}")


def reached(run: Path, step: int):
    return lambda state: state.get("JobState") == "RUNNING" and bool(read_metrics(run)) and \
        read_metrics(run)[-1]["step"] >= step


def log_of(out: Path, run: str, job: int) -> str:
    return (out / f"{run}-{job}.out").read_text()


def test_preemption_requeue_and_cancel_under_slurm(cluster, toy_root, tmp_path):
    ref = submit(cluster, toy_root, tmp_path, "ref")
    state = wait(cluster, ref, lambda s: s.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "end")
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log_of(tmp_path, "ref", ref)[-3000:]

    run = tmp_path / "pre"
    job = submit(cluster, toy_root, tmp_path, "pre", "trainer.debug.step_sleep_s=0.5")
    wait(cluster, job, reached(run, 2), "step 2")
    subprocess.run(["scancel", "-b", "--signal=USR1", str(job)], env=cluster.env, check=True)
    wait(cluster, job, lambda s: s.get("Restarts") == "1" and s.get("JobState") == "RUNNING", "requeue after USR1")
    first = log_of(tmp_path, "pre", job)
    usr1 = int(re.search(r"received SIGUSR1: checkpoint-(\d+) written", first).group(1))
    segment1 = first.split("segment 2")[0]
    assert "requeueing job" in segment1 and "SignalException" not in segment1, segment1[-3000:]
    assert "Exited with exit code" not in segment1, segment1[-3000:]  # srun: every task ended with status 0

    report = json.loads(re.search(r"\[slurm\] (\{.*\}); requeueing job", segment1).group(1))  # as the script read it
    assert report["safe"] and {"startup_s", "step_s", "checkpoint_s"} <= set(report), report
    wait(cluster, job, reached(run, usr1 + 2), f"step {usr1 + 2} after the resume")
    assert "previous segment: start-up" in log_of(tmp_path, "pre", job)  # the lead came from that report
    subprocess.run(["scontrol", "requeue", str(job)], env=cluster.env, check=True)
    state = wait(cluster, job, lambda s: s.get("Restarts") == "2" and s.get("JobState") in ("COMPLETED", "FAILED"),
                 "the end of the third segment")
    text = log_of(tmp_path, "pre", job)
    assert state["JobState"] == "COMPLETED", text[-3000:]
    term = int(re.search(r"received SIGTERM: checkpoint-(\d+) written", text).group(1))
    assert usr1 < term < STEPS and (run / f"checkpoint-{term}/COMPLETE").is_file()
    assert "W&B failed during" in text  # the job-wide SIGTERM took W&B's service down too

    a, b = read_metrics(tmp_path / "ref"), read_metrics(run)
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([m["loss"] for m in a], [m["loss"] for m in b], rtol=0, atol=1e-6)
    wa = load_file(str(tmp_path / f"ref/checkpoint-{STEPS}/generator.trainable.safetensors"))
    wb = load_file(str(run / f"checkpoint-{STEPS}/generator.trainable.safetensors"))
    for k in wa:
        np.testing.assert_allclose(wa[k].numpy(), wb[k].numpy(), rtol=0, atol=1e-6, err_msg=k)

    run = tmp_path / "cancel"
    job = submit(cluster, toy_root, tmp_path, "cancel", "trainer.debug.step_sleep_s=0.5", "trainer.max_steps=500")
    wait(cluster, job, reached(run, 2), "step 2")
    subprocess.run(["scancel", str(job)], env=cluster.env, check=True)
    wait(cluster, job, lambda s: s.get("JobState") == "CANCELLED", "cancel")
    report = tmp_path / "exit-cancel.json"
    t0 = time.time()
    while not report.is_file() and time.time() - t0 < 60:  # the step's processes finish after the job's state
        time.sleep(0.5)
    assert json.loads(report.read_text())["safe"] is True, log_of(tmp_path, "cancel", job)[-3000:]
    step = read_metrics(run)[-1]["step"]
    assert (run / f"checkpoint-{step}/COMPLETE").is_file(), log_of(tmp_path, "cancel", job)[-3000:]
    assert cluster.job(job).get("Restarts") == "0"


def test_the_time_limit_warning_covers_the_previous_segments_step_and_checkpoint(tmp_path):
    """launch/warning_lead.py: 2 x (slowest step + checkpoint) + 30 s, never under SLURM's own 180 s; the first
    segment (no report) gets 180 s. A 14B segment (30 s steps, a 163 s save) needs 416 s: 180 s would cut the
    save at the limit."""
    script = REPO / "launch" / "warning_lead.py"

    def lead(report) -> int:
        path = tmp_path / "report.json"
        path.unlink(missing_ok=True)
        if report is not None:
            path.write_text(json.dumps(report))
        return int(subprocess.run(["python3", str(script), str(path), "180"], capture_output=True, text=True,
                                  check=True).stdout)

    assert lead(None) == 180
    assert lead({"startup_s": 20, "step_s": 0.4, "checkpoint_s": 0.2}) == 180
    assert lead({"startup_s": 400, "step_s": 30, "checkpoint_s": 163}) == 416
