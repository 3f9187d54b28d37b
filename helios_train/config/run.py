"""The run's sections besides the stage: model, data, trainer (optimizer, debug drills, perf), launcher,
validation, tracker. Dataclasses and enums only."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from helios_train.config.choices import (DataMode, DeviceKind, LauncherName, LrScheduler, MiniatureSize, MixedPrecision,
                                         ProcessGroupBackend, SequencePlan, ToySpec, TrackerMode, TrackerName,
                                         WeightDtype)
from helios_train.config.mechanisms import PerfConfig


@dataclass
class ModelConfig:
    name: str = MISSING
    # The transformer family's adapter (helios_train/model/__init__.py; an open set: register_family adds one).
    family: str = "helios"
    # Diffusers-layout folder (transformer/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json).
    path: str = MISSING
    transformer_path: Optional[str] = None  # overrides <path>/<transformer_subfolder>
    transformer_subfolder: str = "transformer"
    build_toy: bool = False  # build the tiny random checkpoint at `path` when missing
    toy_spec: ToySpec = ToySpec.toy  # which tiny architecture build_toy builds: toy | helios_14b_shape (helios_train/data/toy_checkpoint.py)
    weight_dtype: WeightDtype = WeightDtype.fp32  # frozen base weights: fp32 | bf16 (trainables always fp32; helios_train/runtime/precision.py)
    gradient_checkpointing: bool = False
    text_max_length: int = 512
    # Speed options (GPU runs; all work on CPU too): diffusers attention dispatcher backend
    # ("native" = torch SDPA; "flash", "_flash_3", "sage", ... when installed) and regional
    # torch.compile of the repeated transformer blocks (compiles one block, reuses it 40×).
    attention_backend: str = "native"
    compile_blocks: bool = False
    # Changes to the transformer's config.json where a model is built from its config instead of its
    # weights — the dry run and the planner (e.g. num_layers=8 for a quicker dry run); real loading
    # refuses them (a checkpoint has one architecture).
    transformer_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToyDataConfig:
    # The toy videos' size and count are fixed by helios_train/data/toy_videos.py (the assets are cached per
    # toy_root, so a per-run size would silently reuse another size's clips); only the seed is a knob.
    seed: int = 0
    # model=miniature: how many clips and VAE steps (helios_train/data/miniature_assets.py SIZES): full (the
    # README's run) | ci (the suite's learning test). A root holds one size; another size there is refused.
    miniature_size: MiniatureSize = MiniatureSize.full


OFFICIAL_LATENT_SIZE = (48, 80)  # 384×640 pixels / 8: the official training resolution


def latent_size(data_cfg) -> tuple[int, int]:
    """The run's latent height × width: `data.latent_height/width` (filled from the first sample at start-up)
    or, before that is known (the planner), the official size."""
    return (int(data_cfg.latent_height or OFFICIAL_LATENT_SIZE[0]), int(data_cfg.latent_width or OFFICIAL_LATENT_SIZE[1]))


@dataclass
class DataConfig:
    name: str = MISSING
    mode: DataMode = DataMode.latents  # pre-encoded shards | raw mp4 (encoded online) | ode_pairs (stage 3 ODE)
    shards: str = MISSING  # brace pattern, glob or comma-separated list of .tar paths
    build_toy: bool = False
    toy: ToyDataConfig = field(default_factory=ToyDataConfig)
    batch_size: int = 2
    num_workers: int = 0
    shuffle_buffer: int = 16
    seed: int = 0
    # Expected latent geometry; shard members that disagree are skipped and counted.
    latent_channels: Optional[int] = None  # None: the model's transformer in_channels (checked at start-up)
    latent_height: Optional[int] = None
    latent_width: Optional[int] = None
    min_chunks: int = 3  # official length filter: >= 121 frames -> >= 3 chunks of 33
    # Stage 3: also yield a second random chunk of each video (the DMD critic's section, official
    # dataloader_dmd.py `return_secondary`).
    secondary_section: bool = False
    max_skip_fraction: float = 0.5  # stop when more than this fraction of read samples is bad
    # Sequential readers over the whole job (helios_train/data/readers.py). null: micro-batches per step
    # (world × accumulation) × max(1, num_workers), kept on resume so the data order survives a new shape.
    num_readers: Optional[int] = None


@dataclass
class OptimConfig:
    lr: float = 5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    eps: float = 1e-8
    lr_scheduler: LrScheduler = LrScheduler.constant  # diffusers.optimization.get_scheduler
    warmup_steps: int = 0
    max_grad_norm: float = 1.0


@dataclass
class DebugConfig:
    """Fault injection for tests and drills — never needed for real runs."""

    nonfinite_loss_steps: list[int] = field(default_factory=list)  # make the loss NaN at these steps
    nonfinite_roles: list[str] = field(default_factory=list)  # … of these roles only (empty: every role)
    step_sleep_s: float = 0.0  # slow each step down (kill/preemption drills need a run that lasts)
    crash_at_step: Optional[int] = None  # raise at the start of this step, on rank `crash_rank` only
    crash_rank: int = 0


@dataclass
class TrainerConfig:
    max_steps: int = 30
    grad_accum_steps: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    # auto (bf16 autocast exactly when model.weight_dtype=bf16, the official setting) | no | bf16;
    # impossible combinations fail at start-up (helios_train/runtime/precision.py)
    mixed_precision: MixedPrecision = MixedPrecision.auto
    device: DeviceKind = DeviceKind.auto
    seed: int = 43
    seed_per_rank: bool = True  # False = official behaviour: every rank draws the same noise/timesteps
    log_every: int = 1
    checkpoint_every: int = 10
    checkpoints_total_limit: Optional[int] = None
    max_consecutive_nonfinite: int = 5
    # Seconds a rank waits in a collective for a silent peer before the job ends naming it
    # (helios_train/runtime/heartbeat.py). Longer than any one-rank pause between collectives (checkpoint write).
    collective_timeout_s: float = 600.0
    # CPU threads per process (torch.set_num_threads). null: on resume the checkpoint's count (bit-exact
    # resume depends on it), else OMP_NUM_THREADS or torch's default.
    num_threads: Optional[int] = None
    # Resume may change world size, accumulation and backend but keeps the global batch (world ×
    # accumulation × data.batch_size) unless this is true (helios_train/backends/run_shape.py).
    allow_batch_change: bool = False
    # Under DeepSpeed also write whole (gathered) optimizer state next to the ZeRO shards, so the checkpoint
    # resumes on another rank count, ZeRO stage or DDP; false = ZeRO shards only (resume needs the same shape).
    portable_checkpoints: bool = True
    perf: PerfConfig = field(default_factory=PerfConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


@dataclass
class LauncherConfig:
    name: LauncherName = LauncherName.single
    backend: ProcessGroupBackend = ProcessGroupBackend.auto  # auto: nccl on CUDA, gloo on CPU
    find_unused_parameters: bool = False
    # ddp: gradient bucket size (MB) of DDP's reducer and of our bucketed reduce for multi-forward roles
    bucket_cap_mb: float = 25.0
    zero_stage: int = 2  # deepspeed: ZeRO stage (2 or 3); also what `plan=true` assumes
    offload_optimizer: bool = False  # deepspeed (ZeRO-2/3): optimizer state in CPU memory
    offload_param: bool = False  # deepspeed (ZeRO-3 only): parameters in CPU memory
    deepspeed_config: Optional[str] = None  # deepspeed: JSON merged over the generated config
    # Sequence parallelism (helios_train/backends/sequence_groups.py): each sample's tokens split over
    # ulysses_degree x ring_degree ranks (1 = off); ring on CUDA needs an attention backend that returns the
    # log-sum-exp (model.attention_backend=flash | _flash_3 | _native_cudnn), on CPU the native one does.
    ulysses_degree: int = 1
    ring_degree: int = 1
    # where the sequence is split: split_once (each rank's share of history and noisy tokens from the first block
    # to the last) | per_branch (diffusers' _cp_plan: inside every attn / FFN only); helios_train/model/sequence_parallel.py
    sequence_plan: SequencePlan = SequencePlan.split_once


@dataclass
class ValidationConfig:
    """`validation.*` (helios_train/sampling/validation.py renders)."""
    every: int = 500  # steps between validations; 0 disables validation
    at_first_step: bool = True  # official first_step_valid
    # None: the lines of `prompts_file`, else the first `num_data_prompts` captions of the first shard
    # (what the run trains on), else the official Tokyo prompt. Resolved at start-up (run_setup).
    prompts: Optional[list[str]] = None
    prompts_file: Optional[str] = None
    num_data_prompts: int = 2
    num_frames: int = 99  # 3 chunks: enough for the drift curve
    # None: the data's resolution (latent size × 8), else the official 384×640.
    height: Optional[int] = None
    width: Optional[int] = None
    seed: int = 42
    steps: Optional[int] = None  # None = the variant's default (helios_train/model/variants.py)
    pyramid_steps: Optional[list[int]] = None
    guidance: Optional[float] = None
    use_ema: bool = False  # render with the EMA weights when the stage keeps an EMA (official: false)
    # How long the other ranks wait (outside any collective) for rank 0's render before the job ends.
    wait_timeout_s: float = 3600.0


@dataclass
class TrackerConfig:
    name: TrackerName = TrackerName.wandb
    mode: TrackerMode = TrackerMode.offline
    project: str = "helios-train"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)
