#!/usr/bin/env bash
# Whole-recipe smoke test on the toy data (CPU, a few minutes): Base → export → Mid → export, one mp4 per
# variant and a summary table. Arguments go to `python -m helios_train.pipeline_check` (--help).
set -euo pipefail
exec python -m helios_train.pipeline_check "$@"
