"""Configs of the Helios mechanisms (`stage.history`, `stage.timesteps`, `stage.anti_drift`, ...): one dataclass
per mechanism, its keys documented here, the mechanism in the module named beside the class. Dataclasses and
enums only (no torch): composing or checking a config imports no runtime code."""
from __future__ import annotations

from dataclasses import dataclass, field

from helios_train.config.choices import (Degradation, DMDShiftRule, GeneratorSchedule, PyramidExecution, TableSource,
                                         TimeShift, WeightingScheme)


@dataclass
class HistoryConfig:  # helios_train/algorithms/history.py
    """History geometry (official ``history_sizes`` / ``latent_window_size`` / ``is_keep_x0``)."""

    # Latent frames per term; sorted descending into long | mid | short-1× as the official
    # `prepare_stage1_clean_input_from_latents` does, so the order written here does not matter.
    history_sizes: list[int] = field(default_factory=lambda: [16, 2, 1])
    latent_window_size: int = 9  # latent frames per generated chunk (33 pixel frames)
    # Prepend the first-frame anchor x0 to the short term (official: always true, asserted by the loader).
    keep_x0: bool = True


@dataclass
class TimestepConfig:  # helios_train/algorithms/timesteps.py
    """Timestep sampling of the flow-matching loss (official ``training_config`` keys of the stage yamls)."""

    # "logit_normal": u = sigmoid(N(logit_mean, logit_std)) (stage 1); "uniform"/"none": u ~ U(0, 1)
    # (stage 2 uses "none"; the loss weight is 1 for all three, official _flow_loss).
    weighting_scheme: WeightingScheme = WeightingScheme.logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    num_train_timesteps: int = 1000
    # Off in stages 1–2 (official stage_1/2 yamls); when on, σ' = s·σ / (1 + (s − 1)·σ), s from μ(seq_len).
    use_dynamic_shifting: bool = False
    # "linear": s = μ; "exponential": s = exp(min(μ, ln 7)). NOTE: the official stage-1 path
    # (`prepare_stage1_noise_input`) always shifts linearly, ignoring this key; set "linear" to match.
    time_shift_type: TimeShift = TimeShift.linear
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15


@dataclass
class AntiDriftConfig:  # helios_train/algorithms/anti_drift.py
    """History degradations; the official ``training_config`` key is named after each field."""

    corrupt_history: bool = True  # corrupt_history: noise/blur the history (all stage 1–2 yamls: on)
    mode: Degradation = Degradation.noise  # corrupt_mode_history: "noise" | "downsample" (blur) | "random"
    random_noise_prob: float = 0.9  # corrupt_mode_prob_history: P(noise) when mode = "random", else blur
    noise_ratio_short: float = 1 / 3  # noise_corrupt_ratio_history_short: σ ~ U(0, ·) for the x0 anchor
    noise_ratio_mid: float = 1 / 3  # noise_corrupt_ratio_history_mid: newest 7 frames of the last window
    noise_ratio_long: float = 1 / 3  # noise_corrupt_ratio_history_long: tail and all other window frames
    clean_prob: float = 0.1  # noise_corrupt_clean_prob_history: P(history left clean), checked first
    frame_independent: bool = True  # is_frame_independent_corrupt_history: σ per frame, else per segment
    downsample_min: float = 0.9  # downsample_min_corrupt_ratio_history: blur r ~ U(min, max)
    downsample_max: float = 1.0  # downsample_max_corrupt_ratio_history
    saturation: bool = False  # is_add_saturation: colour-drift the history (x − μ)·s + μ
    saturation_min: float = 0.3  # saturation_ratio_min: s ~ U(min, 0.999) or U(1.001, max), 50/50
    saturation_max: float = 1.7  # saturation_ratio_max
    saturation_clean_prob: float = 0.1  # saturation_ratio_clean_prob: P(a segment part is left as is)
    # True reproduces the official stages 1–2, where saturation is never called (official
    # prepare_stage{1,2}_noise_input), whatever `saturation` says. The official stage-3 rollout does run it.
    official_saturation_noop: bool = False
    corrupt_model_input: bool = False  # corrupt_model_input: degrade the clean target too (off everywhere)
    # For corrupt_model_input only (official *_model_input keys; note the official order differs
    # from the history's: mode first, and the clean draw happens only on the noise branch).
    target_mode: Degradation = Degradation.noise
    target_random_noise_prob: float = 0.9
    target_noise_ratio: float = 1 / 3
    target_clean_prob: float = 0.1
    target_frame_independent: bool = False
    target_downsample_min: float = 0.9
    target_downsample_max: float = 1.0
    # Our option: every decision per sample instead of per call (see the module docstring).
    per_sample: bool = False


