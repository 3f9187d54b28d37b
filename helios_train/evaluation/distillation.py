"""How close a few-step student is to its teacher: the RMS latent distance of the Distilled sampler's samples (no
guidance) to the Mid teacher's [20,20,20] CFG samples on the same prompts and seeds — before distillation (the Mid
weights with the few-step sampler), after the ODE phase, after DMD. Used by the toy pipeline check
(helios_train/pipeline_check.py) and the miniature (helios_train/miniature.py)."""
from __future__ import annotations

import torch

# Few-step schedules the distance is measured with: (steps per level, amplified first chunk).
SCHEDULES = {"[1,1,1]": ([1, 1, 1], False), "[2,2,2]": ([2, 2, 2], False), "[2,2,2] amplified": ([2, 2, 2], True)}


@torch.no_grad()
def distance_to_teacher(teacher: str, students: dict[str, str], prompts: list[str], height: int, width: int,
                        teacher_steps=(20, 20, 20), guidance: float = 5.0, seeds=(100, 101)) -> dict[str, dict[str, float]]:
    """RMS latent distance of each few-step student to the Mid teacher's CFG samples, one chunk, averaged over
    prompts × seeds (seeds differ from the ODE pairs', so these are not training trajectories).

    The teacher is exactly the ODE pairs' (classic CFG, linear shift, per-level μ) and the students sample with
    the μ they were trained with (LevelMuDMDScheduler). Per schedule: [1,1,1] is one jump per level from the
    level's start (what the ODE regression trains most directly); [2,2,2] is the later chunks' schedule;
    "amplified" the first chunk's (4 steps per level). Returns {schedule: {student: d}}."""
    from helios_train.model.variants import NEGATIVE_PROMPT
    from helios_train.sampling.infer import load_pipeline
    from helios_train.sampling.ode_pair_capture import load_teacher
    from helios_train.sampling.ode_trajectory import LevelMuDMDScheduler, skip_pixel_decode

    def sample(pipe, prompt, seed, **kw):
        with skip_pixel_decode(pipe):
            out = pipe(prompt=prompt, negative_prompt=NEGATIVE_PROMPT, height=height, width=width, num_frames=33,
                       generator=torch.Generator().manual_seed(seed), output_type="latent", **kw)
        return out.frames.float()

    pipe = load_teacher(teacher, "cpu")
    targets = {(p, s): sample(pipe, p, s, pyramid_num_inference_steps_list=list(teacher_steps),
                              guidance_scale=guidance, use_zero_init=False)
               for p in prompts for s in seeds}
    result: dict[str, dict[str, float]] = {name: {} for name in SCHEDULES}
    for student, export in students.items():
        pipe, _ = load_pipeline(export, "distilled")
        pipe.scheduler = LevelMuDMDScheduler.from_config(pipe.scheduler.config)
        for name, (steps, amplify) in SCHEDULES.items():
            d = [torch.sqrt(torch.mean((sample(pipe, p, s, pyramid_num_inference_steps_list=steps, guidance_scale=1.0,
                                               is_amplify_first_chunk=amplify) - target) ** 2))
                 for (p, s), target in targets.items()]
            result[name][student] = float(torch.stack(d).mean())
    return result
