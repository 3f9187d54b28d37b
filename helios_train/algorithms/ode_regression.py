"""ODE regression (official `stage_3_ode.yaml`, `_ode_regression_loss`): the student jumps from a teacher state
to the level's end.

For each sample, `num_chunks` random chunks of the teacher's rollout (3 of 5 officially); for each
chunk and pyramid level k one random recorded state x_t (at its stored t) is fed to the student
with the teacher's own history (its final clean latents of the previous chunks, no corruption, no
task dropout; anchor x0 = first latent of chunk 0, zero for chunk 0). The student's x̂ = x_t − σ_k·v
is regressed onto the level's end state (the stage-local "x0", not the final video for k < 2):
0.5·MSE per term, mean over terms, × `weight` (80). σ_k is the nearest entry of level k's table
shifted by μ of the level's resolution, as official `_ode_regression_loss` looks it up through
`convert_flow_pred_to_x0` (helios/utils/utils_helios_post.py; helios_train/algorithms/sigma_table.py). The
student runs without guidance: the teacher's CFG is baked into its targets.

The student gets the recorded float timestep, as the official loss feeds it (the teacher saw it
truncated to int64 while the pair was recorded, helios/pipelines/pipeline_helios_ode.py).
"""
from __future__ import annotations

from typing import Callable

import torch

from helios_train.algorithms.history import HistoryConfig, assemble_history_sample
from helios_train.algorithms.sigma_table import sigma_of
from helios_train.algorithms.timesteps import calculate_mu
from helios_train.algorithms.timesteps import seq_len_for
from helios_train.config.mechanisms import OdeConfig  # noqa: F401  (the schema's; re-exported)

# velocity(model_input x_t, t [B], x0, history) -> v  (prompt embeddings bound by the caller)
Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def chunks_in(batch: dict) -> int:
    return batch["ode_clean"].shape[1]


def teacher_history(batch: dict, chunk: int, cfg: HistoryConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 [B,C,1,H,W], history [B,C,Σ,H,W]) for `chunk` from the teacher's own clean chunks."""
    parts = [assemble_history_sample(clean, chunk, cfg) for clean in batch["ode_clean"]]
    x0 = torch.stack([p[0] for p in parts]) if cfg.keep_x0 else None
    return x0, torch.stack([p[1] for p in parts])


def pick(batch: dict, cfg: OdeConfig, generator: torch.Generator) -> list[tuple[int, int, int]]:
    """(chunk, level, state index) terms of one step, drawn from `generator` (same for the whole batch)."""
    n = chunks_in(batch)
    if n < cfg.num_chunks:
        raise ValueError(f"ODE samples have {n} chunks, stage.ode.num_chunks={cfg.num_chunks}")
    chunks = sorted(torch.randperm(n, generator=generator)[: cfg.num_chunks].tolist())
    terms = []
    for c in chunks:
        for k in range(cfg.levels):
            states = batch[f"ode_c{c}_s{k}_timesteps"].shape[1]
            terms.append((c, k, int(torch.randint(states, (1,), generator=generator))))
    return terms


def ode_regression_loss(velocity: Velocity, batch: dict, cfg: OdeConfig, history_cfg: HistoryConfig,
                        generator: torch.Generator, scheduler=None, device=None, patch=(1, 2, 2)
                        ) -> tuple[torch.Tensor, dict]:
    terms, losses = pick(batch, cfg, generator), []
    for c, k, j in terms:
        x0, history = teacher_history(batch, c, history_cfg)
        latents = batch[f"ode_c{c}_s{k}_latents"].to(device)  # [B, n+1, C, 9, h, w]
        t = batch[f"ode_c{c}_s{k}_timesteps"][:, j].to(device)
        x_t, end = latents[:, j], latents[:, -1]
        mu = calculate_mu(seq_len_for(x_t.shape, patch))  # the level's own resolution, under the model's patch
        sigma = sigma_of(t, k, mu, scheduler).float().to(x_t.device).view(-1, 1, 1, 1, 1)
        # the recorded float timestep, as the official loss feeds it (not truncated to int64)
        v = velocity(x_t, t.float(), None if x0 is None else x0.to(device), history.to(device))
        x_hat = x_t - sigma * v.float()
        losses.append(0.5 * torch.mean((x_hat - end) ** 2))
    loss = cfg.weight * torch.stack(losses).mean()
    return loss, {"ode_terms": float(len(terms)), "ode_mse": float(torch.stack(losses).detach().mean() * 2)}
