"""A stage's declared roles (helios_train/runtime/roles.py) → what the trainer steps and the stage calls: an
optimizer and LR schedule for each trainable role, prepared by the backend, and a frozen handle for the others
(a role sharing another's module is not prepared twice)."""
from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler


def build_optimizer(params, optim_cfg, max_steps: int, foreach: bool | None = None, update_every: int = 1):
    """AdamW and its LR schedule. The scheduler steps once per optimizer update; a role that updates once
    every `update_every` training steps gets a schedule of ceil(max_steps / update_every) updates with a
    warm-up of ceil(warmup_steps / update_every) updates, i.e. both measured in training steps."""
    # foreach None = torch's default (the multi-tensor kernels on CUDA); the dry run asks for them on
    # its CPU fake tensors so that it measures the optimizer step a GPU runs.
    opt = torch.optim.AdamW(
        params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay, eps=optim_cfg.eps,
        foreach=foreach,
    )
    sched = get_scheduler(
        str(optim_cfg.lr_scheduler), opt, num_warmup_steps=-(-optim_cfg.warmup_steps // update_every),
        num_training_steps=-(-max_steps // update_every),
    )
    return opt, sched


def prepare_roles(specs: dict, backend, max_steps: int, optimizer_foreach: bool | None = None) -> dict:
    """Every declared role, in declaration order: PreparedRole (trainable) or FrozenRole."""
    roles = {}
    for name, spec in specs.items():
        if spec.trainable:
            params = [p for p in spec.module.parameters() if p.requires_grad]
            opt, sched = build_optimizer(params, spec.optim, max_steps, optimizer_foreach, spec.update_every)
            roles[name] = backend.prepare(name, spec.module, opt, sched, spec.optim.max_grad_norm, calls=spec.calls)
        else:
            if spec.shares is not None and spec.shares not in specs:
                raise ValueError(f"role {name!r} shares {spec.shares!r}, which the stage does not declare")
            roles[name] = backend.prepare_frozen(name, spec.module, spec.adapters, shared=spec.shares is not None)
    return roles
