"""One config class per stage (`stage=base|mid|distilled`): a stage's node holds its own mechanisms and nothing
else, so a key of another stage (`stage.pyramid.*` on Base, `stage.dmd.*` on Mid) fails at composition like a
typo. Each class is registered as its stage file's schema (`conf/stage/<name>.yaml` lists `<name>_schema`
first in its defaults)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from helios_train.config.choices import MemoryPatchInit, Objective, StageName, TrainMode
from helios_train.config.mechanisms import (AntiDriftConfig, DMDConfig, EMAConfig, GanConfig, HistoryConfig,
                                            OdeConfig, PyramidConfig, TaskDropoutConfig, TimestepConfig)


@dataclass
class LoraConfig:
    """PEFT LoRA on the transformer (official train_helios.py, `lora_layers: all-linear`): every nn.Linear
    whose name has no "norm"."""

    rank: int = 128
    alpha: Optional[int] = None  # None = rank (scale 1, as the official recipes)
    init: str = "gaussian"  # PEFT init_lora_weights (an open set: gaussian, pissa, olora, ...): A ~ N(0, 1/r), B = 0
    dropout: float = 0.0
    target: str = "all-linear"  # or a comma-separated list of module names
    exclude: list[str] = field(default_factory=lambda: ["norm"])  # substrings of module names to skip


@dataclass
class TrainablesConfig:
    """Which tensors a stage trains (official is_train_{full,lora}_patch_embedding and
    is_train_{full,lora}_multi_term_memory_patch keys)."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    patch_embedding: TrainMode = TrainMode.lora
    memory_patches: TrainMode = TrainMode.full  # patch_short / patch_mid / patch_long
    # Only when the checkpoint has no memory patches (starting from Wan2.1):
    # "after_load" copies the *loaded* patch_embedding into them (the intent of official
    # initialize_weight_from_another_conv3d, our default);
    # "official" derives them from a random patch embedding (the official order bug in
    # HeliosTransformer3DModel.__init__, helios/modules/transformer_helios.py).
    memory_patch_init: MemoryPatchInit = MemoryPatchInit.after_load
    # Train every parameter of the transformer and attach no LoRA: pretraining a model from scratch (stage=t2v,
    # the miniature's Wan2.1 analogue). The official stages never do (they adapt a 14B base through LoRA).
    full_model: bool = False


@dataclass
class StageCommon:
    """What every stage conditions on: the history layout, its degradations, task dropout, the trainables."""

    name: StageName = StageName.base
    history: HistoryConfig = field(default_factory=HistoryConfig)
    anti_drift: AntiDriftConfig = field(default_factory=AntiDriftConfig)
    task_dropout: TaskDropoutConfig = field(default_factory=TaskDropoutConfig)
    trainables: TrainablesConfig = field(default_factory=TrainablesConfig)


@dataclass
class T2VStageConfig:
    """stage=t2v (helios_train/stages/t2v.py): bidirectional text-to-video flow matching on one chunk, no history
    — the analogue of Wan2.1-T2V, which the official stage 1 starts from. Not a Helios stage: it makes the base
    model the miniature (helios_train/miniature/) has no download for."""

    name: StageName = StageName.t2v
    # Only `latent_window_size` (the chunk) and the data loader's chunk choice are used: no history reaches the model.
    history: HistoryConfig = field(default_factory=HistoryConfig)
    trainables: TrainablesConfig = field(default_factory=lambda: TrainablesConfig(full_model=True))
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)


@dataclass
class BaseStageConfig(StageCommon):
    """stage=base (helios_train/stages/base.py): flow matching on the noisy chunk."""

    timesteps: TimestepConfig = field(default_factory=TimestepConfig)


@dataclass
class MidStageConfig(BaseStageConfig):
    """stage=mid (helios_train/stages/mid.py): Base's conditioning over the pyramid's levels."""

    name: StageName = StageName.mid
    pyramid: PyramidConfig = field(default_factory=PyramidConfig)


@dataclass
class DistilledStageConfig(StageCommon):
    """stage=distilled: `objective=ode` (official stage_3_ode: regression onto Mid-teacher ODE pairs,
    data.mode=ode_pairs; helios_train/stages/ode.py) or `objective=dmd` (stage_3_post: DMD against the
    teacher/critic; helios_train/stages/dmd.py)."""

    name: StageName = StageName.distilled
    objective: Objective = Objective.dmd
    ode: OdeConfig = field(default_factory=OdeConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    gan: GanConfig = field(default_factory=GanConfig)  # hierarchical GAN on the critic (stage_3_post_gan_version)
    ema: EMAConfig = field(default_factory=EMAConfig)  # EMA of the generator's trainables


STAGE_CONFIGS = {StageName.t2v: T2VStageConfig, StageName.base: BaseStageConfig, StageName.mid: MidStageConfig,
                 StageName.distilled: DistilledStageConfig}


def uses_history(stage_cfg) -> bool:
    """Whether the stage's model takes history (and so needs its multi-term memory patches): every Helios stage."""
    return str(stage_cfg.name) != StageName.t2v
