#!/usr/bin/env python3
"""How many seconds before a job's time limit launch/slurm.sbatch asks the trainer to stop, from the previous
segment's exit report ($HELIOS_EXIT_REPORT: startup_s, step_s, checkpoint_s, written by the trainer):

    launch/warning_lead.py <report> [default]          → prints the lead in seconds

A stop signal is taken at the end of the current step, then every rank writes a checkpoint; SLURM kills the job
at the limit whatever happens, so the lead must cover the slowest step plus the checkpoint write, with a margin
(twice that, plus 30 s). Never less than `default` (the script's `--signal=B:USR1@180`, which SLURM sends
anyway). The 14B case it exists for: a 35 GB save takes ~160 s to write (bench/checkpoint_hash.py's rate), so
180 s would cut it. It also warns on stderr when a segment's time limit leaves little training after start-up.
Standard library only: it runs in the batch shell before anything is installed or activated.
"""
from __future__ import annotations

import json
import math
import sys


def lead_seconds(report: dict, default: int) -> int:
    step, save = float(report.get("step_s", 0)), float(report.get("checkpoint_s", 0))
    return max(default, math.ceil(2 * (step + save) + 30))


def main(argv: list[str]) -> int:
    default = int(argv[2]) if len(argv) > 2 else 180
    try:
        report = json.load(open(argv[1]))
    except (OSError, ValueError, IndexError):
        print(default)  # first segment, or no report: SLURM's own --signal lead
        return 0
    lead = lead_seconds(report, default)
    print(lead)
    if "startup_s" in report:
        print(f"[slurm] previous segment: start-up {report['startup_s']:.0f} s, slowest step "
              f"{report.get('step_s', 0):.0f} s, checkpoint {report.get('checkpoint_s', 0):.0f} s -> stop "
              f"{lead} s before the time limit", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
