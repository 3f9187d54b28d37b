"""Inference / validation entry: T2V, I2V, V2V → mp4 (24 fps) + a JSON of the settings.

    python -m helios_train infer --checkpoint checkpoints/base-toy-toy --prompt "a red circle moves" --out out/
    python -m helios_train infer --checkpoint /weights/Helios-Distilled --prompt-file prompts.txt --num-frames 240
    python -m helios_train infer --checkpoint exports/mid --prompt "..." --image first.png          # I2V
    python -m helios_train infer --checkpoint exports/base --prompt "..." --video clip.mp4          # V2V

`--checkpoint` is a training run / checkpoint-N dir (LoRA attached to its base model), or a
diffusers-layout folder (our export or an official Helios-Base/Mid/Distilled download). Sampling is
diffusers' own HeliosPipeline (Base) / HeliosPyramidPipeline (Mid, Distilled) — no second sampler.
Defaults per variant follow the official scripts (helios_train/model/variants.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from helios_train.runtime.progress import chunk_progress
from helios_train.runtime.prompt_file import InputError, read_prompt_lines
from helios_train.model.variants import (DEFAULTS, NEGATIVE_PROMPT, SINGLE_LEVEL, SamplerSettings, build_pipeline,
                                         call_kwargs, contiguous_transformer_output, round_frames,
                                         use_float64_block_noise, without_history)

log = logging.getLogger(__name__)
FPS = 24


def detect_variant(folder: Path) -> str:
    index = json.loads((folder / "model_index.json").read_text())
    if (folder / "helios_export.json").is_file():
        return json.loads((folder / "helios_export.json").read_text())["variant"]
    if index["_class_name"] == "HeliosPipeline":
        return "base"
    return "distilled" if index.get("is_distilled") else "mid"


def load_pipeline(checkpoint, variant: str | None = None, dtype=torch.float32, device="cpu"):
    """(pipeline, variant) from a diffusers folder or a training checkpoint (adapters attached)."""
    path = Path(checkpoint)
    if (path / "model_index.json").is_file():
        saved = detect_variant(path)
        variant = variant or saved
        from helios_train.model.variants import pipeline_class, sample_as

        # The VAE stays fp32 whatever the dtype (every official script); the transformer keeps its
        # fp32 modules itself (`_keep_in_fp32_modules`).
        pipe = pipeline_class(variant).from_pretrained(path, dtype={"default": dtype, "vae": torch.float32})
        use_float64_block_noise(pipe)
        contiguous_transformer_output(pipe.transformer)  # what build_pipeline does for the other path
        if variant == "t2v":
            without_history(pipe.transformer)
        if variant != saved:  # e.g. --variant distilled on a Mid folder: the few-step sampler on Mid weights
            sample_as(pipe, variant)
        return pipe.to(device), variant
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    from helios_train.sampling.export import load_trained_transformer, resolve_checkpoint, run_config
    from helios_train.model.loading import cast_weights

    src = resolve_checkpoint(path)
    cfg = run_config(src)
    variant = variant or cfg.stage.name
    # The trained tensors (fp32) are cast with the base, fp32-kept modules excepted, so the pipeline's
    # inputs (cast to transformer.dtype) match every weight without autocast, as after from_pretrained.
    transformer = cast_weights(load_trained_transformer(src, cfg=cfg), dtype)
    root = Path(cfg.model.path)
    pipe = build_pipeline(
        variant, transformer,
        AutoencoderKLWan.from_pretrained(root, subfolder="vae", dtype=torch.float32),  # VAE stays fp32
        UMT5EncoderModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype),
        AutoTokenizer.from_pretrained(root, subfolder="tokenizer"),
    )
    return pipe.to(device), variant


def write_mp4(frames: np.ndarray, path: Path, fps: int = FPS) -> None:
    """frames [F, H, W, 3] float in [0, 1] or uint8 → h264 mp4."""
    from helios_train.data.video_io import encode_mp4

    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    path.write_bytes(encode_mp4(frames, fps))


def warn_if_resized(flag: str, path: str, size: tuple[int, int], width: int, height: int) -> None:
    """The pipelines take inputs at the output size: say so when an --image / --video is resized (its aspect
    ratio may change), instead of resizing it without a word."""
    if size != (width, height):
        log.warning("%s %s is %dx%d: resized to %dx%d (the output size, --width/--height)%s", flag, path, *size,
                    width, height, "; its aspect ratio changes" if size[0] * height != size[1] * width else "")


def read_image(path: str, width: int, height: int):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            warn_if_resized("--image", path, img.size, width, height)
            return img.convert("RGB").resize((width, height))
    except (OSError, UnidentifiedImageError) as exn:
        raise InputError(f"--image {path}: not a readable image ({exn})") from None


def read_video_frames(path: str, width: int, height: int) -> list:
    import decord
    from PIL import Image

    if not Path(path).is_file():
        raise InputError(f"--video {path}: no such file")
    try:
        reader = decord.VideoReader(path)
        frames = reader.get_batch(list(range(len(reader)))).asnumpy()
    except Exception as exn:  # decord raises its own DECORDError for undecodable input
        raise InputError(f"--video {path}: not a decodable video ({exn})") from None
    if len(frames) == 0:
        raise InputError(f"--video {path}: has no frames")
    warn_if_resized("--video", path, (frames.shape[2], frames.shape[1]), width, height)
    return [Image.fromarray(f) for f in frames]


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:n] or "prompt"


def generate(pipe, variant: str, prompt: str, settings: SamplerSettings, num_frames: int, height: int, width: int,
             seed: int, negative_prompt: str | None = NEGATIVE_PROMPT, image=None, video=None) -> np.ndarray:
    generated, returned = round_frames(num_frames)
    if generated != num_frames:
        log.warning("num_frames=%d is not a multiple of 33: generating %d frames (%d chunks), returning %d "
                    "after the 4n+1 trim", num_frames, generated, generated // 33, returned)
    kwargs = call_kwargs(variant, settings)
    if image is not None:
        kwargs["image"] = image
    if video is not None:
        kwargs["video"] = video
    out = pipe(prompt=prompt, negative_prompt=negative_prompt, height=height, width=width, num_frames=generated,
               generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    return out.frames[0]


@dataclass
class InferenceConfig:
    """One inference job (`helios_train.infer(...)`, `python -m helios_train infer ...`)."""

    checkpoint: str
    prompts: list[str] = field(default_factory=list)
    out: str = "outputs/infer"
    variant: Optional[str] = None  # base | mid | distilled; default: the checkpoint's
    negative_prompt: str = NEGATIVE_PROMPT
    image: Optional[str] = None  # I2V: the first image
    video: Optional[str] = None  # V2V: the conditioning video
    num_frames: int = 99
    height: int = 384
    width: int = 640
    steps: Optional[int] = None  # Base: denoising steps (default 50)
    pyramid_steps: Optional[list[int]] = None  # Mid / Distilled: steps per pyramid level
    guidance: Optional[float] = None  # default per variant
    cfg_zero_star: Optional[bool] = None
    seed: int = 42
    dtype: str = "auto"  # fp32 | bf16 | auto (bf16 on CUDA)


def _inputs(job: InferenceConfig):
    """Every input read and checked before the pipeline loads (minutes at 14B): a bad path fails in a second."""
    if not job.prompts:
        raise InputError("give at least one prompt (--prompt or --prompt-file)")
    if job.image and job.video:
        raise InputError("give --image (I2V) or --video (V2V), not both")
    image = read_image(job.image, job.width, job.height) if job.image else None
    video = read_video_frames(job.video, job.width, job.height) if job.video else None
    return image, video


def _settings(job: InferenceConfig, variant: str, pipe) -> SamplerSettings:
    s = SamplerSettings(**asdict(DEFAULTS[variant]))
    s.num_inference_steps = job.steps or s.num_inference_steps
    s.pyramid_steps = list(job.pyramid_steps) if job.pyramid_steps else s.pyramid_steps
    s.guidance_scale = s.guidance_scale if job.guidance is None else job.guidance
    if job.cfg_zero_star is not None and variant not in SINGLE_LEVEL:
        s.cfg_zero_star = job.cfg_zero_star
        pipe.register_to_config(is_cfg_zero_star=job.cfg_zero_star)
    return s


def run_inference(job: InferenceConfig, inputs: Optional[tuple] = None) -> list[Path]:
    """Render every prompt of `job` into `<out>/<nnn>_<prompt>.mp4` + its settings JSON; returns the mp4 paths.
    `inputs`: the (image, video) `_inputs` already read, else read here."""
    image, video = inputs if inputs is not None else _inputs(job)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = job.dtype if job.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    pipe, variant = load_pipeline(job.checkpoint, job.variant, torch.bfloat16 if dtype == "bf16" else torch.float32,
                                  device)
    s = _settings(job, variant, pipe)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    bar = tqdm(total=len(job.prompts) * (round_frames(job.num_frames)[0] // 33), desc="chunks generated", unit="chunk")
    for i, prompt in enumerate(job.prompts):
        with chunk_progress(pipe.vae, bar):
            frames = generate(pipe, variant, prompt, s, job.num_frames, job.height, job.width, job.seed + i,
                              job.negative_prompt, image, video)
        path = out / f"{i:03d}_{slug(prompt)}.mp4"
        write_mp4(frames, path)
        settings = {"prompt": prompt, "variant": variant, "checkpoint": str(job.checkpoint), "seed": job.seed + i,
                    "task": "i2v" if image is not None else "v2v" if video is not None else "t2v",
                    "frames": int(frames.shape[0]), "height": job.height, "width": job.width, "fps": FPS, **asdict(s)}
        path.with_suffix(".json").write_text(json.dumps(settings, indent=2))
        tqdm.write(f"wrote {path} ({frames.shape[0]} frames)")
        written.append(path)
    bar.close()
    return written


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--variant", choices=["t2v", "base", "mid", "distilled"], help="default: from the checkpoint")
    ap.add_argument("--prompt", action="append", default=[], help="repeat for several prompts")
    ap.add_argument("--prompt-file", help="one prompt per line")
    ap.add_argument("--negative-prompt", default=NEGATIVE_PROMPT)
    ap.add_argument("--image", help="I2V: first image")
    ap.add_argument("--video", help="V2V: conditioning video")
    ap.add_argument("--num-frames", type=int, default=99)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--steps", type=int, help="Base: denoising steps (default 50)")
    ap.add_argument("--pyramid-steps", type=int, nargs=3, help="Mid/Distilled: steps per pyramid level")
    ap.add_argument("--guidance", type=float, help="guidance scale (default per variant)")
    ap.add_argument("--cfg-zero-star", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "auto"], default="auto", help="auto: bf16 on CUDA, else fp32")
    ap.add_argument("--out", default="outputs/infer")
    a = ap.parse_args(argv)
    try:
        prompts = list(a.prompt) + ([p for _, p in read_prompt_lines(a.prompt_file, "--prompt-file")]
                                    if a.prompt_file else [])
        job = InferenceConfig(a.checkpoint, prompts, a.out, a.variant, a.negative_prompt, a.image, a.video,
                              a.num_frames, a.height, a.width, a.steps, a.pyramid_steps, a.guidance, a.cfg_zero_star,
                              a.seed, a.dtype)
        inputs = _inputs(job)
    except InputError as bad:
        ap.error(str(bad))
    return run_inference(job, inputs)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
