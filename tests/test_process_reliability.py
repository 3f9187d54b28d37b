"""Process-level reliability, from outside the trainer (real torchrun / python processes, toy model, gloo):
workers die with their launcher, one trainer per run directory, clean exits never hang, signals before the
first step lose nothing, a frozen rank ends the job naming it, resumed W&B history continues after the
checkpoint, a job-wide SIGTERM that also ends W&B's service loses nothing, and the thread count follows the
checkpoint."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, compose, train, wait_until
from helios_train.training.tracking import read_metrics
from wandb_history import history_steps

COMMON = ["data.num_workers=0", "trainer.log_every=1", "validation.every=0"]


def env(**extra) -> dict:
    # Without WANDB_SERVICE: an in-process W&B run of an earlier test exports it, and a trainer started with it
    # would use this process's W&B service instead of starting its own as on a cluster.
    inherited = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**inherited, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **extra}


def entry(toy_root, out, *overrides, torchrun: bool = False) -> list[str]:
    head = (["torchrun", "--standalone", "--nproc_per_node=2", "-m", "helios_train", "launcher=ddp"] if torchrun
            else [sys.executable, "-m", "helios_train"])
    return [*head, f"toy_root={toy_root}", f"output_root={out}", *COMMON, *overrides]


def start(cmd, **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env(**kw), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    def reached() -> bool:
        metrics = read_metrics(run_dir)
        return bool(metrics) and metrics[-1]["step"] >= step

    wait_until(reached, proc, f"step {step}", timeout)


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def descendants(pid: int) -> list[int]:
    out = []
    for child in children(pid):
        out += [child, *descendants(child)]
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_workers_stop_when_torchrun_is_killed(toy_root, tmp_path):
    """SIGKILL of the launcher: the parent-death signal reaches both workers, which take it as preemption
    (finish the step, checkpoint, exit) instead of training on unparented."""
    proc = start(entry(toy_root, tmp_path, "trainer.max_steps=500", "trainer.checkpoint_every=1000",
                       "trainer.debug.step_sleep_s=0.3", "run_name=orphan", torchrun=True))
    wait_for_step(tmp_path / "orphan", 2, proc)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(map(alive, workers)):
        time.sleep(0.2)
    assert not any(map(alive, workers)), "workers still running 30 s after their launcher was killed"
    ckpts = list((tmp_path / "orphan").glob("checkpoint-*/COMPLETE"))
    assert len(ckpts) == 1  # they stopped as on SIGTERM: one checkpoint at the step they were in


@pytest.mark.slow
def test_a_second_trainer_on_the_same_run_directory_stops_naming_the_first(toy_root, tmp_path):
    first = start(entry(toy_root, tmp_path, "trainer.max_steps=500", "trainer.checkpoint_every=1000",
                        "trainer.debug.step_sleep_s=0.3", "run_name=shared"))
    try:
        wait_for_step(tmp_path / "shared", 1, first)
        run = tmp_path / "shared"
        before = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()
                  and "checkpoint-" not in str(p) and p.name not in ("metrics.jsonl", "debug-internal.log")}
        t0 = time.time()
        second = subprocess.run(entry(toy_root, tmp_path, "trainer.max_steps=3", "trainer.optim.lr=0.5",
                                      "run_name=shared"), cwd=REPO, env=env(), capture_output=True, text=True,
                                timeout=240)
        seconds = time.time() - t0
        assert second.returncode == 2
        said = [line for line in (second.stdout + second.stderr).splitlines() if line.strip()]
        assert said == [f"[helios-train] error: run directory {run} is in use by another trainer: pid {first.pid} "
                        f"on {socket.gethostname()} (started " + said[0].split("(started ", 1)[1]], said
        assert seconds < 30, seconds  # before any check or model load (~30 s before: the lock came last)
        # nothing of the first run rewritten (a different command rewrote its .hydra/*.yaml before)
        after = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*") if p.relative_to(run) in before}
        assert after == before
        assert not (run / ".hydra").exists()
        assert first.poll() is None  # the first one trains on, its metrics untouched by the second
        steps = [m["step"] for m in read_metrics(tmp_path / "shared")]
        assert steps == list(range(1, len(steps) + 1))
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out[-2000:]
    # The lock went with its holder: the directory is free for the next run (a resume here).
    again = subprocess.run(entry(toy_root, tmp_path, f"trainer.max_steps={read_metrics(tmp_path / 'shared')[-1]['step'] + 1}",
                                 "run_name=shared"), cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.parametrize("override, said", [
    ("data.shards=/nonexistent/shard-*.tar", "data.shards: glob '/nonexistent/shard-*.tar' matches no file"),
    ("trainer.grad_accum_steps=0", "trainer.grad_accum_steps"),
])
def test_a_bad_config_or_shard_pattern_says_one_line_and_leaves_no_run_folder(toy_root, tmp_path, override, said):
    """A ConfigError / ShardSpecError names the problem and the fix: printed alone (it came after a traceback
    through Hydra), exit status 2, and the run folder it would have created is gone (it kept .hydra/ and
    __main__.log)."""
    out = subprocess.run(entry(toy_root, tmp_path, override, "run_name=bad"), cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=240)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert out.returncode == 2, lines
    assert len(lines) == 1 and lines[0].startswith("[helios-train] error: ") and said in lines[0], lines
    assert not (tmp_path / "bad").exists()


def test_a_lock_left_by_a_dead_holder_is_taken_over(tmp_path):
    """flock dies with its holder: a run directory whose last trainer was SIGKILLed is free again at once."""
    from helios_train.runtime.run_lock import RunDirectoryLocked, RunLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from pathlib import Path; from helios_train.runtime.run_lock import RunLock;"
                               "RunLock.acquire(Path(sys.argv[2])); print('held', flush=True); time.sleep(60)",
                               str(REPO), str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirectoryLocked, match=f"pid {holder.pid}"):
        RunLock.acquire(tmp_path / "run")
    holder.kill()
    holder.wait()
    lock = RunLock.acquire(tmp_path / "run")
    assert json.loads((tmp_path / "run/.lock").read_text())["pid"] == os.getpid()
    lock.release()


@pytest.mark.slow
def test_twenty_clean_two_process_exits_never_hang(tmp_path):
    """The end of a multi-process run as the entry point does it (final barrier, no process-group destroy,
    os._exit): 20 launches of 2 real DDP ranks on gloo, each must end within its timeout."""

    def launch() -> list[subprocess.Popen]:
        port = str(_free_port())
        return [subprocess.Popen([sys.executable, str(REPO / "tests/teardown_worker.py")], cwd=REPO,
                                 env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                         MASTER_PORT=port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for r in range(2)]

    for i in range(20):
        ranks = launch()
        for r, p in enumerate(ranks):
            try:
                out, _ = p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                for q in ranks:
                    q.kill()
                raise AssertionError(f"launch {i}: rank {r} hung at exit")
            assert p.returncode == 0 and f"rank {r} done" in out, out[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_signal_before_the_first_step_exits_zero_losing_nothing(toy_root, tmp_path):
    """(SIGUSR1 takes the same handler; tests/test_faults.py sends it inside the loop.)"""
    sig = signal.SIGTERM
    report = tmp_path / "exit.json"
    proc = start(entry(toy_root, tmp_path, "trainer.max_steps=2", "run_name=early"), HELIOS_EXIT_REPORT=str(report))
    time.sleep(1.0)  # imports: long before the model loads or any step runs
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    assert f"received {sig.name} before training started: no step taken since the last checkpoint, nothing lost" in out
    assert json.loads(report.read_text())["safe"] is True  # what launch/slurm.sbatch requeues on
    assert train(toy_root, tmp_path, [*COMMON, "trainer.max_steps=2", "run_name=early"])["step"] == 2  # starts cleanly
    assert [m["step"] for m in read_metrics(tmp_path / "early")] == [1, 2]


@pytest.mark.slow
def test_a_frozen_rank_ends_the_job_naming_it(toy_root, tmp_path):
    """SIGSTOP one of two ranks: the other times out in its next collective after collective_timeout_s, names
    the silent rank from the heartbeats, ends it (same host, same torchrun run id: no 30 s wait for a process
    that cannot take SIGTERM) and exits non-zero."""
    proc = start(entry(toy_root, tmp_path, "trainer.max_steps=500", "trainer.checkpoint_every=1000",
                       "trainer.collective_timeout_s=5", "trainer.debug.step_sleep_s=0.2", "run_name=frozen",
                       torchrun=True))
    wait_for_step(tmp_path / "frozen", 2, proc)
    workers = sorted(children(proc.pid))
    rank1 = next(pid for pid in workers if "RANK=1" in Path(f"/proc/{pid}/environ").read_text().split("\0"))
    os.kill(rank1, signal.SIGSTOP)
    t0 = time.time()
    out, _ = proc.communicate(timeout=5 + 30 + 60)
    elapsed = time.time() - t0
    assert proc.returncode != 0
    said = [line for line in out.splitlines() if "[helios-train]" in line or "Error" in line]
    assert f"rank 1 (pid {rank1} on {socket.gethostname()}, last step" in out, "\n".join(said[-40:])
    assert "its process is stopped (SIGSTOP or a debugger)" in out
    waited = int(re.search(r"failed in a collective (\d+) s into step", out).group(1))
    assert 4 <= waited <= 5 + 15, waited  # the time it spent, about the 5 s timeout (it printed 600 before)
    assert "ended the silent rank(s) [1] on this host" in out
    assert elapsed < 5 + 20, elapsed  # the timeout and a margin: not torchrun's 30 s grace on top
    assert not any(map(alive, workers))


def test_resumed_history_continues_after_the_checkpoint_in_metrics_and_wandb(toy_root, tmp_path):
    """A run that died after step 4 with its last checkpoint at 2: the resume drops steps 3–4 from
    metrics.jsonl and starts its W&B segment at step 3 (wandb's rewind to the checkpoint's step), so each step
    is in the history once; wandb_segments.json names both offline folders for one `wandb sync`."""
    import shutil

    common = ["trainer.max_steps=4", "trainer.checkpoint_every=2", "tracker.mode=offline", "run_name=hist"]
    train(toy_root, tmp_path, [*COMMON, *common])
    shutil.rmtree(tmp_path / "hist/checkpoint-4")  # as if killed after logging step 4, before its checkpoint
    train(toy_root, tmp_path, [*COMMON, *common[1:], "trainer.max_steps=6"])
    assert [m["step"] for m in read_metrics(tmp_path / "hist")] == [1, 2, 3, 4, 5, 6]
    segments = json.loads((tmp_path / "hist/wandb_segments.json").read_text())
    assert [(s["resumed_after_step"], s["starting_step"]) for s in segments] == [(None, 0), (2, 3)]
    assert segments[0]["id"] == segments[1]["id"] and all(Path(s["dir"]).is_dir() for s in segments)


@pytest.mark.slow
@pytest.mark.slow
def test_a_crashed_rank_is_reported_as_exited_with_its_error_and_not_killed(toy_root, tmp_path):
    """Rank 0 raises at step 3 (trainer.debug.crash_at_step). Its peer's collective fails once rank 0's process
    goes; the peer must name rank 0 as exited with its error, give the seconds it really spent (not the
    600 s timeout: it printed "waited 600 s ... silent rank 0 ... 2 s ago" after a few seconds), and must not
    SIGKILL rank 0, which is writing its own report."""
    proc = start(entry(toy_root, tmp_path, "trainer.max_steps=50", "trainer.checkpoint_every=1000",
                       "trainer.debug.crash_at_step=3", "trainer.debug.crash_rank=0", "run_name=crash",
                       torchrun=True))
    t0 = time.time()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "fault drill: rank 0 crashes at step 3" in out, out[-3000:]
    reports = [line for line in out.splitlines() if "[helios-train] rank 1 failed in a collective" in line]
    assert reports, out[-3000:]  # rank 1's allreduce fails at once: gloo's "Connection closed by peer"
    assert "rank 0 (pid" in reports[0] and "exited with RuntimeError: fault drill" in reports[0], reports
    assert int(re.search(r"failed in a collective (\d+) s into step", reports[0]).group(1)) < 60
    assert "ended the silent rank" not in out
    assert time.time() - t0 < 240


@pytest.mark.slow
def test_a_job_wide_sigterm_with_wandb_on_checkpoints_and_wandb_keeps_every_step(toy_root, tmp_path):
    """`scancel` and `scontrol requeue` signal every process of the job step, W&B's service (wandb-core, in a
    session of its own) included: the trainer's next W&B call fails (`ConnectionResetError`). The trainer must
    still checkpoint the step it reached and exit 0 (it died before saving, rc 1, before the tracker was
    guarded), and the resumed run must leave W&B one copy of every step: the killed service wrote nothing to its
    offline file, so the resume rewinds W&B to the killed segment's start and re-sends from metrics.jsonl."""
    run = tmp_path / "wb"
    proc = start(entry(toy_root, tmp_path, "trainer.max_steps=500", "trainer.checkpoint_every=1000",
                       "trainer.debug.step_sleep_s=0.3", "tracker.mode=offline", "run_name=wb"))
    wait_for_step(run, 3, proc)
    job = [proc.pid, *descendants(proc.pid)]
    assert any(b"wandb-core" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in job)
    for pid in job:
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "W&B failed during" in out  # the path under test: the service was gone when the trainer logged
    step = read_metrics(run)[-1]["step"]
    assert (run / f"checkpoint-{step}/COMPLETE").is_file(), sorted(p.name for p in run.iterdir())
    assert f"received SIGTERM: checkpoint-{step} written" in out

    train(toy_root, tmp_path, [*COMMON, f"trainer.max_steps={step + 2}", "tracker.mode=offline", "run_name=wb"])
    assert [m["step"] for m in read_metrics(run)] == list(range(1, step + 3))
    segments = json.loads((run / "wandb_segments.json").read_text())
    assert [(s["finished"], s["checkpoint_step"]) for s in segments] == [(False, None), (True, step)]
    history: list[int] = []  # what `wandb sync` of the folders in order gives: each segment rewinds to its start
    for segment in segments:
        history = [s for s in history if s <= (segment["resumed_after_step"] or 0)]
        history += history_steps(next(Path(segment["dir"]).glob("*.wandb")))
    assert history == list(range(1, step + 3))


