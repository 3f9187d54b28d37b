"""In-loop validation (when: helios_train/training/callbacks/validation.py): rank 0 renders the configured prompts with the stage's sampler and logs them.

Sampling goes through diffusers' Helios pipelines (helios_train/model/variants.py) with the *live*
training transformer (LoRA attached, not fused), so what is logged is exactly what an export of
this step would produce. Besides the videos (W&B + `<run>/validation/step-N/`), a **drift curve**
is logged: per 33-frame chunk of the first prompt's rollout, mean brightness, saturation and
frame-to-frame change relative to chunk 0 — drift shows up as lines leaving 1.0.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from helios_train.model.variants import DEFAULTS, SamplerSettings, build_pipeline, round_frames
from helios_train.runtime.precision import forward_autocast, mixed_precision
from helios_train.runtime.progress import chunk_progress

TOKYO = ("A stylish woman walks down a Tokyo street filled with warm glowing neon and animated city signage. She "
         "wears a black leather jacket, a long red dress, and black boots, and carries a black purse.")


def drift_stats(frames: np.ndarray, chunk: int = 33) -> dict[str, list[float]]:
    """Per-chunk brightness, saturation, motion of frames [F, H, W, 3] in [0, 1], relative to chunk 0."""
    stats = {"brightness": [], "saturation": [], "motion": []}
    for k in range(max(1, -(-len(frames) // chunk))):  # the last chunk is shorter after the 4n+1 trim
        part = frames[k * chunk : (k + 1) * chunk].astype(np.float64)
        mx, mn = part.max(axis=-1), part.min(axis=-1)
        stats["brightness"].append(float(part.mean()))
        stats["saturation"].append(float(((mx - mn) / np.maximum(mx, 1e-6)).mean()))
        stats["motion"].append(float(np.abs(np.diff(part, axis=0)).mean()) if len(part) > 1 else 0.0)
    return {k: [v / (vals[0] if vals[0] else 1.0) for v in vals] for k, vals in stats.items()}


class Validator:
    def __init__(self, cfg, run_dir: Path, tracker, device):
        self.cfg = cfg
        self.vcfg = cfg.validation
        self.run_dir = run_dir
        self.tracker = tracker
        self.device = device
        self.variant = cfg.stage.name
        self._parts = None
        if self.vcfg.prompts is None or self.vcfg.height is None:
            raise ValueError("validation.prompts/height unresolved: call run_setup.resolve_validation_defaults first")

    def _components(self):
        if self._parts is None:
            from helios_train.model.loading import load_text_stack, load_vae

            tok, enc = load_text_stack(self.cfg.model, self.device)
            self._parts = (load_vae(self.cfg.model, self.device), enc, tok)
        return self._parts

    def settings(self) -> SamplerSettings:
        s = SamplerSettings(**asdict(DEFAULTS[self.variant]))
        v = self.vcfg
        s.num_inference_steps = v.steps or s.num_inference_steps
        s.pyramid_steps = list(v.pyramid_steps) if v.pyramid_steps else s.pyramid_steps
        s.guidance_scale = s.guidance_scale if v.guidance is None else v.guidance
        return s

    @torch.no_grad()
    def run(self, step: int, transformer, write: bool = True) -> dict:
        """Render the prompts. Under ZeRO-3 every rank calls this in lockstep (each forward gathers the
        sharded weights collectively) and only the one with `write` saves and logs the videos."""
        from helios_train.sampling.infer import generate, slug, write_mp4
        from helios_train.model.variants import NEGATIVE_PROMPT

        vae, enc, tok = self._components()
        was_training = transformer.training
        transformer.eval()
        pipe = build_pipeline(self.variant, transformer, vae, enc, tok)
        pipe.set_progress_bar_config(disable=True)
        out_dir = self.run_dir / "validation" / f"step-{step}"
        if write:
            out_dir.mkdir(parents=True, exist_ok=True)
        s, v = self.settings(), self.vcfg
        videos, drift = {}, None
        # The live model mixes bf16 frozen weights with fp32 trainables: only its forward runs under the
        # run's autocast, the VAE decode stays fp32.
        # One bar over every prompt's chunks (the pipeline's per-chunk step bars are off: they would
        # interleave with the training bar); rank 0 only under ZeRO-3 lockstep.
        bar = tqdm(total=len(v.prompts) * (round_frames(v.num_frames)[0] // 33), desc=f"validation step {step}",
                   unit="chunk", leave=False, disable=not write)
        try:
            with forward_autocast(transformer, self.device, mixed_precision(self.cfg)), chunk_progress(vae, bar):
                for i, prompt in enumerate(v.prompts):
                    frames = generate(pipe, self.variant, prompt, s, v.num_frames, v.height, v.width, v.seed + i,
                                      NEGATIVE_PROMPT)
                    if i == 0:
                        drift = drift_stats(frames)
                    if write:
                        videos[f"validation/video_{i}"] = out_dir / f"{i:02d}_{slug(prompt)}.mp4"
                        write_mp4(frames, videos[f"validation/video_{i}"])
        finally:
            bar.close()
            transformer.train(was_training)
        if not write:
            return {"videos": [], "drift": drift}
        (out_dir / "drift.json").write_text(json.dumps(drift, indent=1))
        self.tracker.log_media(step, videos, drift)
        return {"videos": [str(p) for p in videos.values()], "drift": drift}
