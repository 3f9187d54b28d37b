"""The three Helios variants as diffusers sees them: pipeline class, scheduler, default sampler settings.

One table (official: the stage yamls' `validation_config`, infer_helios.py, scripts/inference/*.sh and the
README's diffusers usage) shared by export, inference and in-loop validation, so a checkpoint is always
sampled the way its stage was meant to be:

| variant   | pipeline              | scheduler                        | steps          | guidance            |
|-----------|-----------------------|----------------------------------|----------------|---------------------|
| t2v       | HeliosPipeline, no history (a Wan2.1-style model, `stage=t2v`; every chunk on its own) | as base | 50 | CFG 5.0 |
| base      | HeliosPipeline        | HeliosScheduler, 1 stage, UniPC  | 50             | CFG 5.0             |
| mid       | HeliosPyramidPipeline | HeliosScheduler, 3 stages, UniPC | [20, 20, 20]   | CFG-Zero* 5.0       |
| distilled | HeliosPyramidPipeline | HeliosDMDScheduler (x0, linear)  | [2, 2, 2]      | none (1.0), amplify |
"""
from __future__ import annotations

from dataclasses import dataclass, field

VARIANTS = ("t2v", "base", "mid", "distilled")
SINGLE_LEVEL = ("t2v", "base")  # sampled by HeliosPipeline at one resolution; the others by the pyramid pipeline
# Wan's default English negative prompt (official `negative_prompt`, infer_helios.py /
# helios/utils/train_config.py): unconditional branch of CFG and the teacher's negative branch in DMD.
NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)
PIXEL_FRAMES_PER_CHUNK = 33


@dataclass
class SamplerSettings:
    num_inference_steps: int = 50
    pyramid_steps: list[int] = field(default_factory=lambda: [20, 20, 20])
    guidance_scale: float = 5.0
    cfg_zero_star: bool = False
    use_zero_init: bool = True
    zero_steps: int = 1
    amplify_first_chunk: bool = False


DEFAULTS = {
    "t2v": SamplerSettings(num_inference_steps=50, guidance_scale=5.0),
    "base": SamplerSettings(num_inference_steps=50, guidance_scale=5.0),
    "mid": SamplerSettings(pyramid_steps=[20, 20, 20], guidance_scale=5.0, cfg_zero_star=True),
    "distilled": SamplerSettings(pyramid_steps=[2, 2, 2], guidance_scale=1.0, amplify_first_chunk=True),
}


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {VARIANTS}")


def pipeline_class(variant: str):
    from diffusers import HeliosPipeline, HeliosPyramidPipeline

    check_variant(variant)
    return HeliosPipeline if variant in SINGLE_LEVEL else HeliosPyramidPipeline


def make_scheduler(variant: str):
    """Scheduler configured for the variant: dynamic shift on (exponential for base/mid, linear for
    distilled — official `validation_config.time_shift_type`), pyramid stages [0, 1/3, 2/3, 1] with γ = 1/3
    for mid/distilled."""
    from diffusers import HeliosDMDScheduler, HeliosScheduler

    check_variant(variant)
    if variant in SINGLE_LEVEL:
        return HeliosScheduler(stages=1, stage_range=[0, 1], scheduler_type="unipc", use_dynamic_shifting=True,
                               time_shift_type="exponential")
    if variant == "mid":
        return HeliosScheduler(stages=3, stage_range=[0, 1 / 3, 2 / 3, 1], gamma=1 / 3, scheduler_type="unipc",
                               use_dynamic_shifting=True, time_shift_type="exponential")
    return HeliosDMDScheduler(stages=3, stage_range=[0, 1 / 3, 2 / 3, 1], gamma=1 / 3, use_dynamic_shifting=True,
                              time_shift_type="linear")


def build_pipeline(variant: str, transformer, vae, text_encoder, tokenizer, cfg_zero_star: bool | None = None):
    cls = pipeline_class(variant)
    parts = dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                 scheduler=make_scheduler(variant))
    contiguous_transformer_output(transformer)
    if variant in SINGLE_LEVEL:
        if variant == "t2v":
            without_history(transformer)
        return cls(**parts)
    zero_star = DEFAULTS[variant].cfg_zero_star if cfg_zero_star is None else cfg_zero_star
    pipe = cls(**parts, is_cfg_zero_star=zero_star, is_distilled=(variant == "distilled"))
    use_float64_block_noise(pipe)
    return pipe


def sample_as(pipe, variant: str):
    """Reconfigure a pyramid pipeline to sample as `variant` (scheduler + pipeline flags), e.g. a Mid
    export with the distilled few-step sampler — the student before distillation."""
    check_variant(variant)
    if variant in SINGLE_LEVEL or not hasattr(pipe, "sample_block_noise"):
        raise ValueError(f"only HeliosPyramidPipeline can switch between mid and distilled, not to {variant!r}")
    pipe.scheduler = make_scheduler(variant)
    pipe.register_to_config(is_distilled=(variant == "distilled"), is_cfg_zero_star=DEFAULTS[variant].cfg_zero_star)
    return pipe


