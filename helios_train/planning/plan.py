"""Memory planner: per-GPU bytes of a stage on G GPUs, from the real model built on the meta device.

    python -m helios_train experiment=stage_1_init model=helios_14b launcher=deepspeed_zero2 plan=true [plan_gpus=8]
    python -m helios_train plan-table              # every official recipe at 14B under ddp / zero2 / zero3
    python -m helios_train dry-run-table           # … next to the dry run's measured figures (minutes)

No weights are read: the transformer is built from its config.json (or the class's 14B defaults when
`model.path` has none) under `torch.device("meta")`, and the stage's trainable policy is applied with
PEFT exactly as in training (`apply_trainable_policy` works on meta tensors), so every count is the
trained model's. A stage is a list of roles (`RolePlan`, `stage_roles`); `plan` prices them.

Per GPU, G GPUs, N_f frozen / N_t trainable parameters of a role, b = bytes of model.weight_dtype:

  frozen weights     N_f·b per distinct base (teacher and critic share one)        /G under zero3;
                     DMD with stage.dmd.low_vram (not zero3): the largest base only (one resident at a time)
  trainable params   N_t·4 (fp32, official cast_training_params)                    /G under zero3
  fp32 master        zero2/3 only: DeepSpeed's own fp32 partition, N_t·4/G
  gradients          the backend's gradient buffers: single 0; ddp N_t·4 (DDP's bucket copy, for the roles
                     it wraps — not the DMD generator / packed Mid, which the backend reduces itself);
                     zero2/3 N_t·4/G (the reduced partition)
  reduce buckets     zero2/3: reduce_bucket_size (5e8) · 4 B per engine (one engine per role)
  AdamW state        N_t·8 (exp_avg + exp_avg_sq, fp32)                             /G under zero2/3
  zero3 gathered     zero3 only: ~2 transformer blocks un-sharded at a time (current + prefetch),
                     2·(N_f·b + N_t·4)/L of the largest role
  EMA                trainables only, fp32: N_t(generator)·4, /G with stage.ema.sharded or under zero3
                     (helios_train/backends/ema_shards.py)
  activations        the largest phase's peak transient (helios_train/planning/activation_memory.py): activations,
                     temporaries and — single/ddp — the .grad tensors alive at that moment; coefficients
                     measured by the dry run (helios_train/planning/dry_run.py)
Offload (launcher.offload_optimizer / offload_param) moves master+AdamW / parameters to CPU memory:
those rows are then reported as CPU bytes, not GPU bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from helios_train.backends.sequence_groups import sequence_degree
from helios_train.planning.activation_memory import phase_peak, phases

GB = 1e9
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
REDUCE_BUCKET = 5e8  # elements; helios_train/backends/deepspeed.py ds_config
BACKENDS = ("ddp", "deepspeed_zero2", "deepspeed_zero3")
ROWS = ("frozen weights", "trainable params", "fp32 master", "gradients", "reduce buckets", "AdamW state",
        "zero3 gathered", "EMA", "activations")
RECIPES = ("stage_1_init", "stage_2_init", "stage_3_ode", "stage_3_post", "stage_3_post_gan_version")


@dataclass
class RolePlan:
    name: str
    frozen: int  # parameter counts
    trainable: int
    weight_bytes: int
    shares_base_with: str | None = None  # the frozen base is another role's (teacher/critic share one)
    ddp_wrapped: bool = True  # False: the DDP backend reduces its gradients itself (no bucket copy)
    frozen_bytes: int | None = None  # exact, fp32-kept modules included (default: frozen · weight_bytes)

    @property
    def frozen_total_bytes(self) -> float:
        return self.frozen_bytes if self.frozen_bytes is not None else self.frozen * self.weight_bytes


# -- counting -------------------------------------------------------------------------------------
def build_meta_transformer(model_cfg):
    """The transformer of `model_cfg` on the meta device, from its config (the family's adapter)."""
    from helios_train.model import adapter_for

    return adapter_for(model_cfg).meta_model(model_cfg)


def frozen_bytes(model, weight_bytes: int) -> int:
    """Bytes of the frozen parameters as loaded: fp32-kept modules at 4 B, the rest at the weight dtype."""
    from helios_train.model.loading import keeps_fp32

    return sum(p.numel() * (4 if keeps_fp32(model, n) else weight_bytes)
               for n, p in model.named_parameters() if not p.requires_grad)


def count_role(model_cfg, trainables_cfg) -> tuple[int, int, object]:
    """(frozen, trainable, meta model) after the stage's trainable policy."""
    from helios_train.model.trainables import apply_trainable_policy

    model = build_meta_transformer(model_cfg)
    with torch.device("meta"):
        apply_trainable_policy(model, trainables_cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return frozen, trainable, model


def dmd_policies(cfg, lora_rank: int | None = None):
    """Generator and critic trainable policies of the DMD stage (official stage_3_post: generator LoRA
    r256 with memory-patch LoRA, patch embedding frozen; critic LoRA r256 on the teacher base, patches
    excluded). From a non-distilled config, those of its DMD stage."""
    from omegaconf import OmegaConf

    gen = OmegaConf.create(OmegaConf.to_container(cfg.stage.trainables, resolve=True))
    if cfg.stage.name == "distilled":
        critic_rank = cfg.stage.dmd.critic_lora_rank
    else:
        gen.lora.rank, gen.patch_embedding, gen.memory_patches = 256, "frozen", "lora"
        critic_rank = 256
    if lora_rank is not None:
        gen.lora.rank = critic_rank = lora_rank
    critic = OmegaConf.merge(gen, {"lora": {"rank": critic_rank}, "patch_embedding": "frozen",
                                   "memory_patches": "frozen"})
    return gen, critic


def gan_head_params(model, gan_cfg) -> int:
    """Parameters of the hierarchical GAN heads for this transformer (built on meta)."""
    from helios_train.algorithms.gan import DiscriminatorHeads

    with torch.device("meta"):
        heads = DiscriminatorHeads.for_transformer(model, gan_cfg)
    return sum(p.numel() for p in heads.parameters())


def stage_roles(cfg) -> tuple[list[RolePlan], RolePlan | None, object]:
    """The roles a stage builds (helios_train/stages/), their EMA and the meta model."""
    wb = DTYPE_BYTES[cfg.model.weight_dtype]
    dmd = cfg.stage.name == "distilled" and cfg.stage.objective == "dmd"
    if not dmd:
        frozen, trainable, model = count_role(cfg.model, cfg.stage.trainables)
        # The ODE generator and the packed Mid forward are reduced by the backend itself (their RoleSpec.calls is not ONCE).
        wrapped = not (cfg.stage.name == "distilled" or
                       (cfg.stage.name == "mid" and cfg.stage.pyramid.execution == "packed"))
        roles = [RolePlan("generator", frozen, trainable, wb, ddp_wrapped=wrapped, frozen_bytes=frozen_bytes(model, wb))]
    else:
        gen_policy, critic_policy = dmd_policies(cfg)
        g_frozen, g_train, model = count_role(cfg.model, gen_policy)
        c_frozen, c_train, critic_model = count_role(cfg.model, critic_policy)
        gan = cfg.stage.gan.enabled
        c_train += gan_head_params(model, cfg.stage.gan) if gan else 0  # fp32, in the critic's optimizer
        roles = [RolePlan("generator", g_frozen, g_train, wb, ddp_wrapped=False, frozen_bytes=frozen_bytes(model, wb)),
                 RolePlan("critic", c_frozen, c_train, wb, ddp_wrapped=not gan,
                          frozen_bytes=frozen_bytes(critic_model, wb))]
    ema = None
    if cfg.stage.name == "distilled" and cfg.stage.ema.enabled:
        ema = RolePlan("ema", 0, roles[0].trainable, 4)
    return roles, ema, model


# -- pricing --------------------------------------------------------------------------------------
def backend_of(cfg) -> str:
    return cfg.launcher.name if cfg.launcher.name in ("single", "ddp") else f"deepspeed_zero{cfg.launcher.zero_stage}"


def per_gpu(roles: list[RolePlan], backend: str, gpus: int, ema: RolePlan | None = None,
            num_layers: int = 40, low_vram: bool = False, ema_sharded: bool = False) -> dict[str, float]:
    """Bytes per GPU of the persistent rows (formulas in the module docstring; activations are 0 here)."""
    if backend not in ("single", *BACKENDS):
        raise ValueError(f"backend={backend!r}: expected one of {('single', *BACKENDS)}")
    zero = backend.startswith("deepspeed")
    z3 = backend == "deepspeed_zero3"
    out = dict.fromkeys(ROWS, 0.0)
    for r in roles:
        if r.shares_base_with is None:
            out["frozen weights"] += r.frozen_total_bytes / (gpus if z3 else 1)
        out["trainable params"] += r.trainable * 4 / (gpus if z3 else 1)
        out["AdamW state"] += r.trainable * 8 / (gpus if zero else 1)
        if zero:
            out["fp32 master"] += r.trainable * 4 / gpus
            out["gradients"] += r.trainable * 4 / gpus
            out["reduce buckets"] += REDUCE_BUCKET * 4
        elif backend == "ddp" and r.ddp_wrapped:
            out["gradients"] += r.trainable * 4
    if low_vram and not z3:  # stage.dmd.low_vram: one distinct base on the device at a time
        out["frozen weights"] = max(r.frozen_total_bytes for r in roles if r.shares_base_with is None)
    if z3:
        largest = max(r.frozen_total_bytes + r.trainable * 4 for r in roles)
        out["zero3 gathered"] = 2 * largest / num_layers
    if ema is not None:
        out["EMA"] = ema.trainable * 4 / (gpus if (z3 or ema_sharded) else 1)
    return out


def apply_offload(rows: dict[str, float], launcher_cfg, backend: str) -> tuple[dict[str, float], float]:
    """Move offloaded rows to CPU; returns (GPU rows, CPU bytes per GPU process)."""
    rows, cpu = dict(rows), 0.0
    if not backend.startswith("deepspeed") or launcher_cfg is None:
        return rows, cpu
    keys = []
    if getattr(launcher_cfg, "offload_optimizer", False):
        keys += ["fp32 master", "AdamW state"]
    if backend == "deepspeed_zero3" and getattr(launcher_cfg, "offload_param", False):
        keys += ["frozen weights", "trainable params"]
    for k in keys:
        cpu += rows[k]
        rows[k] = 0.0
    return rows, cpu


def act_bytes(cfg) -> int:
    from helios_train.runtime.precision import mixed_precision

    return 2 if mixed_precision(cfg) == "bf16" or cfg.model.weight_dtype == "bf16" else 4


def plan(cfg, backend: str | None = None) -> dict:
    """The plan of the configured stage under `backend` (default: the launcher's), in bytes:
    {"rows", "phases" (each phase's peak transient), "roles", "ema", "offloaded_cpu", "total"}."""
    from helios_train.planning.activation_memory import latent_hw
    from helios_train.model.inputs import token_counts
    from helios_train.planning.sequence_traffic import step_bytes

    backend = backend or backend_of(cfg)
    roles, ema, model = stage_roles(cfg)
    trainable = {r.name: r.trainable for r in roles}
    degree = sequence_degree(cfg.launcher)
    stage_phases = phases(cfg, model, trainable)
    transient = {name: phase_peak(ph, model, cfg.model.gradient_checkpointing, act_bytes(cfg),
                                  grads_transient=not backend.startswith("deepspeed"), sequence_degree=degree,
                                  plan=cfg.launcher.sequence_plan)
                 for name, ph in stage_phases.items()}
    history = token_counts(model, latent_hw(cfg), cfg.stage.history)["history"]
    traffic = step_bytes(stage_phases, history, model, degree, cfg.model.gradient_checkpointing, act_bytes(cfg),
                         cfg.launcher.sequence_plan)
    low_vram = cfg.stage.name == "distilled" and cfg.stage.objective == "dmd" and cfg.stage.dmd.low_vram
    rows = per_gpu(roles, backend, cfg.plan_gpus, ema, model.config.num_layers, low_vram=low_vram,
                   ema_sharded=OmegaConf.select(cfg, "stage.ema.sharded", default=False))
    rows["activations"] = max(t["activations"] + t["gradients"] for t in transient.values())
    rows, cpu = apply_offload(rows, cfg.launcher, backend)
    return {"backend": backend, "rows": rows, "phases": transient, "roles": roles, "ema": ema,
            "offloaded_cpu": cpu, "total": sum(rows.values()), "num_layers": model.config.num_layers,
            "sequence_degree": degree, "sequence_plan": cfg.launcher.sequence_plan, "sequence_traffic": traffic}


def report(title: str, result: dict, budget_gb: float) -> str:
    rows, total = result["rows"], result["total"]
    lines = [title, f"  {'component':<20} {'GB/GPU':>8}"]
    lines += [f"  {k:<20} {v / GB:8.2f}" for k, v in rows.items()]
    if result["offloaded_cpu"]:
        lines.append(f"  {'(offloaded to CPU)':<20} {result['offloaded_cpu'] / GB:8.2f}   per GPU process, host memory")
    verdict = "fits" if total / GB <= budget_gb else "does NOT fit"
    lines.append(f"  {'total':<20} {total / GB:8.2f}   -> {verdict} in {budget_gb:.0f} GB")
    if result.get("sequence_degree", 1) > 1:
        lines.append(traffic_line(result))
    return "\n".join(lines)


def traffic_line(result: dict) -> str:
    parts = ", ".join(f"{name} {v / GB:.1f}" for name, v in result["sequence_traffic"].items())
    return (f"  sequence split (degree {result['sequence_degree']}, {result['sequence_plan']}): each rank sends "
            f"{sum(result['sequence_traffic'].values()) / GB:.1f} GB per micro-batch ({parts}; helios_train/planning/sequence_traffic.py)")


def run_plan(cfg, backend: str | None = None) -> dict:
    """`plan=true`: print the plan of the configured stage/model/launcher; returns GB per row."""
    result = plan(cfg, backend)
    for r in result["roles"]:
        print(f"{r.name}: frozen {r.frozen / 1e9:.3f} B params ({cfg.model.weight_dtype}), trainable "
              f"{r.trainable / 1e9:.3f} B (fp32)" + (" — its base is shared" if r.shares_base_with else ""))
    print(report(f"stage={cfg.stage.name} backend={result['backend']} gpus={cfg.plan_gpus}", result,
                 cfg.plan_gpu_memory_gb))
    gb = {k: v / GB for k, v in result["rows"].items()}
    return {"per_gpu_gb": result["total"] / GB, "offloaded_cpu": result["offloaded_cpu"] / GB,
            "sequence_traffic_gb": sum(result["sequence_traffic"].values()) / GB,
            "frozen": sum(r.frozen for r in result["roles"] if r.shares_base_with is None),
            "trainable": sum(r.trainable for r in result["roles"]), **gb}


def summary_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table (GB per GPU) of {label: rows in GB}."""
    head = "| GB per GPU | " + " | ".join(ROWS) + " | total |"
    lines = [head, "|" + "---|" * (len(ROWS) + 2)]
    for label, rows in results.items():
        total = sum(rows[c] for c in ROWS)
        lines.append(f"| {label} | " + " | ".join(f"{rows[c]:.2f}" for c in ROWS) + f" | **{total:.1f}** |")
    return "\n".join(lines)


def recipe_config(recipe: str, extra: list[str] = ()):
    """An official recipe at 14B (class defaults: no weights read), resolved for GPUs."""
    from helios_train.config import compose
    from helios_train.runtime.precision import resolve_precision

    data = [] if recipe == "stage_3_ode" else ["data=webdataset"]
    cfg = compose([f"experiment={recipe}", "model=helios_14b", "model.path=/nonexistent", *data, *extra])
    resolve_precision(cfg, device=None)
    return cfg


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    a = ap.parse_args(argv)
    results = {}
    for recipe in a.recipes:
        cfg = recipe_config(recipe)
        for backend in BACKENDS:
            results[f"{recipe}, {backend}"] = {k: v / GB for k, v in plan(cfg, backend)["rows"].items()}
    print(summary_table(results))


if __name__ == "__main__":
    main()
