"""`python -m helios_train stage=base|mid|distilled [overrides]` — Hydra entry, dispatch only."""
from __future__ import annotations

# First, before the imports (seconds) and the model load (minutes at 14B): a killed launcher takes this
# worker with it, and SIGTERM/SIGUSR1 end it cleanly (helios_train/runtime/process_guard.py).
if __name__ == "__main__":
    from helios_train.runtime import process_guard as _guard

    _guard.guard_parent()
    _guard.install_early_stop()

import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from helios_train.config import CONF_DIR, register_configs

register_configs()


def run(cfg: DictConfig) -> dict:
    """Everything `python -m helios_train` does for a composed config: plan, dry run, or train."""
    from helios_train.runtime.precision import resolve_precision
    from helios_train.training.tracking import wandb_env_defaults

    wandb_env_defaults()
    if cfg.plan:
        from helios_train.planning.plan import run_plan

        resolve_precision(cfg, device=None)  # planning for GPUs: no probe of this machine
        return run_plan(cfg)
    if cfg.dry_run:
        from helios_train.training import run_setup
        from helios_train.planning.dry_run import run_dry

        run_setup.validate(cfg, dry_run=True)
        resolve_precision(cfg, device=None)  # measuring for GPUs: no probe of this machine
        run_setup.ensure_toy_assets(cfg)  # a toy model's config.json (nothing else is read)
        run_setup.check_sequence_parallel(cfg, dry_run=True)
        return run_dry(cfg)
    trainer = build_trainer(cfg)
    try:
        return trainer.train()
    finally:
        if trainer.run_lock is not None:
            trainer.run_lock.release()


def build_trainer(cfg: DictConfig):
    """Every check and set-up step before the first training step, then the Trainer (not started)."""
    from helios_train.training import run_setup
    from helios_train.model.loading import check_model_dir
    from helios_train.runtime.precision import resolve_precision
    from helios_train.runtime.numerics import apply_thread_count
    from helios_train.runtime.run_lock import RunLock
    from helios_train.training.trainer import Trainer

    run_setup.validate(cfg)
    resolve_precision(cfg, run_setup.training_device(cfg))
    is_main = int(os.environ.get("RANK", 0)) == 0
    run_setup.ensure_toy_assets(cfg)  # file-locked: every rank may call it
    shards = run_setup.resolve_shards(cfg, run_setup.data_world(cfg))
    check_model_dir(cfg.model)
    run_setup.check_data_fits_model(cfg, shards)
    run_setup.resolve_validation_defaults(cfg, shards)
    run_setup.check_sequence_parallel(cfg)  # with the data's latent and validation sizes
    run_path = Path(cfg.output_root) / cfg.run_name
    fresh = not run_path.exists()
    # Rank 0 holds the run directory's lock from before its first write until the process ends: a second
    # trainer on the same directory stops here, naming the holder (helios_train/runtime/run_lock.py).
    lock = RunLock.acquire(run_path) if is_main else None
    try:
        run_dir, resume_from, config = run_setup.prepare_run_dir(cfg, is_main)
        apply_thread_count(cfg, resume_from)
        trainer = Trainer(cfg, run_dir, shards, resume_from, config)
    except BaseException:
        # A start-up that fails (model load, backend, resume) leaves no run folder it created: a stray
        # checkpoints/<run>/ with a config.yaml would make the fixed rerun "resume" a run that never ran.
        if lock is not None:
            lock.release()
        if is_main and fresh:
            shutil.rmtree(run_path, ignore_errors=True)
        raise
    trainer.run_lock = lock
    return trainer


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
    result = run(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(done_line(result), flush=True)
    if multi_process:
        # Every rank passed the final barrier with everything written: leave without the process-group
        # destructors that can deadlock at interpreter exit (helios_train/runtime/process_guard.py).
        from helios_train.runtime.process_guard import exit_process

        exit_process(0)


if __name__ == "__main__":
    sys.exit(main())
