"""Settings that change a run's numbers without changing its config: recorded in every checkpoint,
restored on resume where they can be, and reported where they differ.

A bit-exact resume needs the same CPU thread count (a 2-thread run differs from a 1-thread one by
~5e-7 in the loss from step 4 on the toy: reduction order), the same deterministic-algorithms flag and
TF32 switches (CUDA matmul and cuDNN), and the same attention backend. The thread count is the one
that silently changes between launches (`torchrun` sets OMP_NUM_THREADS=1, a plain `python -m
helios_train` uses every core), so the entry point applies it: `trainer.num_threads`, else the
checkpoint's count on resume, else whatever OMP_NUM_THREADS / torch chose.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def numerics_settings(cfg) -> dict:
    return {"torch_threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
            "attention_backend": str(cfg.model.attention_backend)}


def compare_numerics(saved: dict | None, now: dict) -> str:
    """"key saved → now, …" for every setting that differs ('' when equal or not recorded)."""
    if not saved:
        return ""
    return ", ".join(f"{k} {saved[k]} → {now.get(k)}" for k in saved if saved[k] != now.get(k))


def apply_thread_count(cfg, resume_from: Path | None) -> int:
    """Set torch's CPU thread count for this run (see the module docstring); returns it."""
    wanted = cfg.trainer.num_threads
    if wanted is None and resume_from is not None:
        state_file = Path(resume_from) / "trainer_state.json"
        saved = json.loads(state_file.read_text()).get("numerics", {}) if state_file.is_file() else {}
        wanted = saved.get("torch_threads")
    if wanted is not None and int(wanted) != torch.get_num_threads():
        torch.set_num_threads(int(wanted))
    return torch.get_num_threads()
