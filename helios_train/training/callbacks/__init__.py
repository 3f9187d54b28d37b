"""The callbacks a run gets from its config (helios_train/runtime/callbacks.py says what a callback is):
throughput always, the EMA of the stage's output role when `stage.ema.enabled`, validation when
`validation.every > 0`; then the stage's own (`Stage.callbacks`)."""
from __future__ import annotations

from omegaconf import OmegaConf

from helios_train.training.callbacks.ema import EMACallback
from helios_train.training.callbacks.throughput import ThroughputCallback
from helios_train.training.callbacks.validation import ValidationCallback


def default_callbacks(cfg, stage, backend, run_dir) -> list:
    out: list = [ThroughputCallback(cfg.trainer.perf, backend.device, backend.data_world,
                                    (int(cfg.trainer.grad_accum_steps), int(cfg.data.batch_size)))]
    ema = None
    ema_cfg = OmegaConf.select(cfg, "stage.ema")  # (stages without an EMA have no such section)
    if ema_cfg is not None and ema_cfg.enabled:
        ema = EMACallback(ema_cfg, stage.output_role)
        out.append(ema)
    if cfg.validation.every > 0:
        out.append(ValidationCallback(cfg, run_dir, stage.output_role, ema if cfg.validation.use_ema else None))
    return out + stage.callbacks()
