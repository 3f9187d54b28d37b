"""bench/gpu_check.py: on a machine without CUDA it says so and exits 0; `--allow-cpu` runs its whole code
path (random weights through the trainer, timing, FLOP count, planner and dry-run columns) at toy size."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_it_says_so_and_exits_0():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout


def test_cpu_code_path_measures_every_column(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--allow-cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows, cost = result["rows"], result["low_vram"]
    assert rows and "error" not in rows[0], rows
    assert cost["onload_gb_per_s"] > 0 and cost["generator_step_added_s"] == pytest.approx(
        cost["dmd_step_added_s"] * 4 / 2.4)  # stage.dmd.low_vram's copies, timed
    row = rows[0]
    assert row["geometry"] == "toy" and row["step_s"] > 0 and row["noisy_tok_s"] > row["history_tok_s"] > 0
    assert row["tflops"] > 0 and math.isnan(row["mfu"])  # no dense-bf16 peak for a CPU
    assert row["dry_run_gb"] > 0 and row["planned_gb"] > 0
    assert "| geometry | blocks |" in proc.stdout
