"""ODE pairs for the Distilled stage's ODE-regression phase (official tools/offload_data/get_ode-pairs.py,
helios/pipelines/pipeline_helios_ode.py).

    python -m data_prep.ode_pairs --teacher exports/mid --prompts prompts.txt --out data/ode \\
        [--num-chunks 5 --height 384 --width 640 --guidance 5.0 --steps 20 20 20 --student-steps 2 2 2 \\
         --per-shard 100 --seed 42 --shard-index 0 --num-shards-total 1]

The teacher (a Mid export, a Mid training checkpoint or an official Helios-Mid folder) samples each
prompt autoregressively over `--num-chunks` chunks (its own outputs as history) with diffusers'
`HeliosPyramidPipeline`: [20, 20, 20] UniPC, classic CFG 5.0 with Wan's negative prompt (no
CFG-Zero*), linear dynamic shift — the official ODE settings. Its scheduler is
`helios_train.sampling.ode_trajectory.TrajectoryRecorder`, which makes the trajectory pass exactly through the
student's timesteps and records the states there plus each level's end state.

Shard layout (no pickles; one sample per prompt, key `<prompts stem>_<line:05d>`):
`prompt_embed.npy` float32 [L, D], `json` {caption, num_chunks, levels, teacher settings}, and per chunk
c, level k: `c{c}_s{k}.latents.npy` float32 [n+1, C, 9, h_k, w_k], `c{c}_s{k}.timesteps.npy` [n].
Train on them with `experiment=stage_3_ode data=ode_pairs data.shards=...`.

Several machines: give each a `--shard-index i --num-shards-total N`; prompts are split by line
(prompt j goes to machine j mod N), shard names carry the index so outputs never collide.
Shards are written by helios_train/data/shard_writer.py: complete or not at all, kept on a re-run only while
their prompts, the teacher's files and every setting are unchanged.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from tqdm import tqdm

from helios_train.data.encode_latents import _npy
from helios_train.data.shard_writer import ShardWriter, folder_fingerprint, run_tool, text_fingerprint
from helios_train.model.loading import torch_dtype

log = logging.getLogger(__name__)


def load_teacher(teacher: str, device: str, dtype=torch.float32, student_steps=(2, 2, 2), mu_from: str = "level"):
    """The Mid pipeline with the recording scheduler and plain CFG (ODE pairs use no CFG-Zero*)."""
    from helios_train.sampling.infer import load_pipeline
    from helios_train.sampling.ode_trajectory import recording_scheduler

    pipe, variant = load_pipeline(teacher, variant="mid", dtype=dtype, device=device)
    pipe.register_to_config(is_cfg_zero_star=False, is_distilled=False)
    pipe.scheduler = recording_scheduler(student_steps, amplify_first_chunk=True, mu_from=mu_from)
    return pipe


def record_prompt(pipe, prompt: str, negative: str, num_chunks: int, height: int, width: int, steps, guidance: float,
                  seed: int, max_length: int = 512) -> tuple[torch.Tensor, list[list[dict]]]:
    """(prompt embedding [L, D], per chunk per level {"latents" [n+1, C, 9, h, w], "timesteps" [n]})."""
    from helios_train.model.text_codec import encode_prompts

    device = pipe.transformer.device
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompt, negative], max_length, device)
    from helios_train.sampling.ode_trajectory import skip_pixel_decode

    pipe.scheduler.chunks = []
    with skip_pixel_decode(pipe):
        pipe(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], height=height, width=width,
             num_frames=num_chunks * 33, guidance_scale=guidance, pyramid_num_inference_steps_list=list(steps),
             use_zero_init=False, generator=torch.Generator().manual_seed(seed), output_type="latent")
    chunks = pipe.scheduler.chunks
    if len(chunks) != num_chunks:
        raise RuntimeError(f"teacher produced {len(chunks)} chunks, expected {num_chunks}")
    per_chunk = [[{"latents": lv["latents"][:, 0], "timesteps": lv["timesteps"]} for lv in levels] for levels in chunks]
    return embeds[0].float().cpu(), per_chunk


def sample_members(key: str, prompt: str, embed: torch.Tensor, chunks: list[list[dict]], settings: dict) -> dict:
    sample = {"__key__": key, "prompt_embed.npy": _npy(embed.numpy().astype(np.float32)),
              "json": json.dumps({"caption": prompt, "num_chunks": len(chunks), "levels": len(chunks[0]),
                                  **settings}).encode()}
    for c, levels in enumerate(chunks):
        for k, level in enumerate(levels):
            sample[f"c{c}_s{k}.latents.npy"] = _npy(level["latents"].numpy().astype(np.float32))
            sample[f"c{c}_s{k}.timesteps.npy"] = _npy(level["timesteps"].numpy().astype(np.float32))
    return sample


def make_ode_pairs(teacher, prompts_file, out_dir, num_chunks=5, height=384, width=640, steps=(20, 20, 20),
                   student_steps=(2, 2, 2), guidance=5.0, per_shard=100, seed=42, shard_index=0,
                   num_shards_total=1, device="cpu", mu_from="level", max_length=512, dtype="fp32") -> dict:
    from helios_train.model.variants import NEGATIVE_PROMPT

    from helios_train.runtime.prompt_file import read_prompt_lines

    prompts_file, out = Path(prompts_file), Path(out_dir)
    lines = read_prompt_lines(prompts_file, "--prompts")  # fails naming the file before the teacher loads
    if height % 64 or width % 64:
        raise ValueError(f"--height/--width {height}x{width}: must be multiples of 64 pixels (VAE ×8, pyramid ×4, patch ×2)")
    if not 0 <= shard_index < num_shards_total:
        raise ValueError(f"--shard-index {shard_index} not in [0, --num-shards-total={num_shards_total})")
    out.mkdir(parents=True, exist_ok=True)
    items = [(f"{prompts_file.stem}_{i:05d}", p) for i, p in lines][shard_index::num_shards_total]
    groups = [items[i: i + per_shard] for i in range(0, len(items), per_shard)]
    settings = {"teacher": str(teacher), "steps": list(steps), "student_steps": list(student_steps),
                "guidance_scale": guidance, "height": height, "width": width, "seed": seed, "mu_from": mu_from,
                "dtype": dtype}
    writer = ShardWriter(out, "ode_pairs", {**settings, "num_chunks": num_chunks, "per_shard": per_shard,
                                            "max_length": max_length, "teacher_files": folder_fingerprint(teacher)},
                         part=f"{shard_index:03d}" if num_shards_total > 1 else None)
    pipe = None
    bar = tqdm(total=len(items), desc="ode prompts", unit="prompt")
    for g, group in enumerate(groups):
        name, inputs = f"ode-{shard_index:03d}-{g:06d}.tar", text_fingerprint(group)
        if writer.up_to_date(name, inputs):
            bar.update(len(group))
            continue
        pipe = pipe or load_teacher(teacher, device, torch_dtype(dtype), student_steps=student_steps, mu_from=mu_from)
        with writer.shard(name, inputs) as sink:
            for key, prompt in group:
                # Per-prompt seed from the line key: the same prompt gets the same trajectory on any machine.
                prompt_seed = seed + int(key.rsplit("_", 1)[1])
                embed, chunks = record_prompt(pipe, prompt, NEGATIVE_PROMPT, num_chunks, height, width, steps,
                                              guidance, prompt_seed, max_length)
                sink.write(sample_members(key, prompt, embed, chunks, {**settings, "seed": prompt_seed}))
                bar.update()
    bar.close()
    return writer.finish()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="Mid export / checkpoint / official Helios-Mid folder")
    ap.add_argument("--prompts", required=True, help="text file, one prompt per line")
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-chunks", type=int, default=5, help="33-frame chunks per prompt (official 165 frames = 5)")
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--steps", type=int, nargs=3, default=[20, 20, 20], help="teacher steps per pyramid level")
    ap.add_argument("--student-steps", type=int, nargs=3, default=[2, 2, 2], help="distilled sampler steps per level")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--per-shard", type=int, default=100)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--shard-index", type=int, default=0)
    ap.add_argument("--num-shards-total", type=int, default=1)
    ap.add_argument("--mu-from", choices=["level", "previous"], default="level",
                    help="linear shift μ from the level's tokens (official ODE code) or the previous level's (diffusers)")
    ap.add_argument("--text-max-length", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if torch.cuda.is_available() else "fp32",
                    help="teacher transformer / text encoder dtype (the VAE stays fp32); official: bf16")
    a = ap.parse_args(argv)
    return run_tool(lambda: make_ode_pairs(a.teacher, a.prompts, a.out, a.num_chunks, a.height, a.width, a.steps,
                                 a.student_steps, a.guidance, a.per_shard, a.seed, a.shard_index, a.num_shards_total,
                                 a.device, a.mu_from, a.text_max_length, a.dtype))


if __name__ == "__main__":
    main()
