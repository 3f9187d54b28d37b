"""The typed config of a run: choices (enums), the mechanisms' configs, one config per stage, the run's other
sections, and `Config` with its Hydra composition (`compose`, `load`). Imports no runtime code (no torch)."""
from helios_train.config.choices import *  # noqa: F401,F403
from helios_train.config.mechanisms import (AntiDriftConfig, DMDConfig, EMAConfig, GanConfig, HistoryConfig,  # noqa: F401
                                            OdeConfig, PerfConfig, PyramidConfig, TaskDropoutConfig, TimestepConfig)
from helios_train.config.run import (DataConfig, DebugConfig, LauncherConfig, ModelConfig, OptimConfig,  # noqa: F401
                                     ToyDataConfig, TrackerConfig, TrainerConfig, ValidationConfig)
from helios_train.config.compose import compose, load  # noqa: F401
from helios_train.config.schema import CONF_DIR, Config, ConfigError, register_configs, typed_schema  # noqa: F401
from helios_train.config.stages import (STAGE_CONFIGS, BaseStageConfig, DistilledStageConfig, LoraConfig,  # noqa: F401
                                        MidStageConfig, StageCommon, TrainablesConfig)
