"""DeepSpeed ZeRO-2 / ZeRO-3 backend: one engine per role (DMD: generator and critic each their own).

The DeepSpeed config is generated from ours — micro batch (`data.batch_size`), accumulation,
clipping (`trainer.optim.max_grad_norm`: the official runs clipped at zero2.json's hard-coded 1.0
whatever the yaml said, spec §1.6 — set 1.0 to match), bf16 — so there is one source of truth;
`launcher.deepspeed_config` (a JSON file) is merged on top for anything else. Our torch AdamW and
LR scheduler are handed to DeepSpeed as client objects, which also avoids its fused-optimizer JIT
build; the shm comm-op JIT build is skipped on CPU (ENV_NOTES).

Non-finite losses: DeepSpeed has no skip for bf16/fp32 steps, so a non-finite loss is caught
*before* backward and its micro-batch contributes nothing (zero loss); with one micro-batch per step
(stages 2–3) the whole update is skipped. A non-finite gradient norm after a step cannot be undone
and stops the run (resume from the last checkpoint).
"""
from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path

import torch

from helios_train.backends.base import Backend, PreparedRole

ENV_DEFAULTS = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512"}


def ds_config(launcher_cfg, trainer_cfg, data_cfg, world_size: int, max_grad_norm: float) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": data_cfg.batch_size,
        "gradient_accumulation_steps": trainer_cfg.grad_accum_steps,
        "train_batch_size": data_cfg.batch_size * trainer_cfg.grad_accum_steps * world_size,
        "gradient_clipping": max_grad_norm or 0.0,
        "bf16": {"enabled": trainer_cfg.mixed_precision == "bf16"},
        "zero_optimization": {
            "stage": launcher_cfg.zero_stage,
            "overlap_comm": False,
            "contiguous_gradients": True,
            "reduce_bucket_size": 5e8,
            "allgather_bucket_size": 5e8,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if launcher_cfg.offload_optimizer:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if launcher_cfg.deepspeed_config:
        user = json.loads(Path(launcher_cfg.deepspeed_config).read_text())
        cfg = _merge(cfg, user)
    return cfg


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, launcher_cfg, trainer_cfg, data_cfg=None):
        for key, value in ENV_DEFAULTS.items():  # in-process world size 1 (otherwise it asks for mpi4py)
            os.environ.setdefault(key, value)
        super().__init__(launcher_cfg, trainer_cfg)
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Skip the shm comm-op JIT build (~30 s): gloo is enough for CPU runs. Fetched through
        # importlib because `import deepspeed.comm.torch as m` binds the wrong object (ENV_NOTES).
        comm_torch = importlib.import_module("deepspeed.comm.torch")
        comm_torch.build_shm_op = lambda: None
        import deepspeed

        self.deepspeed = deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.trainer_cfg = trainer_cfg
        self.data_cfg = data_cfg
        self.engines = []

    def prepare(self, name, module, optimizer, scheduler, max_grad_norm, multi_forward: bool = False) -> PreparedRole:
        params = [p for p in module.parameters() if p.requires_grad]
        config = ds_config(self.launcher_cfg, self.trainer_cfg, self.data_cfg, self.world_size, max_grad_norm)
        engine, ds_opt, _, ds_sched = self.deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, model_parameters=params, config=config)
        self.engines.append(engine)
        role = PreparedRole(name, module, engine, ds_opt, ds_sched or scheduler, max_grad_norm, params)
        role.nonfinite = False
        return role

    def backward(self, role: PreparedRole, loss: torch.Tensor) -> None:
        engine = role.model
        finite = self.all_sum_int(int(not torch.isfinite(loss.detach()).all())) == 0
        if not finite:
            role.nonfinite = True
            loss = loss.nan_to_num(0.0, 0.0, 0.0) * 0.0  # keeps DeepSpeed's accumulation bookkeeping intact
        engine.backward(loss, scale_wrt_gas=False)  # the trainer already divided by the accumulation count
        if not engine.is_gradient_accumulation_boundary():
            engine.step()  # DeepSpeed counts micro-steps in step(); it only updates at the boundary

    def grad_norm_and_step(self, role: PreparedRole) -> tuple[float, bool]:
        engine = role.model
        if role.nonfinite and self.trainer_cfg.grad_accum_steps == 1:
            role.nonfinite = False
            engine.zero_grad()
            return float("nan"), False  # skipped: no step, DeepSpeed state untouched
        skipped_part = role.nonfinite
        role.nonfinite = False
        engine.step()
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if norm == norm and not math.isfinite(norm):
            raise FloatingPointError(f"{role.name}: non-finite gradient norm {norm} after a DeepSpeed step; "
                                     "resume from the last checkpoint")
        return norm, not skipped_part

    def current_lr(self, role: PreparedRole) -> float:
        return role.model.get_lr()[0]

    def barrier(self) -> None:
        torch.distributed.barrier()

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone().float()
        torch.distributed.all_reduce(value)
        return value / self.world_size

    def all_max(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone().float()
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return value

    def all_sum_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long)
        torch.distributed.all_reduce(t)
        return int(t.item())

    def save_role(self, role: PreparedRole, directory: Path) -> None:
        # Every rank writes its ZeRO shards; rank 0 also writes the plain trainable tensors for export.
        role.model.save_checkpoint(str(directory / f"{role.name}.deepspeed"), tag="state", save_latest=False,
                                   exclude_frozen_parameters=True)
        if self.launcher_cfg.zero_stage == 3:
            state = role.model._zero3_consolidated_16bit_state_dict() or {}
            if self.is_main:
                from safetensors.torch import save_file

                names = {n for n, p in role.module.named_parameters() if p.requires_grad}
                save_file({k: v.float().contiguous() for k, v in state.items() if k in names},
                          str(directory / f"{role.name}.trainable.safetensors"))
        elif self.is_main:
            from helios_train import checkpoint as ckpt

            ckpt.save_trainables(role.module, directory / f"{role.name}.trainable.safetensors")

    def load_role(self, role: PreparedRole, directory: Path) -> None:
        role.model.load_checkpoint(str(directory / f"{role.name}.deepspeed"), tag="state",
                                   load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True)

    def shutdown(self) -> None:
        for engine in self.engines:
            engine.destroy()  # ZeRO-3 aborts at interpreter exit otherwise
        self.engines = []
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
