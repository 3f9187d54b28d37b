"""DeepSpeed ZeRO-2 / ZeRO-3 backend: one engine per role (DMD: generator and critic each their own).

Config: generated from ours, so there is one source of truth (`ds_config`):
- micro batch = `data.batch_size`, accumulation = `trainer.grad_accum_steps`, train batch = their
  product × world size (the trainer's loop runs exactly that many micro-batches per step, so a user
  JSON may not change them);
- `gradient_clipping` = the role's `max_grad_norm` (generator: `trainer.optim`, DMD critic: its own
  optim block). The official DeepSpeed runs clipped at zero2.json's hard-coded 1.0 whatever the yaml
  said (official `zero2.json`, e.g. stage 3's 10.0 was never applied); here the config value applies under every
  backend — set `trainer.optim.max_grad_norm=1.0` to reproduce the official DeepSpeed runs;
- precision: `trainer.mixed_precision=bf16` is the stage's bf16 autocast, exactly as under DDP, and
  DeepSpeed runs its fp32 path on the (fp32) trainable tensors. DeepSpeed's own `bf16.enabled` would
  cast *every* parameter to bf16 — LoRA weights and the fp32-kept modules (time embedder, norms,
  scale-shift tables, official `_keep_in_fp32_modules`) included — so the same config would train
  different numbers under DDP and DeepSpeed. Frozen weights stay in `model.weight_dtype`. A user JSON with
  `{"bf16": {"enabled": true}}` still gets DeepSpeed's bf16 mode (trainables bf16 + fp32 master).
- ZeRO stage (`launcher.zero_stage`), optional CPU offload of optimizer state (`offload_optimizer`,
  ZeRO-2/3) and of parameters (`offload_param`, ZeRO-3);
- `launcher.deepspeed_config` (a JSON file) is merged on top, key by key.

Optimizer: our torch AdamW and LR scheduler go in as client objects (the same maths as DDP, and no
fused-optimizer JIT build). With CPU offload DeepSpeed would refuse a client optimizer; we allow it
(`zero_force_ds_cpu_optimizer: false`: torch AdamW steps the CPU-resident fp32 partitions). A user
JSON that names an `"optimizer"` makes DeepSpeed build that one instead (e.g. its CPUAdam for offload,
a ~40 s JIT build on first use); our hyper-parameters fill any it leaves out and our LR schedule is
rebuilt on it. The shm comm-op JIT build (~30 s) is skipped on CPU: gloo is enough there.

Non-finite gradients: DeepSpeed (≥ 0.16 fp32 and bf16 paths) detects inf/NaN gradients across ranks,
skips the update and the LR-scheduler step and zeroes the gradients; `grad_norm_and_step` reports that
as a skipped step, like the other backends. If a DeepSpeed build ever *applies* a non-finite update
the run stops (resume from the last checkpoint) instead of training on corrupted weights.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import math
import os
import socket
from pathlib import Path

import torch

from safetensors.torch import load_file

from helios_train.backends import zero_portable
from helios_train.backends.base import Backend
from helios_train.backends.lockstep import ForwardLockstep
from helios_train.backends.run_shape import RunShape
from helios_train.backends.sequence_groups import SequenceGroups
from helios_train.runtime import checkpoint as ckpt
from helios_train.runtime.process_guard import teardown_by_exit
from helios_train.runtime.roles import Calls, PreparedRole

# Keys the trainer's loop owns; a user JSON may repeat them only with the same values.
OWNED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
GATHER_CHUNK = 2**27  # elements per ZeRO-3 gather when writing the plain trainables (512 MB fp32)


def ds_config(launcher_cfg, trainer_cfg, data_cfg, world_size: int, max_grad_norm: float | None) -> dict:
    """The DeepSpeed config of one role, from our config (+ `launcher.deepspeed_config` merged on top)."""
    stage = int(launcher_cfg.zero_stage)
    if stage not in (1, 2, 3):
        raise ValueError(f"launcher.zero_stage={stage}: expected 1, 2 or 3")
    micro, accum = int(data_cfg.batch_size), int(trainer_cfg.grad_accum_steps)
    zero = {
        "stage": stage,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,  # elements; the ZeRO-2 reduce buffer is this × 4 B (see plan.py)
        "allgather_bucket_size": 5e8,
    }
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # save_role gathers trainables only
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "bf16": {"enabled": False},  # bf16 = the stage's autocast (module docstring)
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our client torch AdamW
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if launcher_cfg.offload_optimizer:
        if stage < 2:
            raise ValueError("launcher.offload_optimizer=true needs launcher.zero_stage 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        cfg["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on the CPU partitions (no CPUAdam JIT build)
    if getattr(launcher_cfg, "offload_param", False):
        if stage != 3:
            raise ValueError("launcher.offload_param=true needs launcher.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if launcher_cfg.deepspeed_config:
        path = Path(launcher_cfg.deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(f"launcher.deepspeed_config: no such file {str(path)!r}")
        user = json.loads(path.read_text())
        for key in OWNED_KEYS:
            if key in user and user[key] not in ("auto", cfg[key]):
                raise ValueError(f"{path}: {key}={user[key]} disagrees with our config ({cfg[key]}); set "
                                 "data.batch_size / trainer.grad_accum_steps instead (the trainer loop follows them)")
            user.pop(key, None)
        if "scheduler" in user:
            raise ValueError(f"{path}: 'scheduler' is not supported; the LR schedule comes from trainer.optim")
        cfg = merge(cfg, user)
    return cfg


def restore_torch_linear() -> None:
    """ZeRO-3 replaces `torch.nn.functional.linear` process-wide with its memory-efficient autograd function
    and leaves it so ("This will persist unless manually reset", deepspeed/runtime/zero/partition_parameters.py).
    Put torch's back, so a later run in the same process (tests, notebooks, the dry run) computes — and
    allocates — as torch does."""
    zero = importlib.import_module("deepspeed.runtime.zero.partition_parameters")
    original = getattr(zero.InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if original is not None and torch.nn.functional.linear is not original:
        torch.nn.functional.linear = original


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, launcher_cfg, trainer_cfg, data_cfg=None):
        if "WORLD_SIZE" not in os.environ:
            # In-process use (pytest, notebooks): a world of one; DeepSpeed otherwise looks for MPI.
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", _free_port())
        super().__init__(launcher_cfg, trainer_cfg)
        if data_cfg is None:
            raise ValueError("DeepSpeedBackend needs the data config (micro batch size)")
        if self.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks its accelerator
            # Skip the shm comm-op JIT build (~30 s). Fetched through importlib: `import
            # deepspeed.comm.torch as m` binds a different object (the
            # package re-exports a name that shadows the submodule).
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        import deepspeed

        self.deepspeed = deepspeed
        backend = launcher_cfg.backend
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        # As under DDP: an existing process group is reused and left alive at shutdown.
        self.owns_process_group = not torch.distributed.is_initialized()
        deepspeed.init_distributed(dist_backend=backend,
                                       timeout=datetime.timedelta(seconds=trainer_cfg.collective_timeout_s))
        # ZeRO partitions and averages over the world group, right under sequence parallelism too
        # (helios_train/backends/sequence_groups.py).
        self.sequence = SequenceGroups.build(launcher_cfg, self.rank, self.world_size, self.device.type)
        self.trainer_cfg = trainer_cfg
        self.data_cfg = data_cfg
        self.zero_stage = int(launcher_cfg.zero_stage)
        # ZeRO-3 partitions every base: ranks gather weights collectively, so they must run the same forwards.
        self.shards_parameters = self.zero_stage == 3
        self.lockstep = ForwardLockstep(self.device) if self.shards_parameters else None
        self.engines = []

    # -- roles -------------------------------------------------------------------------------
    def prepare(self, name, module, optimizer, scheduler, max_grad_norm, calls: Calls = Calls.ONCE) -> PreparedRole:
        # Any `calls` works as is: ZeRO's reduce hooks fire once per parameter per backward.
        self.split_sequence(module)
        params = [p for p in module.parameters() if p.requires_grad]
        config = ds_config(self.launcher_cfg, self.trainer_cfg, self.data_cfg, self.world_size, max_grad_norm)
        kwargs = {"model": module, "model_parameters": params, "config": config}
        if "optimizer" in config:  # the user JSON names DeepSpeed's own optimizer
            defaults = optimizer.defaults
            opt_params = config["optimizer"].setdefault("params", {})
            for key in ("lr", "betas", "eps", "weight_decay"):
                opt_params.setdefault(key, list(defaults[key]) if key == "betas" else defaults[key])
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                raise TypeError(f"cannot rebuild {type(scheduler).__name__} on DeepSpeed's optimizer")
            lambdas = scheduler.lr_lambdas
            kwargs["lr_scheduler"] = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
        else:
            kwargs.update(optimizer=optimizer, lr_scheduler=scheduler)
        engine, ds_opt, _, ds_sched = self.deepspeed.initialize(**kwargs)
        from helios_train.backends.weights_only_checkpoint import use_weights_only_loading

        use_weights_only_loading(engine)  # resume never unpickles code (weights_only_checkpoint.py)
        self.engines.append(engine)
        return PreparedRole(name, module, engine, ds_opt, ds_sched or scheduler, max_grad_norm, params)

    def zero_untouched_gradients(self, params) -> None:
        """Nothing to do: ZeRO's flat gradient buffers already hold zeros for parameters the backward missed."""

    def backward(self, role: PreparedRole, loss: torch.Tensor) -> None:
        engine = role.model
        # A non-finite loss is backpropagated as is: its inf/NaN gradients make DeepSpeed skip the
        # whole update on every rank (all micro-batches), like a non-finite norm under DDP.
        engine.backward(loss, scale_wrt_gas=False)  # the trainer already divided by the accumulation count
        if not engine.is_gradient_accumulation_boundary():
            engine.step()  # DeepSpeed counts micro-steps in step(); it only updates at the boundary

    def grad_norm_and_step(self, role: PreparedRole) -> tuple[float, bool]:
        engine = role.model
        engine.step()  # clip (gradient_clipping) + AdamW + LR scheduler, or skip on inf/NaN gradients
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        applied = engine.was_step_applied()
        if not applied:
            return (norm if not math.isfinite(norm) else float("nan")), False
        if not math.isfinite(norm):
            raise FloatingPointError(
                f"{role.name}: DeepSpeed applied an update with gradient norm {norm} (this DeepSpeed build does "
                "not skip non-finite steps); the weights are no longer trustworthy — resume from the last checkpoint")
        return norm, True

    def current_lr(self, role: PreparedRole) -> float:
        return role.model.get_lr()[0]

    @contextlib.contextmanager
    def full_parameters(self, role: PreparedRole, params=None):
        """Whole (un-sharded) parameters inside the block, read-only; ZeRO-3 gathers them on every
        rank, so every rank must enter (collective). No-op under ZeRO-1/2."""
        params = list(params if params is not None else role.module.parameters())
        if self.zero_stage != 3:
            yield
            return
        with self.deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield

    # -- collectives -------------------------------------------------------------------------
    def barrier(self) -> None:
        torch.distributed.barrier()

    def _device_tensor(self, value: torch.Tensor, dtype) -> torch.Tensor:
        return value.detach().clone().to(device=self.device, dtype=dtype)

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        value = self._device_tensor(value, torch.float32)
        torch.distributed.all_reduce(value)
        return value / self.world_size

    def all_max(self, value: torch.Tensor) -> torch.Tensor:
        value = self._device_tensor(value, torch.float32)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return value

    def all_sum_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(t)
        return int(t.item())

    # -- checkpoints -------------------------------------------------------------------------
    def _trainable_state(self, role: PreparedRole) -> dict[str, torch.Tensor]:
        """fp32 trainable tensors by name (rank 0; empty elsewhere). Under ZeRO-3 they are gathered
        in chunks on all ranks, never the frozen base."""
        named = [(n, p) for n, p in role.module.named_parameters() if p.requires_grad]
        out: dict[str, torch.Tensor] = {}
        chunk, size = [], 0
        for i, (n, p) in enumerate(named):
            chunk.append((n, p))
            size += getattr(p, "ds_numel", p.numel())
            if size >= GATHER_CHUNK or i == len(named) - 1:
                with self.full_parameters(role, [q for _, q in chunk]):
                    if self.is_main:
                        out.update({k: q.detach().float().cpu().contiguous().clone() for k, q in chunk})
                chunk, size = [], 0
        return out

    def save_role(self, role: PreparedRole, directory: Path) -> None:
        # Every rank writes its ZeRO shards (optimizer state, LR scheduler, trainable weights; the
        # frozen base is not saved: it is reloaded from model.path); rank 0 also writes the plain fp32
        # trainable tensors, which export/infer read without DeepSpeed, and (trainer.portable_checkpoints)
        # the whole optimizer state, which resumes on any shape or backend (zero_portable.py).
        role.model.save_checkpoint(str(directory / f"{role.name}.deepspeed"), tag="state", save_latest=False,
                                   exclude_frozen_parameters=True)
        state = self._trainable_state(role)
        if self.is_main:
            from safetensors.torch import save_file

            save_file(state, str(directory / f"{role.name}.trainable.safetensors"))
        if self.trainer_cfg.portable_checkpoints:
            whole = zero_portable.whole_optimizer_state(role.optimizer, role.params)  # collective
            if self.is_main:
                ckpt.save_torch(whole, directory / f"{role.name}.optimizer.pt")
                ckpt.save_torch(role.scheduler.state_dict(), directory / f"{role.name}.scheduler.pt")

    def load_role(self, role: PreparedRole, directory: Path) -> None:
        saved = ckpt.read_json(directory / "trainer_state.json").get("shape")
        now = RunShape(self.world_size, int(self.trainer_cfg.grad_accum_steps), int(self.data_cfg.batch_size),
                       self.name, self.zero_stage)
        same_shape = saved is None or RunShape(**saved).same_partitions(now)
        path = directory / f"{role.name}.deepspeed"
        if same_shape and (path / "state").is_dir():
            load_path, _ = role.model.load_checkpoint(str(path), tag="state", load_module_strict=False,
                                                      load_optimizer_states=True, load_lr_scheduler_states=True)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load {path}/state")
            return
        # Another rank count, ZeRO stage or a DDP checkpoint: whole tensors into this engine's partitions.
        optimizer_file = directory / f"{role.name}.optimizer.pt"
        if not optimizer_file.is_file():
            raise FileNotFoundError(f"{optimizer_file}: no whole optimizer state for role {role.name!r}; this "
                                    "checkpoint resumes only on the shape and backend that wrote it")
        weights = load_file(str(directory / f"{role.name}.trainable.safetensors"))
        ckpt.check_finite(weights, directory / f"{role.name}.trainable.safetensors")
        optimizer_state = ckpt.load_torch(optimizer_file)
        ckpt.check_finite(optimizer_state, optimizer_file)
        zero_portable.load_whole_state(self, role, weights, optimizer_state)
        role.scheduler.load_state_dict(ckpt.load_torch(directory / f"{role.name}.scheduler.pt"))

    def shutdown(self) -> None:
        for engine in self.engines:
            engine.destroy()  # ZeRO-3 aborts at interpreter exit otherwise
        self.engines = []
        restore_torch_linear()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            if self.owns_process_group and not teardown_by_exit():  # as under DDP (process_guard.py)
                # Through deepspeed.comm: it also drops DeepSpeed's cached groups, so a later backend in
                # the same process (tests, notebooks) starts clean.
                self.deepspeed.comm.destroy_process_group()
