"""Memory planner: per-GPU bytes of a stage on N GPUs, from the real model built on the meta device.

    python -m helios_train stage=base model=helios_14b launcher=ddp plan=true [plan_gpus=8]
    python -m helios_train.plan            # Base (LoRA r128) and DMD on 8 GPUs, ddp / zero2 / zero3

No weights are read: the transformer is built from its config.json (or the class's 14B defaults when
`model.path` has none) under `torch.device("meta")`, the stage's trainable policy is applied with PEFT
exactly as in training, and the parameter counts come from that model. Per GPU (G GPUs):

  frozen weights   = N_frozen · bytes(weight_dtype)                 (/G under zero3)
  trainable params = N_train · 4 (fp32)                             (/G under zero3)
  gradients        = N_train · 4 · (2 under ddp: grads + bucket copy)  (/G under zero2, zero3)
  AdamW state      = N_train · 8 (exp_avg + exp_avg_sq, fp32)         (/G under zero2, zero3)
  EMA              = (N_frozen · bytes + N_train · 4) / G            (official: own ZeRO-3 engine)
  activations      = tokens · D · 2 B · (L + k)  with gradient checkpointing (block inputs + one block
                     recomputed), tokens · D · 2 B · L · k without; k = 10 + 4·ffn/D (q,k,v,out, norms,
                     residuals, FFN in/out), tokens = (history + noisy) per forward × micro-batch
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

GB = 1e9
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class RolePlan:
    name: str
    frozen: int  # parameter counts
    trainable: int
    weight_bytes: int
    shares_base_with: str | None = None  # teacher/critic share one frozen base


def build_meta_transformer(model_cfg):
    from diffusers import HeliosTransformer3DModel

    cfg_file = os.path.join(model_cfg.transformer_path or os.path.join(model_cfg.path, model_cfg.transformer_subfolder),
                            "config.json")
    kwargs = {}
    if os.path.isfile(cfg_file):
        kwargs = {k: v for k, v in json.load(open(cfg_file)).items() if not k.startswith("_")}
    with torch.device("meta"):
        return HeliosTransformer3DModel(**kwargs)


def count_role(model_cfg, trainables_cfg) -> tuple[int, int, object]:
    from helios_train.model.trainables import apply_trainable_policy

    model = build_meta_transformer(model_cfg)
    with torch.device("meta"):
        apply_trainable_policy(model, trainables_cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return frozen, trainable, model


def activation_bytes(model, tokens: int, batch: int, checkpointing: bool) -> float:
    cfg = model.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    k = 10 + 4 * cfg.ffn_dim / d
    per_layer = tokens * batch * d * 2
    return per_layer * ((cfg.num_layers + k) if checkpointing else cfg.num_layers * k)


def per_gpu(roles: list[RolePlan], backend: str, gpus: int, ema: RolePlan | None) -> dict[str, float]:
    shard_states = backend in ("deepspeed_zero2", "deepspeed_zero3")
    shard_params = backend == "deepspeed_zero3"
    out = {"frozen weights": 0.0, "trainable params": 0.0, "gradients": 0.0, "AdamW state": 0.0, "EMA": 0.0}
    for r in roles:
        if r.shares_base_with is None:
            out["frozen weights"] += r.frozen * r.weight_bytes / (gpus if shard_params else 1)
        out["trainable params"] += r.trainable * 4 / (gpus if shard_params else 1)
        out["gradients"] += r.trainable * 4 * (1 / gpus if shard_states else 2)
        out["AdamW state"] += r.trainable * 8 / (gpus if shard_states else 1)
    if ema is not None:
        out["EMA"] = (ema.frozen * ema.weight_bytes + ema.trainable * 4) / gpus
    return out


def tokens_per_forward(cfg, model) -> int:
    from helios_train.history import token_counts

    h, w = cfg.data.latent_height or 48, cfg.data.latent_width or 80
    counts = token_counts(model, (h, w), cfg.stage.history)
    if cfg.stage.name == "mid":
        from helios_train.pyramid import level_token_counts

        levels = level_token_counts((h, w), cfg.stage.history.latent_window_size)
        # one forward per segment: the largest (full-resolution) segment bounds live activations
        return counts["history"] + max(levels)
    return counts["total"]


def report(title: str, rows: dict[str, float], act: float, budget_gb: float) -> str:
    total = sum(rows.values()) + act
    lines = [f"{title}", f"  {'component':<18} {'GB/GPU':>8}"]
    lines += [f"  {k:<18} {v / GB:8.2f}" for k, v in rows.items()]
    lines += [f"  {'activations (est.)':<18} {act / GB:8.2f}", f"  {'total':<18} {total / GB:8.2f}  "
              f"-> {'fits' if total / GB <= budget_gb else 'does NOT fit'} in {budget_gb:.0f} GB"]
    return "\n".join(lines)


def run_plan(cfg, backend: str | None = None) -> dict:
    """Plan for the configured stage/model/launcher (`plan=true`)."""
    frozen, trainable, model = count_role(cfg.model, cfg.stage.trainables)
    wb = DTYPE_BYTES[cfg.model.weight_dtype]
    if backend is None:
        backend = "ddp" if cfg.launcher.name in ("single", "ddp") else f"deepspeed_zero{cfg.launcher.zero_stage}"
    rows = per_gpu([RolePlan("generator", frozen, trainable, wb)], backend, cfg.plan_gpus, None)
    act = activation_bytes(model, tokens_per_forward(cfg, model), cfg.data.batch_size, cfg.model.gradient_checkpointing)
    print(f"frozen {frozen / 1e9:.3f} B params ({cfg.model.weight_dtype}), trainable {trainable / 1e9:.3f} B (fp32)")
    print(report(f"stage={cfg.stage.name} backend={backend} gpus={cfg.plan_gpus}", rows, act, cfg.plan_gpu_memory_gb))
    total = (sum(rows.values()) + act) / GB
    return {"frozen": frozen, "trainable": trainable, "per_gpu_gb": total, **{k: v / GB for k, v in rows.items()}}


def plan_dmd(cfg, lora_rank: int = 256) -> dict[str, dict]:
    """DMD: generator (+ LoRA r256) and one shared bf16 base for teacher (adapters off) and critic
    (its own LoRA r256), plus a ZeRO-3-sharded EMA of the generator (spec §8.3, §10)."""
    tcfg = cfg.stage.trainables.copy()
    tcfg.lora.rank = lora_rank
    tcfg.patch_embedding, tcfg.memory_patches = "frozen", "lora"
    g_frozen, g_train, model = count_role(cfg.model, tcfg)
    ccfg = tcfg.copy()
    ccfg.memory_patches = "frozen"  # critic LoRA excludes patches (spec §1.4)
    c_frozen, c_train, _ = count_role(cfg.model, ccfg)
    wb = DTYPE_BYTES[cfg.model.weight_dtype]
    roles = [RolePlan("generator", g_frozen, g_train, wb), RolePlan("critic", c_frozen, c_train, wb)]
    tokens = tokens_per_forward(cfg, model)
    out = {}
    for backend in ("ddp", "deepspeed_zero2", "deepspeed_zero3"):
        rows = per_gpu(roles, backend, cfg.plan_gpus, RolePlan("ema", g_frozen, g_train, wb))
        act = activation_bytes(model, tokens, 1, True)
        print(report(f"DMD (generator + shared teacher/critic base + critic LoRA r{lora_rank} + EMA) "
                     f"backend={backend} gpus={cfg.plan_gpus}", rows, act, cfg.plan_gpu_memory_gb))
        out[backend] = {k: v / GB for k, v in rows.items()} | {"activations": act / GB}
    return out


def main() -> None:
    from hydra import compose, initialize_config_dir

    from helios_train.__main__ import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        base = compose(config_name="config", overrides=["experiment=stage_1_init", "model=helios_14b",
                                                        "model.path=/nonexistent", "data=webdataset"])
    for backend in ("ddp", "deepspeed_zero2", "deepspeed_zero3"):
        run_plan(base, backend)
    plan_dmd(base)


if __name__ == "__main__":
    main()
