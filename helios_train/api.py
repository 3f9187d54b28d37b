"""helios-train from Python, without Hydra's command line: `train(config)` runs what `python -m helios_train ...`
runs (a plan, a dry run, or training), `infer(...)` renders videos from a checkpoint.

    import helios_train
    from helios_train.config import load

    config = load(["stage=base", "trainer.max_steps=5"])      # a Config dataclass, as the command line composes it
    config.trainer.optim.lr = 2e-4
    result = helios_train.train(config)                        # {"step": 5, "loss": ..., ...}
    videos = helios_train.infer(f"checkpoints/{config.run_name}", ["a red circle moves"], num_frames=33)

A `Config` built field by field works too (`Config(stage=BaseStageConfig(), model=ModelConfig(...), ...)`); so does
the DictConfig `compose(...)` returns. The Hydra entry (helios_train/__main__.py) is a thin layer over `run`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def as_dictconfig(config) -> DictConfig:
    """A `Config` dataclass, a DictConfig, or a list of overrides → the typed DictConfig the run uses."""
    if isinstance(config, DictConfig):
        return config
    if isinstance(config, (list, tuple)):
        from helios_train.config import compose

        return compose(list(config))
    from helios_train.config import Config

    if not isinstance(config, Config):
        raise TypeError(f"train() takes a helios_train.config.Config, a DictConfig or a list of overrides, "
                        f"not {type(config).__name__}")
    cfg = OmegaConf.structured(config)
    OmegaConf.set_struct(cfg, True)
    return cfg


def train(config) -> dict:
    """Train (or plan / dry-run, as `config.plan` / `config.dry_run` say) and return the final metrics."""
    return run(as_dictconfig(config))


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
        from helios_train.planning.dry_run import run_dry
        from helios_train.training import run_setup

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
    from helios_train.model.loading import check_model_dir
    from helios_train.runtime.numerics import apply_thread_count
    from helios_train.runtime.precision import resolve_precision
    from helios_train.runtime.run_lock import RunLock
    from helios_train.training import run_setup
    from helios_train.training.trainer import Trainer

    is_main = int(os.environ.get("RANK", 0)) == 0
    run_path = Path(cfg.output_root) / cfg.run_name
    # (Hydra's command line creates the folder, empty, before this runs: empty counts as fresh)
    fresh = not run_path.exists() or not any(run_path.iterdir())
    # First, before any check (seconds to minutes) or write: rank 0 takes the run directory's lock and holds it
    # until the process ends, so a second trainer on the same directory stops here at once, naming the holder,
    # with the first run's files untouched (helios_train/runtime/run_lock.py).
    lock = RunLock.acquire(run_path) if is_main else None
    try:
        if is_main:
            run_setup.record_command(run_path)
        run_setup.validate(cfg)
        resolve_precision(cfg, run_setup.training_device(cfg))
        run_setup.ensure_toy_assets(cfg)  # file-locked: every rank may call it
        shards = run_setup.resolve_shards(cfg, run_setup.data_world(cfg))
        check_model_dir(cfg.model)
        run_setup.check_data_fits_model(cfg, shards)
        run_setup.resolve_validation_defaults(cfg, shards)
        run_setup.check_sequence_parallel(cfg)  # with the data's latent and validation sizes
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


def infer(checkpoint, prompts, **options) -> list[Path]:
    """Render `prompts` (a string or a list) with `checkpoint` (a run / checkpoint-N folder, an export, or an
    official Helios folder) into mp4s + settings JSONs; options are helios_train.sampling.infer.InferenceConfig's
    (out, variant, image, video, num_frames, height, width, steps, pyramid_steps, guidance, seed, dtype, ...)."""
    from helios_train.sampling.infer import InferenceConfig, run_inference

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return run_inference(InferenceConfig(checkpoint=str(checkpoint), prompts=prompts, **options))
