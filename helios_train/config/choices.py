"""Every fixed choice of the config, as an enum: Hydra/OmegaConf check a value against it when the config is
composed (`launcher.name=dpp` fails there, naming the key and the choices), so no code checks these by hand.

`StrEnum`: a member equals its string (`cfg.launcher.name == "ddp"`), formats as it and serialises as it
(config.yaml, W&B). OmegaConf matches a value to a member by *name*, so every member's name is its value.
Choices that are open sets stay strings: the attention backend (diffusers' registry), the LoRA init (PEFT's),
`resume` (a mode or a path)."""
from __future__ import annotations

import sys
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10: the same behaviour (str(), format() and == give the value)
    class StrEnum(str, Enum):
        __str__ = str.__str__
        __format__ = str.__format__


class StageName(StrEnum):
    t2v = "t2v"  # text-to-video pretraining on single chunks (the Wan2.1-T2V analogue the Base stage starts from)
    base = "base"
    mid = "mid"
    distilled = "distilled"


class Objective(StrEnum):  # stage=distilled: ODE regression (stage_3_ode) or DMD (stage_3_post)
    dmd = "dmd"
    ode = "ode"


class DataMode(StrEnum):
    latents = "latents"  # pre-encoded latent shards
    raw = "raw"  # mp4 shards, decoded and encoded online
    ode_pairs = "ode_pairs"  # teacher trajectories (stage=distilled stage.objective=ode)


class TrainMode(StrEnum):  # a group of tensors: trained fully, through a LoRA, or not at all
    full = "full"
    lora = "lora"
    frozen = "frozen"


class MemoryPatchInit(StrEnum):
    after_load = "after_load"
    official = "official"


class WeightingScheme(StrEnum):
    logit_normal = "logit_normal"
    uniform = "uniform"
    none = "none"


class TimeShift(StrEnum):
    linear = "linear"
    exponential = "exponential"


class Degradation(StrEnum):  # anti-drift corruption of the history (or target)
    noise = "noise"
    downsample = "downsample"
    random = "random"


class TableSource(StrEnum):
    training = "training"
    diffusers = "diffusers"


class PyramidExecution(StrEnum):
    separate = "separate"
    batch_levels = "batch_levels"
    packed = "packed"


class GeneratorSchedule(StrEnum):
    own_updates = "own_updates"
    official = "official"


class DMDShiftRule(StrEnum):  # stage.dmd.shift_rule: when the DMD timesteps take the linear dynamic shift
    official = "official"  # only while μ > 1 (official sample_dynamic_timestep: `if timestep_shift > 1`)
    always = "always"  # at every μ (this framework's earlier rule)


class LrScheduler(StrEnum):  # diffusers.optimization.SchedulerType (tests/test_config.py checks the names)
    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    piecewise_constant = "piecewise_constant"


class WeightDtype(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"  # refused at start-up with the reason (helios_train/runtime/precision.py)


class MixedPrecision(StrEnum):
    auto = "auto"
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"  # refused at start-up with the reason (helios_train/runtime/precision.py)


class DeviceKind(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class LauncherName(StrEnum):
    single = "single"
    ddp = "ddp"
    deepspeed = "deepspeed"


class ProcessGroupBackend(StrEnum):
    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


class SequencePlan(StrEnum):
    split_once = "split_once"
    per_branch = "per_branch"


class ToySpec(StrEnum):
    toy = "toy"
    helios_14b_shape = "helios_14b_shape"
    miniature = "miniature"  # the learning miniature: its own clips, a trained VAE (helios_train/data/miniature_assets.py)


class TrackerName(StrEnum):
    wandb = "wandb"


class TrackerMode(StrEnum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class MiniatureSize(StrEnum):  # data.toy.miniature_size (helios_train/data/miniature_assets.py SIZES)
    full = "full"
    ci = "ci"
