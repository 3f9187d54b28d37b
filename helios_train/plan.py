"""Memory planner: per-GPU bytes of a stage on G GPUs, from the real model built on the meta device.

    python -m helios_train stage=base model=helios_14b launcher=deepspeed_zero2 plan=true [plan_gpus=8]
    python -m helios_train.plan     # Base (LoRA r128) and DMD on 8 GPUs under ddp / zero2 / zero3

No weights are read: the transformer is built from its config.json (or the class's 14B defaults when
`model.path` has none) under `torch.device("meta")`, and the stage's trainable policy is applied with
PEFT exactly as in training (`apply_trainable_policy` works on meta tensors), so every count below is
the trained model's. A stage is a list of roles (`RolePlan`); `plan_roles` prices any list, `plan_dmd`
builds the DMD one (generator + shared teacher/critic base + critic LoRA + EMA).

Per GPU, G GPUs, N_f frozen / N_t trainable parameters of a role, b = bytes of model.weight_dtype:

  frozen weights     N_f·b per distinct base (teacher and critic share one)        /G under zero3
  trainable params   N_t·4 (fp32, spec §1.2)                                        /G under zero3
  fp32 master        zero2/3 only: DeepSpeed's own fp32 partition, N_t·4/G           (0 under ddp)
  gradients          ddp: N_t·4·2 (param .grad + DDP bucket copy; ·1 for roles the backend reduces itself,
                     the DMD generator); zero2/3: N_t·4/G
  reduce buckets     zero2/3: reduce_bucket_size (5e8) · 4 B per engine (one engine per role)
  AdamW state        N_t·8 (exp_avg + exp_avg_sq, fp32)                             /G under zero2/3
  zero3 gathered     zero3 only: ~2 transformer blocks un-sharded at a time (current + prefetch),
                     2·(N_f·b + N_t·4)/L of the largest role
  EMA                ours (helios_train/ema.py): trainables only, fp32, replicated: N_t(generator)·4;
                     the official full-model ZeRO-3 EMA copy would be (N_f·b + N_t·4)/G
  activations        per forward with grad, T tokens × micro-batch B, hidden D, L blocks, FFN width F,
                     a = 2 B (bf16 autocast or bf16 weights) else 4 B, k = 10 + 4·F/D (≈10 D-wide tensors
                     per block — norms, q/k/v, attention out, projections, cross-attention, residuals — and
                     4 F-wide FFN tensors):
                       gradient checkpointing on:  T·B·D·a·(L + k)   (block inputs + one block recomputed)
                       off:                        T·B·D·a·L·k
                     T = history + noisy tokens of the forward (helios_train.history.token_counts on the
                     meta model: 2400 + 8640 at 48×80 latents). Mid: history + the full-resolution level.
                     DMD: max(generator rollout — up to 3 pyramid levels with live graphs, Σ(history +
                     level tokens) —, critic: history + full level). Attention scores are never stored
                     (SDPA / flash); text tokens (512, cross-attention K/V) are ignored.
Offload (launcher.offload_optimizer / offload_param) moves master+AdamW / parameters to CPU memory:
those rows are then reported as CPU bytes, not GPU bytes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

GB = 1e9
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
REDUCE_BUCKET = 5e8  # elements; helios_train/backends/deepspeed.py ds_config
BACKENDS = ("ddp", "deepspeed_zero2", "deepspeed_zero3")
ROWS = ("frozen weights", "trainable params", "fp32 master", "gradients", "reduce buckets", "AdamW state",
        "zero3 gathered", "EMA")
FORMULAS = {
    "ddp": {"frozen weights": "N_f·b", "trainable params": "N_t·4", "fp32 master": "0",
            "gradients": "N_t·4·2 (·1 self-reduced)", "reduce buckets": "0", "AdamW state": "N_t·8",
            "zero3 gathered": "0", "EMA": "N_t(gen)·4"},
    "deepspeed_zero2": {"frozen weights": "N_f·b", "trainable params": "N_t·4", "fp32 master": "N_t·4/G",
                        "gradients": "N_t·4/G", "reduce buckets": "5e8·4 per engine", "AdamW state": "N_t·8/G",
                        "zero3 gathered": "0", "EMA": "N_t(gen)·4"},
    "deepspeed_zero3": {"frozen weights": "N_f·b/G", "trainable params": "N_t·4/G", "fp32 master": "N_t·4/G",
                        "gradients": "N_t·4/G", "reduce buckets": "5e8·4 per engine", "AdamW state": "N_t·8/G",
                        "zero3 gathered": "2·(N_f·b+N_t·4)/L", "EMA": "N_t(gen)·4"},
}


@dataclass
class RolePlan:
    name: str
    frozen: int  # parameter counts
    trainable: int
    weight_bytes: int
    shares_base_with: str | None = None  # the frozen base is another role's (teacher/critic share one)
    ddp_wrapped: bool = True  # False: the DDP backend reduces its gradients itself (no bucket copy)


# -- counting -------------------------------------------------------------------------------------
def build_meta_transformer(model_cfg):
    from diffusers import HeliosTransformer3DModel

    root = model_cfg.transformer_path or os.path.join(model_cfg.path, model_cfg.transformer_subfolder)
    cfg_file = os.path.join(root, "config.json")
    kwargs = {}
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            kwargs = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    # else: the class defaults are the 14B geometry (40 blocks, 40 heads × 128, FFN 13824)
    with torch.device("meta"):
        return HeliosTransformer3DModel(**kwargs)


def count_role(model_cfg, trainables_cfg) -> tuple[int, int, object]:
    """(frozen, trainable, meta model) after the stage's trainable policy."""
    from helios_train.model.trainables import apply_trainable_policy

    model = build_meta_transformer(model_cfg)
    with torch.device("meta"):
        apply_trainable_policy(model, trainables_cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return frozen, trainable, model


# -- activations ----------------------------------------------------------------------------------
def activation_bytes(model, tokens: int, batch: int, checkpointing: bool, act_bytes: int = 2) -> float:
    cfg = model.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    k = 10 + 4 * cfg.ffn_dim / d
    per_block = tokens * batch * d * act_bytes
    return per_block * ((cfg.num_layers + k) if checkpointing else cfg.num_layers * k)


def _latent_hw(cfg) -> tuple[int, int]:
    return cfg.data.latent_height or 48, cfg.data.latent_width or 80


def tokens_per_forward(cfg, model) -> int:
    from helios_train.history import token_counts

    counts = token_counts(model, _latent_hw(cfg), cfg.stage.history)
    if cfg.stage.name == "mid":
        from helios_train.pyramid import level_token_counts

        levels = level_token_counts(_latent_hw(cfg), cfg.stage.history.latent_window_size)
        # one forward per segment: the largest (full-resolution) segment bounds live activations
        return counts["history"] + max(levels)
    return counts["total"]


def dmd_tokens(cfg, model) -> dict[str, int]:
    from helios_train.history import token_counts
    from helios_train.pyramid import level_token_counts

    counts = token_counts(model, _latent_hw(cfg), cfg.stage.history)
    levels = level_token_counts(_latent_hw(cfg), cfg.stage.history.latent_window_size)
    return {"generator": sum(counts["history"] + n for n in levels), "critic": counts["total"]}


def _act_bytes(cfg) -> int:
    from helios_train.precision import mixed_precision

    return 2 if mixed_precision(cfg) == "bf16" or cfg.model.weight_dtype == "bf16" else 4


# -- pricing --------------------------------------------------------------------------------------
def per_gpu(roles: list[RolePlan], backend: str, gpus: int, ema: RolePlan | None = None,
            num_layers: int = 40) -> dict[str, float]:
    """Bytes per GPU by component (formulas in the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    zero = backend != "ddp"
    z3 = backend == "deepspeed_zero3"
    out = dict.fromkeys(ROWS, 0.0)
    for r in roles:
        if r.shares_base_with is None:
            out["frozen weights"] += r.frozen * r.weight_bytes / (gpus if z3 else 1)
        out["trainable params"] += r.trainable * 4 / (gpus if z3 else 1)
        out["AdamW state"] += r.trainable * 8 / (gpus if zero else 1)
        if zero:
            out["fp32 master"] += r.trainable * 4 / gpus
            out["gradients"] += r.trainable * 4 / gpus
            out["reduce buckets"] += REDUCE_BUCKET * 4
        else:
            out["gradients"] += r.trainable * 4 * (2 if r.ddp_wrapped else 1)
    if z3:
        largest = max(roles, key=lambda r: r.frozen * r.weight_bytes + r.trainable * 4)
        out["zero3 gathered"] = 2 * (largest.frozen * largest.weight_bytes + largest.trainable * 4) / num_layers
    if ema is not None:
        out["EMA"] = ema.trainable * 4
    return out


def apply_offload(rows: dict[str, float], launcher_cfg, backend: str) -> tuple[dict[str, float], float]:
    """Move offloaded rows to CPU; returns (GPU rows, CPU bytes per GPU process)."""
    rows, cpu = dict(rows), 0.0
    if backend == "ddp" or launcher_cfg is None:
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


def report(title: str, rows: dict[str, float], act: float, budget_gb: float, backend: str,
           cpu: float = 0.0) -> str:
    total = sum(rows.values()) + act
    lines = [title, f"  {'component':<20} {'GB/GPU':>8}   formula"]
    lines += [f"  {k:<20} {v / GB:8.2f}   {FORMULAS[backend][k]}" for k, v in rows.items()]
    lines.append(f"  {'activations (est.)':<20} {act / GB:8.2f}   T·B·D·a·(L+k), k = 10 + 4F/D (checkpointing)")
    if cpu:
        lines.append(f"  {'(offloaded to CPU)':<20} {cpu / GB:8.2f}   per GPU process, in host memory")
    verdict = "fits" if total / GB <= budget_gb else "does NOT fit"
    lines.append(f"  {'total':<20} {total / GB:8.2f}   -> {verdict} in {budget_gb:.0f} GB")
    return "\n".join(lines)


def plan_roles(cfg, roles: list[RolePlan], backend: str, act: float, ema: RolePlan | None = None,
               title: str = "", num_layers: int = 40, launcher_cfg=None) -> dict[str, float]:
    """Price a list of roles on `cfg.plan_gpus` GPUs; prints the table, returns GB per component."""
    rows = per_gpu(roles, backend, cfg.plan_gpus, ema, num_layers)
    rows, cpu = apply_offload(rows, launcher_cfg, backend)
    print(report(f"{title} backend={backend} gpus={cfg.plan_gpus}", rows, act, cfg.plan_gpu_memory_gb, backend, cpu))
    return {k: v / GB for k, v in rows.items()} | {"activations": act / GB, "offloaded_cpu": cpu / GB}


def _backend_of(cfg) -> str:
    return "ddp" if cfg.launcher.name in ("single", "ddp") else f"deepspeed_zero{cfg.launcher.zero_stage}"


def run_plan(cfg, backend: str | None = None) -> dict:
    """Plan of the configured stage/model/launcher (`plan=true`); DMD for stage=distilled."""
    backend = backend or _backend_of(cfg)
    if cfg.stage.name == "distilled":
        out = plan_dmd(cfg, backends=(backend,))[backend]
        return {"per_gpu_gb": sum(v for k, v in out.items() if k != "offloaded_cpu"), **out}
    frozen, trainable, model = count_role(cfg.model, cfg.stage.trainables)
    wb = DTYPE_BYTES[cfg.model.weight_dtype]
    act = activation_bytes(model, tokens_per_forward(cfg, model), cfg.data.batch_size,
                           cfg.model.gradient_checkpointing, _act_bytes(cfg))
    print(f"stage={cfg.stage.name}: frozen {frozen / 1e9:.3f} B params ({cfg.model.weight_dtype}), trainable "
          f"{trainable / 1e9:.3f} B (fp32, LoRA r{cfg.stage.trainables.lora.rank} + extras)")
    out = plan_roles(cfg, [RolePlan("generator", frozen, trainable, wb)], backend, act,
                     title=f"stage={cfg.stage.name} (LoRA r{cfg.stage.trainables.lora.rank})",
                     num_layers=model.config.num_layers, launcher_cfg=cfg.launcher)
    total = sum(v for k, v in out.items() if k != "offloaded_cpu")
    return {"frozen": frozen, "trainable": trainable, "per_gpu_gb": total, **out}


def dmd_policies(cfg, lora_rank: int | None = None):
    """Generator and critic trainable policies of the DMD stage (spec §1.4: generator LoRA r256 with
    memory-patch LoRA, patch embedding frozen; critic LoRA r256 on the teacher base, patches excluded)."""
    from omegaconf import OmegaConf

    if cfg.stage.name == "distilled":
        gen = OmegaConf.create(OmegaConf.to_container(cfg.stage.trainables, resolve=True))
        critic_rank = cfg.stage.dmd.critic_lora_rank
    else:
        gen = OmegaConf.create(OmegaConf.to_container(cfg.stage.trainables, resolve=True))
        gen.lora.rank, gen.patch_embedding, gen.memory_patches = 256, "frozen", "lora"
        critic_rank = 256
    if lora_rank is not None:
        gen.lora.rank = critic_rank = lora_rank
    critic = OmegaConf.merge(gen, {"lora": {"rank": critic_rank}, "patch_embedding": "frozen",
                                   "memory_patches": "frozen"})
    return gen, critic


def gan_head_params(model, gan_cfg) -> int:
    """Parameters of the hierarchical GAN heads for this transformer (built on meta, spec §8.7)."""
    from helios_train.gan import DiscriminatorHeads

    with torch.device("meta"):
        heads = DiscriminatorHeads.for_transformer(model, gan_cfg)
    return sum(p.numel() for p in heads.parameters())


def plan_dmd(cfg, lora_rank: int | None = None, backends=BACKENDS) -> dict[str, dict]:
    """DMD: the generator (its own base + LoRA), one bf16 base shared by teacher (adapters off) and
    critic (its own LoRA), the EMA of the generator's trainables (spec §8.3, §10)."""
    gen_policy, critic_policy = dmd_policies(cfg, lora_rank)
    g_frozen, g_train, model = count_role(cfg.model, gen_policy)
    c_frozen, c_train, _ = count_role(cfg.model, critic_policy)
    gan = cfg.stage.gan if cfg.stage.name == "distilled" and cfg.stage.gan.enabled else None
    heads = gan_head_params(model, gan) if gan is not None else 0
    c_train += heads  # fp32 trainable, in the critic's optimizer like its LoRA
    wb = DTYPE_BYTES[cfg.model.weight_dtype]
    roles = [RolePlan("generator", g_frozen, g_train, wb, ddp_wrapped=False),
             RolePlan("critic", c_frozen, c_train, wb)]
    tokens = dmd_tokens(cfg, model)
    act = activation_bytes(model, max(tokens.values()), 1, cfg.model.gradient_checkpointing, _act_bytes(cfg))
    print(f"DMD: generator frozen {g_frozen / 1e9:.3f} B + trainable {g_train / 1e9:.3f} B (LoRA "
          f"r{gen_policy.lora.rank}); critic/teacher base frozen {c_frozen / 1e9:.3f} B + critic LoRA "
          f"{c_train / 1e9:.3f} B (r{critic_policy.lora.rank}); tokens with grad: generator rollout "
          f"{tokens['generator']}, critic {tokens['critic']}"
          + (f"; GAN heads {heads / 1e9:.3f} B (in the critic's trainables)" if heads else ""))
    out = {}
    for backend in backends:
        out[backend] = plan_roles(cfg, roles, backend, act, ema=RolePlan("ema", 0, g_train, 4),
                                  title="DMD (generator + shared teacher/critic base + critic LoRA + EMA)",
                                  num_layers=model.config.num_layers, launcher_cfg=cfg.launcher)
    return out


def summary_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table (GB per GPU) of {label: rows}."""
    cols = [*ROWS, "activations"]
    head = "| GB per GPU | " + " | ".join(cols) + " | total |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for label, rows in results.items():
        total = sum(rows[c] for c in cols)
        lines.append(f"| {label} | " + " | ".join(f"{rows[c]:.2f}" for c in cols) + f" | **{total:.1f}** |")
    return "\n".join(lines)


def main() -> None:
    from hydra import compose, initialize_config_dir

    from helios_train.__main__ import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        base = compose(config_name="config", overrides=[
            "experiment=stage_1_init", "model=helios_14b", "model.path=/nonexistent", "data=webdataset",
            "trainer.mixed_precision=bf16"])
    results = {}
    for backend in BACKENDS:
        results[f"Base r128, {backend}"] = run_plan(base, backend)
        print()
    for backend, rows in plan_dmd(base).items():
        results[f"DMD r256, {backend}"] = rows
    print()
    print(summary_table(results))


if __name__ == "__main__":
    main()
