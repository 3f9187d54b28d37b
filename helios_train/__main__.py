"""`python -m helios_train [overrides]` — train (Hydra command line, a thin layer over helios_train.api.run) —
and the other commands, `python -m helios_train <command> [--help]`:

    infer           render videos from a run, checkpoint, export or official folder (helios_train/sampling/infer.py)
    export          a checkpoint → a diffusers folder (helios_train/sampling/export.py)
    pipeline-check  the whole recipe on the toy, each stage from the previous export (helios_train/pipeline_check.py)
    miniature       the whole recipe on a miniature that learns, measured against ground truth (helios_train/miniature.py)
    evaluate        score exports on held-out clips: continuation, drift, adherence, cost (helios_train/evaluation/)
    plan-table      the memory planner over the official recipes at 14B (helios_train/planning/plan.py)
    dry-run-table   planned vs measured memory of the official recipes at 14B (helios_train/planning/dry_run.py)
"""
from __future__ import annotations

# First, before the imports (seconds) and the model load (minutes at 14B): a killed launcher takes this
# worker with it, and SIGTERM/SIGUSR1 end it cleanly (helios_train/runtime/process_guard.py).
if __name__ == "__main__":
    from helios_train.runtime import process_guard as _guard

    _guard.guard_parent()
    _guard.install_early_stop()

import importlib
import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from helios_train.api import run
from helios_train.config import CONF_DIR, register_configs
from helios_train.config.errors import UserError

register_configs()

COMMANDS = {
    "infer": "helios_train.sampling.infer",
    "export": "helios_train.sampling.export",
    "pipeline-check": "helios_train.pipeline_check",
    "miniature": "helios_train.miniature",
    "evaluate": "helios_train.evaluation.evaluate",
    "plan-table": "helios_train.planning.plan",
    "dry-run-table": "helios_train.planning.dry_run",
}


def done_line(result: dict) -> str:
    """The last line a run prints: step, stop reason and final metrics, plus the data it read and what it
    skipped by reason (summed over ranks; the per-sample warnings and metrics.jsonl name each one)."""
    shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in result.items() if "/" not in k}
    if "data/samples_read" in result:
        shown["samples_read"] = result["data/samples_read"]
        shown["skipped"] = {k[len("data/skipped_"):]: v for k, v in result.items()
                            if k.startswith("data/skipped_") and v} or "none"
    return f"[helios-train] done: {shown}"


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.getLogger("helios_train").setLevel(logging.INFO)
    multi_process = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if multi_process:
        from helios_train.runtime.process_guard import will_exit_without_teardown

        will_exit_without_teardown()
    try:
        result = run(cfg)
    except UserError as exn:
        # The message names the problem and the fix: one line, not a traceback through Hydra.
        rank = f" (rank {os.environ['RANK']})" if multi_process else ""
        print(f"[helios-train] error{rank}: {exn}", file=sys.stderr, flush=True)
        if multi_process:
            from helios_train.runtime.process_guard import exit_process

            exit_process(2)
        sys.exit(2)
    if int(os.environ.get("RANK", 0)) == 0:
        print(done_line(result), flush=True)
    if multi_process:
        # Every rank passed the final barrier with everything written: leave without the process-group
        # destructors that can deadlock at interpreter exit (helios_train/runtime/process_guard.py).
        from helios_train.runtime.process_guard import exit_process

        exit_process(0)


def cli() -> None:
    """`python -m helios_train` and the `helios-train` script: a command of COMMANDS, else training."""
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        command = sys.argv.pop(1)
        # The early-stop handlers speak of training ("before training started ... rerun to continue"): the other
        # commands end on SIGTERM / SIGUSR1 as programs do (the stages `miniature` runs install the trainer's own).
        import signal

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        sys.argv[0] = f"python -m helios_train {command}"  # what --help shows
        logging.basicConfig(level=logging.INFO)
        importlib.import_module(COMMANDS[command]).main(sys.argv[1:])
        return
    main()


if __name__ == "__main__":
    sys.exit(cli())