@dataclass
class TaskDropoutConfig:  # helios_train/algorithms/task_dropout.py
    """Official keys ``is_random_drop`` / ``random_drop_{t2v,i2v,v2v}_ratio`` (official stage yamls)."""

    enabled: bool = True  # official is_random_drop (on in stages 1, 2 and 3-post)
    t2v_ratio: float = 0.4  # P(T2V) — drawn first
    i2v_ratio: float = 0.0  # P(I2V | not T2V); the issue-#38 correction uses 0.1 (official correct.yaml)
    v2v_ratio: float = 0.4  # P(V2V | neither); stage-3 post uses 0.5
    # V2V drops tail + k·window oldest frames, k uniform over these (official: randint(0, Σ//window)).
    v2v_k_choices: list[int] = field(default_factory=lambda: [0, 1, 2])
    # False = official (one draw per call for the whole batch); True = one task per sample.
    per_sample: bool = False


@dataclass
class PyramidConfig:  # helios_train/algorithms/pyramid.py
    num_stages: int = 3
    stage_range: list[float] = field(default_factory=lambda: [0.0, 1 / 3, 2 / 3, 1.0])
    gamma: float = 1 / 3
    shift: float = 1.0
    # draws per level per sample (official stage2_sample_ratios): [1, 2, 1] in 2-init, [1, 1, 1] in 2-post
    sample_ratios: list[int] = field(default_factory=lambda: [1, 1, 1])
    table_source: TableSource = TableSource.training  # "training" (closed form, see module doc) or "diffusers" (HeliosScheduler)
    # Mid-stage execution, all the same maths (helios_train/stages/mid.py):
    # "separate" = one stock diffusers forward per segment; "batch_levels" = one stock forward per
    # level, same-level segments (the two mid draws of [1, 2, 1]) stacked on the batch axis;
    # "packed" = the official NaViT layout, one pass over all segments with per-segment
    # self-attention (helios_train/model/packed_forward.py). bench/compute_per_chunk.py times all three.
    execution: PyramidExecution = PyramidExecution.separate

    def __post_init__(self):
        if len(self.stage_range) != self.num_stages + 1:
            raise ValueError("stage_range needs num_stages + 1 entries")
        if len(self.sample_ratios) != self.num_stages:
            raise ValueError("sample_ratios needs num_stages entries")


@dataclass
class OdeConfig:  # helios_train/algorithms/ode_regression.py
    num_chunks: int = 3  # ode_num_latent_sections_min = max = 3
    weight: float = 80.0  # ode_regression_weight
    levels: int = 3


