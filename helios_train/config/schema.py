"""The whole run's config (`Config`), how `conf/` composes into it, and the one error type of config checks.

Why dataclasses: Hydra merges the YAML files of `conf/` into these typed nodes in struct mode, so a misspelled
key (`trainer.lr_rate=1`), a wrong type or a value outside a choice (helios_train/config/choices.py) fails at
composition, naming the key, before any model is built. The stage node is typed per stage
(helios_train/config/stages.py): each `conf/stage/<name>.yaml` lists `/schema/stage/<name>` first.

Composition from Python (the same as `python -m helios_train ...`): helios_train/config/compose.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from helios_train.config.errors import UserError
from helios_train.config.run import (DataConfig, LauncherConfig, ModelConfig, TrackerConfig, TrainerConfig,
                                     ValidationConfig)
from helios_train.config.stages import STAGE_CONFIGS

# The Hydra config tree (`conf/`); HELIOS_CONF_DIR points elsewhere (an installed copy, a user's own tree).
CONF_DIR = os.environ.get("HELIOS_CONF_DIR", str(Path(__file__).resolve().parents[2] / "conf"))


class ConfigError(UserError, ValueError):
    """A config that cannot run, found before any work; the message names the key, the value and the fix."""


@dataclass
class Config:
    stage: Any = MISSING  # BaseStageConfig | MidStageConfig | DistilledStageConfig (helios_train/config/stages.py)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    run_name: str = MISSING
    output_root: str = "checkpoints"
    toy_root: str = "checkpoints/_toy"
    # auto: continue from the newest complete checkpoint of this run if there is one;
    # latest: same but fail if there is none; never: fail if the run dir already has checkpoints;
    # or a path to a checkpoint-N directory.
    resume: str = "auto"
    # plan=true: print the per-GPU memory plan of this stage/model/launcher (meta device, no weights) and exit.
    plan: bool = False
    # dry_run=true: one real training step of this configuration at full size on fake tensors (no weights
    # read, no memory allocated); prints measured vs planned memory per GPU (helios_train/planning/dry_run.py).
    dry_run: bool = False
    plan_gpus: int = 8
    plan_gpu_memory_gb: float = 80.0


def typed_schema(stage_name: str):
    """The schema of a run of stage `stage_name` as a DictConfig (the stage node typed by its own class)."""
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(Config)
    schema.stage = OmegaConf.structured(STAGE_CONFIGS[stage_name])
    return schema


def register_configs() -> None:
    """Register the schemas: `helios_schema` (first in `conf/config.yaml`'s defaults) and one per stage
    (`/schema/stage/<name>`, placed at `stage` by the stage's yaml)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="helios_schema", node=Config)
    for name, cls in STAGE_CONFIGS.items():
        cs.store(group="schema/stage", name=str(name), node=cls, package="stage")
