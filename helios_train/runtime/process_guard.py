"""Process-level safety of a training process, from its first line to its last.

Three things a cluster does to a trainer that the training loop alone cannot answer:

- **Its launcher dies** (torchrun or DeepSpeed's launcher SIGKILLed, a node agent lost). Workers are
  children of the launcher (torchrun starts them in their own sessions), so nothing reaches them and
  they would train on, unparented, beside the requeued job. `guard_parent()` asks the kernel for
  SIGTERM when the parent goes (Linux `PR_SET_PDEATHSIG`), which the trainer treats as preemption
  (finish the step, checkpoint, exit); a parent that died before the request shows as parent pid 1.
- **A signal before the loop** (imports, model load, resume load: minutes at 14B). `install_early_stop()`
  makes SIGTERM/SIGUSR1 end the process with exit 0 and says that nothing was lost — no step has run
  since the last checkpoint. The trainer replaces these handlers with its own once the loop starts.
- **The end of a multi-process run**. Gloo's process-group destructor joins its worker thread while
  holding the GIL, and that thread may wait for the GIL to drop a tensor (pytorch#56297; here 5 of 60
  launches of tests/teardown_worker.py hung that way). The entry point declares `will_exit_without_teardown()`; the backends then stop
  after their final barrier without destroying the process group, and `exit_process()` flushes
  everything and leaves with `os._exit`, so no process-group destructor ever runs.

Messages are printed with flush: `os._exit` skips buffered output. A signalled run's outcome also goes to
`$HELIOS_EXIT_REPORT` (`report_exit`), which launch/slurm.sbatch reads before requeueing.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h
NOTHING_LOST = "no step taken since the last checkpoint, nothing lost"


class StopBeforeTraining(SystemExit):
    """SIGTERM/SIGUSR1 before the first step: a clean exit (code 0), nothing to save."""

    def __init__(self, signame: str):
        super().__init__(0)
        self.signame = signame


def under_launcher() -> bool:
    """torchrun / torch elastic, DeepSpeed's launcher, or SLURM's srun started this process."""
    return any(k in os.environ for k in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "SLURM_STEP_ID"))


def guard_parent(sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send `sig` to this process when its parent exits (Linux); exit at once if the
    parent is already gone. Returns whether the request is in place."""
    if not sys.platform.startswith("linux") or not under_launcher():
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        log.warning("could not ask for a parent-death signal (errno %d): workers may outlive a killed launcher",
                    ctypes.get_errno())
        return False
    if os.getppid() == 1:  # the launcher died before the request (we were handed to init): nobody will send it
        print("[helios-train] the launcher that started this worker is gone: exiting", file=sys.stderr, flush=True)
        os._exit(1)
    return True


def install_early_stop() -> None:
    """SIGTERM / SIGUSR1 until the training loop installs its own handlers: a clean exit, said so."""

    def stop(signum, _frame):
        name = signal.Signals(signum).name
        print(f"[helios-train] received {name} before training started: {NOTHING_LOST}; rerun the same command "
              f"to continue", file=sys.stderr, flush=True)
        report_exit(name, safe=True, detail=NOTHING_LOST)
        raise StopBeforeTraining(name)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, stop)


PROCESS_START = time.time()  # this module is imported in the first lines of `python -m helios_train`


def report_exit(signame: str, safe: bool, detail: str, step: int | None = None, finished: bool = False,
                timings: dict | None = None) -> None:
    """Rank 0 tells a wrapping job script how the run ended, in the JSON file named by $HELIOS_EXIT_REPORT:
    `finished` (max_steps reached), or stopped by `signame` and `safe` (a checkpoint was written or no step had
    run since the last one). launch/slurm.sbatch decides its exit status and whether to requeue from it:
    torchrun's own exit status cannot say it (a signal it received itself makes it exit 1). `timings`
    (startup_s, step_s, checkpoint_s) let the next segment's script size its time-limit warning
    (launch/warning_lead.py)."""
    path = os.environ.get("HELIOS_EXIT_REPORT")
    if not path or int(os.environ.get("RANK", 0)) != 0:
        return
    import json

    from helios_train.runtime.atomic_file import write_text_atomically

    write_text_atomically(path, json.dumps({"signal": signame, "safe": safe, "detail": detail, "step": step,
                                            "finished": finished, "time": time.time(), **(timings or {})}))


def flush_everything() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()


_EXIT_WITHOUT_TEARDOWN = False


def will_exit_without_teardown() -> None:
    """The entry point declares that this process ends with `exit_process`: backends then skip
    destroy_process_group (whose destructor is the deadlock) after their final barrier."""
    global _EXIT_WITHOUT_TEARDOWN
    _EXIT_WITHOUT_TEARDOWN = True


def teardown_by_exit() -> bool:
    return _EXIT_WITHOUT_TEARDOWN


def exit_process(code: int) -> None:
    """Leave a multi-process run without running interpreter teardown (see the module docstring).
    Call only after the trainer closed: W&B finished, checkpoints and metrics written, final barrier."""
    flush_everything()
    os._exit(code)