def use_float64_block_noise(pipe) -> None:
    """Route diffusers' pyramid block noise through our float64 Cholesky (helios_train/algorithms/pyramid.py).

    Why: HeliosPyramidPipeline factors the singular block covariance (1+γ)I − γ11ᵀ in fp32, which
    is not positive definite at γ = 1/3 (eigenvalue ≈ −1e-7, torch 2.13 on CPU): the factorisation fails on some CPUs
    and returns a factor with a near-zero last pivot (4e-4) on others. Our block_noise draws the same random stream
    and block layout, so results are unchanged wherever the fp32 path works.
    """
    if not hasattr(pipe, "sample_block_noise"):
        return
    from helios_train.algorithms.pyramid import block_noise

    def sample_block_noise(batch_size, channel, num_frames, height, width, patch_size=(1, 2, 2), device=None,
                           generator=None):
        if isinstance(generator, list):
            generator = generator[0]
        if tuple(patch_size)[1:] != (2, 2):
            raise ValueError(f"block noise supports 2x2 spatial patches, got {patch_size}")
        return block_noise((batch_size, channel, num_frames, height, width), pipe.scheduler.config.gamma,
                           generator, device=device)

    pipe.sample_block_noise = sample_block_noise


def _contiguous_output(module, args, output):
    """Forward hook: the output tensor(s) made contiguous (a no-op, no copy, when they already are)."""
    if isinstance(output, tuple):  # return_dict=False, as the pipelines call it
        return tuple(o.contiguous() if hasattr(o, "is_contiguous") else o for o in output)
    sample = getattr(output, "sample", None)  # Transformer2DModelOutput
    if hasattr(sample, "is_contiguous") and not sample.is_contiguous():
        output.sample = sample.contiguous()
    return output


def contiguous_transformer_output(transformer) -> None:
    """Register `_contiguous_output` on the transformer's forward, once per module (every pipeline we build:
    build_pipeline, and infer.load_pipeline's from_pretrained path).

    Why: HeliosTransformer3DModel.forward unpatchifies with `permute(0, 7, 1, 4, 2, 5, 3, 6)` then
    `.flatten(6, 7).flatten(4, 5).flatten(2, 3)`; flatten returns a view where it can, and it can for every
    merge when the patched height and width are both 1 — the lowest pyramid level of a 64×64 video (8×8
    latents → 2×2 → one 2×2 patch). The output is then a channel-strided, non-contiguous view, and the
    CFG-Zero* branch of HeliosPyramidPipeline.__call__ (`positive_flat = noise_pred_text.view(batch_size, -1)`)
    raises on it. At any larger size flatten already copies and this hook changes nothing. The hook stays on
    the module, so in-loop validation's live transformer carries it into training forwards too, where it is a
    no-op at every training resolution (and a value-preserving copy otherwise)."""
    hooks = getattr(transformer, "_forward_hooks", None)
    if hooks is None or any(h is _contiguous_output for h in hooks.values()):  # None: no model (tests)
        return
    transformer.register_forward_hook(_contiguous_output)


_HISTORY_ARGS = ("latents_history_short", "latents_history_mid", "latents_history_long",
                 "indices_latents_history_short", "indices_latents_history_mid", "indices_latents_history_long",
                 "indices_hidden_states")


def _drop_history(module, args, kwargs):
    """Forward pre-hook: the call without its history inputs (and with the chunk's own frame indices)."""
    return args, {k: (None if k in _HISTORY_ARGS else v) for k, v in kwargs.items()}


def without_history(transformer) -> None:
    """Make HeliosPipeline sample a history-free (stage=t2v, Wan2.1-style) model: every forward drops the history
    the pipeline assembles, so each chunk is generated from the caption alone — the bidirectional T2V model
    "rolled out chunk by chunk without history". Why a hook: the pipeline always passes history (zeros for the
    first chunk), which a model without memory patches cannot take; the sampler itself stays diffusers'."""
    hooks = getattr(transformer, "_forward_pre_hooks", None)
    if hooks is None or any(h is _drop_history for h in hooks.values()):
        return
    transformer.register_forward_pre_hook(_drop_history, with_kwargs=True)


def call_kwargs(variant: str, s: SamplerSettings) -> dict:
    """Keyword arguments of the pipeline's __call__ for these settings."""
    if variant in SINGLE_LEVEL:
        return {"num_inference_steps": s.num_inference_steps, "guidance_scale": s.guidance_scale}
    out = {"pyramid_num_inference_steps_list": list(s.pyramid_steps), "guidance_scale": s.guidance_scale,
           "use_zero_init": s.use_zero_init, "zero_steps": s.zero_steps}
    if variant == "distilled":
        out["is_amplify_first_chunk"] = s.amplify_first_chunk
    return out


def round_frames(num_frames: int) -> tuple[int, int]:
    """Requested frames → (frames generated = whole 33-frame chunks, frames returned after the 4n+1 trim)."""
    chunks = max(1, -(-num_frames // PIXEL_FRAMES_PER_CHUNK))
    generated = chunks * PIXEL_FRAMES_PER_CHUNK
    return generated, (generated - 1) // 4 * 4 + 1