@dataclass
class DMDConfig:  # helios_train/algorithms/dmd.py
    real_score_path: str = ""  # diffusers folder (or transformer folder) of the teacher: Helios-Base
    critic_lora_rank: int = 256
    critic_lr: float = 4.0e-7
    critic_betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    critic_weight_decay: float = 1.0e-3
    update_ratio: int = 5  # dfake_gen_update_ratio: the generator updates on steps % 5 == 0
    # The generator's LR schedule: "own_updates" lays it over the generator's ceil(max_steps / update_ratio)
    # updates (warm-up likewise in training steps), so it ends at the run's end; "official" (train_helios.py)
    # steps a max_steps-long schedule once per generator update: it covers 1/update_ratio of it and its
    # warm-up lasts update_ratio× longer (invisible with the recipes' constant schedule).
    generator_schedule: GeneratorSchedule = GeneratorSchedule.own_updates
    real_guidance_scale: float = 3.0  # teacher: cond + 3·(cond − neg) = classic CFG 4.0
    anneal_steps: int = 500
    # The generator's / critic's timestep draw u → t: "official" shifts it with the linear dynamic shift only
    # while μ of the chunk is > 1 (official sample_dynamic_timestep, utils_helios_post.py: `if timestep_shift > 1`),
    # so chunks under ~3,200 noisy tokens take t = 1000·u; "always" shifts at every μ (our earlier rule; μ < 1
    # then pulls t down). σ(t) comes from the μ-shifted table either way, as in the official code.
    shift_rule: DMDShiftRule = DMDShiftRule.official
    t_min: int = 20
    t_max: int = 980
    rollout_steps: list[int] = field(default_factory=lambda: [2, 2, 2])
    amplify_first_chunk: bool = True
    # Official dmd_is_low_vram_mode: one frozen base on the GPU at a time, the other in pinned host memory
    # (helios_train/model/low_vram.py). Not used under ZeRO-3, where every base is already partitioned 1/N per GPU.
    low_vram: bool = False


@dataclass
class GanConfig:  # helios_train/algorithms/gan.py
    """`stage.gan` (official keys: is_use_gan, gan_start_step, gan_hooks, gan_*_weight, aprox_r1…)."""

    enabled: bool = False
    start_step: int = 1000  # no GAN forward/loss at all before this generator/critic step
    blocks: list[int] = field(default_factory=lambda: [5, 15, 25, 35])  # 0-indexed, at reference_depth
    reference_depth: int = 40  # depth `blocks` are written for; rescaled to the real depth
    head_width: int = 768  # gan_cond_map_dim
    g_weight: float = 0.05
    d_weight: float = 0.01
    r1_weight: float = 100.0
    r1_sigma: float = 0.1
    crop_fraction: float = 0.5  # 48×80 latents → 24×40
    groups: int = 32  # GroupNorm groups in every head layer; head_width must be a multiple
    # The critic's "real" sample: False = the critic section's own target (consistent with the history
    # it is scored with); True = official pairing, the generator (primary) section's target with the
    # critic (secondary) section's history (official `_critic_loss`, helios/utils/utils_helios_post.py).
    real_from_primary: bool = False
    # Before start_step the heads get no gradient. True = official: they sit in the critic's optimizer
    # from step 0 with zero gradients (DeepSpeed's flat buffers), so AdamW applies weight decay and
    # advances its step count — the first real update is bias-corrected as step start_step, not 1
    # (about 25× larger at the official start 1000, β2 0.999). False = heads untouched until
    # start_step (single/DDP only: DeepSpeed always holds zeros).
    idle_head_updates: bool = True
    # True: the heads compute in fp32 inside the stage's bf16 autocast (approximate R1 compares two nearly
    # equal logits; bf16 rounding would dominate it). False = official: accelerate's bf16 autocast covers
    # the heads' convolutions too (train_helios.py runs every forward under mixed_precision bf16).
    fp32_heads: bool = True


@dataclass
class EMAConfig:  # helios_train/algorithms/ema.py
    enabled: bool = False
    decay: float = 0.99
    update_after_step: int = 250  # official ema_start_step: 250 (ODE) / 750 (DMD)
    sharded: bool = True  # each rank keeps 1/N of the EMA (official: its own ZeRO-3 engine)


@dataclass
class PerfConfig:  # helios_train/training/callbacks/throughput.py
    peak_tflops: float = 989.0  # per device; H100 SXM bf16 dense
    count_flops: bool = True
