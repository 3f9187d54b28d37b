#!/usr/bin/env bash
# Whole-recipe check on the toy data (CPU, about a minute): Base → Mid → ODE pairs (Mid teacher) → ODE
# regression → DMD, each stage from the previous export; one mp4 per variant, a summary table and the
# few-step student's distance to the Mid teacher before/after distillation.
# Arguments go to `python -m helios_train pipeline-check` (--help).
set -euo pipefail
exec python -m helios_train pipeline-check "$@"
