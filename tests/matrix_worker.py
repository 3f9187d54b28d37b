"""Runs several training configs one after the other in one (torchrun) process and records, per config,
what the recipe matrix checks: the dtypes the roles really hold, gradient checkpointing, the losses (the
trained weights are read from the checkpoints). Used by tests/test_recipe_matrix.py: one process start
per backend instead of one per recipe.

    torchrun --nproc_per_node=2 tests/matrix_worker.py OUT.json '[["experiment=stage_1_init", ...], ...]'
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

# tests/ for conftest, and this checkout's root before any installed copy (a git worktree runs its own code).
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]


def role_summary(trainer) -> dict:
    """Per role: dtypes of the frozen (not fp32-kept) and trainable tensors, gradient checkpointing."""
    from helios_train.model.loading import keeps_fp32

    out = {}
    for name, role in trainer.roles.items():
        module = role.module
        frozen = {str(p.dtype) for n, p in module.named_parameters() if not p.requires_grad and not keeps_fp32(module, n)}
        trainable = {str(p.dtype) for p in role.params}
        out[name] = {"frozen_dtypes": sorted(frozen), "trainable_dtypes": sorted(trainable),
                     "checkpointing": bool(getattr(module, "is_gradient_checkpointing", False))}
    return out


def run_one(overrides: list[str]) -> dict:
    from conftest import compose
    from helios_train.api import build_trainer
    from helios_train.training.callbacks.ema import EMACallback
    from helios_train.training.tracking import read_metrics

    cfg = compose(overrides)
    trainer = build_trainer(cfg)
    result = trainer.train()
    if trainer.run_lock is not None:
        trainer.run_lock.release()
    metrics = read_metrics(trainer.run_dir) if trainer.backend.is_main else []
    losses = [v for m in metrics for k, v in m.items() if k.endswith("loss")]
    return {"step": result["step"], "losses": losses, "finite": bool(losses) and all(map(math.isfinite, losses)),
            "mixed_precision": str(cfg.trainer.mixed_precision), "roles": role_summary(trainer),
            "run_dir": str(trainer.run_dir),
            "ema": trainer.callback(EMACallback) is not None,
            "onloaded_gb": sum(m.get("low_vram/onloaded_gb", 0.0) for m in metrics)}


def main() -> None:
    import torch.distributed as dist

    out, configs = Path(sys.argv[1]), json.loads(sys.argv[2])
    # One process group for every run: the backends reuse a group they did not create and leave it
    # alive (re-creating gloo groups in one process can meet the previous group's stale store keys).
    dist.init_process_group("gloo")
    results = [run_one(overrides) for overrides in configs]
    if int(os.environ.get("RANK", 0)) == 0:
        out.write_text(json.dumps(results, indent=1))
    dist.barrier()
    # Leave as the entry point does: no process-group destructor at interpreter exit (process_guard.py).
    from helios_train.runtime.process_guard import exit_process

    exit_process(0)


if __name__ == "__main__":
    main()
