"""Random task dropout: one model trained on T2V, I2V and V2V contexts.

The official code (helios/utils/utils_helios_base.py, ``prepare_stage1_clean_input_from_latents``)
draws sequentially and **once per call**, i.e. one task for the whole micro-batch:

1. p = t2v_ratio: zero the x0 anchor and the whole history (T2V);
2. otherwise p = i2v_ratio: zero all history frames but the newest, keep x0 (I2V-like);
3. otherwise p = v2v_ratio: zero the oldest (Σsizes mod window) + k·window frames, k drawn from
   v2v_k_choices (1, 10 or 19 frames for the defaults; 19 leaves the anchor only), keep x0.

"Oldest first" on the oldest → newest history tensor is exactly "long, then mid, then short".
Stage 1 (t2v 0.4, v2v 0.4): T2V 0.40 / I2V 0 / V2V 0.24 / none 0.36; stage 3 (v2v 0.5): .40/0/.30/.30.

Deliberate differences: draws come from an explicit generator (the official code mixes the
global torch RNG and Python's ``random``); ``per_sample`` (off by default) draws a task per sample;
inputs are never modified in place (the official code zeroes views of the loader's tensor).
"""
from __future__ import annotations

import torch

from helios_train.config.mechanisms import TaskDropoutConfig  # noqa: F401  (the schema's; re-exported)

TASKS = ("t2v", "i2v", "v2v", "none")


def _uniform(generator: torch.Generator, n: int) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device).cpu()


def apply_task_dropout(
    x0: torch.Tensor,
    history: torch.Tensor,
    cfg: TaskDropoutConfig,
    generator: torch.Generator,
    latent_window_size: int = 9,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Zero context according to a drawn task; returns (x0, history, task per sample).

    x0 [B,C,1,h,w], history [B,C,T,h,w] oldest → newest. Task labels are from ``TASKS``.
    """
    b, t = history.shape[0], history.shape[2]
    if not cfg.enabled:
        return x0, history, ["none"] * b
    n = b if cfg.per_sample else 1
    # Always draw all four uniforms so the generator advances the same way whatever happens.
    u_t2v, u_i2v, u_v2v = _uniform(generator, n), _uniform(generator, n), _uniform(generator, n)
    choices = [int(k) for k in cfg.v2v_k_choices]
    if not choices:
        raise ValueError("v2v_k_choices must not be empty")
    k_index = torch.randint(len(choices), (n,), generator=generator, device=generator.device).cpu()

    # `<` instead of the official `<=`: equal for continuous draws, and ratio 0 never fires, which
    # the official code ensures with its `ratio != 0` guards.
    t2v = u_t2v < cfg.t2v_ratio
    i2v = ~t2v & (u_i2v < cfg.i2v_ratio)
    v2v = ~t2v & ~i2v & (u_v2v < cfg.v2v_ratio)
    tail = t % latent_window_size
    v2v_drop = torch.tensor([tail + choices[int(i)] * latent_window_size for i in k_index])

    drop = torch.zeros(n, dtype=torch.long)
    drop = torch.where(t2v, torch.full_like(drop, t), drop)
    drop = torch.where(i2v, torch.full_like(drop, max(0, t - 1)), drop)
    drop = torch.where(v2v, v2v_drop.clamp(max=t), drop)
    drop, t2v = drop.expand(b), t2v.expand(b)

    frame = torch.arange(t)
    keep_hist = (frame[None, :] >= drop[:, None]).to(history.device)  # [B, T]: the oldest `drop` go
    history = torch.where(keep_hist[:, None, :, None, None], history, history.new_zeros(()))
    keep_x0 = (~t2v).to(x0.device)[:, None, None, None, None]
    x0 = torch.where(keep_x0, x0, x0.new_zeros(()))

    labels = []
    for i in range(b):
        j = i if cfg.per_sample else 0
        labels.append("t2v" if t2v[j] else "i2v" if i2v[j] else "v2v" if v2v[j] else "none")
    return x0, history, labels