@pytest.mark.slow
def test_a_stop_signal_with_wandb_alive_sends_every_step_once_the_checkpoint_is_written(toy_root, tmp_path):
    """SIGTERM to the trainer alone (W&B's service lives on): the step in flight is held back from W&B until the
    checkpoint is written, then sent; the segment finishes cleanly and W&B's offline file holds every step up to
    the checkpoint (the held values were never sent before: the hold was still on when the run finished)."""
    run = tmp_path / "alive"
    proc = start(entry(toy_root, tmp_path, "trainer.max_steps=500", "trainer.checkpoint_every=1000",
                       "trainer.debug.step_sleep_s=0.3", "tracker.mode=offline", "run_name=alive"))
    wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "W&B failed" not in out, out[-3000:]
    step = read_metrics(run)[-1]["step"]
    assert (run / f"checkpoint-{step}/COMPLETE").is_file()
    segments = json.loads((run / "wandb_segments.json").read_text())
    assert [s["finished"] for s in segments] == [True]
    assert history_steps(next(Path(segments[0]["dir"]).glob("*.wandb"))) == list(range(1, step + 1))


def test_resume_adopts_the_checkpoints_thread_count(toy_root, tmp_path, capsys):
    import torch

    from helios_train.runtime.numerics import apply_thread_count

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train(toy_root, tmp_path, [*COMMON, "trainer.max_steps=2", "trainer.checkpoint_every=2", "run_name=thr"])
        state = json.loads((tmp_path / "thr/checkpoint-2/trainer_state.json").read_text())
        assert state["numerics"]["torch_threads"] == 1
        torch.set_num_threads(2)
        cfg = compose([f"toy_root={toy_root}"])
        assert apply_thread_count(cfg, tmp_path / "thr/checkpoint-2") == 1  # unset: the checkpoint's count
        cfg = compose([f"toy_root={toy_root}", "trainer.num_threads=2"])
        assert apply_thread_count(cfg, tmp_path / "thr/checkpoint-2") == 2  # set: the user's, and said so
        capsys.readouterr()
        train(toy_root, tmp_path, [*COMMON, "trainer.max_steps=3", "trainer.num_threads=2", "run_name=thr"])
        out = capsys.readouterr().out
        assert "resuming with other numerics than" in out and "torch_threads 1 → 2" in out
    finally:
        torch.set_num_threads(threads)
