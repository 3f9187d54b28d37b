"""Export a training checkpoint as a diffusers-layout Helios folder (LoRA and extra trainables fused).

    python -m helios_train export --checkpoint checkpoints/base-toy-toy [--variant base] --out exports/base

`--checkpoint` is a run directory (its newest complete checkpoint is used) or a `checkpoint-N` dir.
The result has transformer/ (full fused weights), vae/, text_encoder/, tokenizer/ (copied, or
symlinked with --link), scheduler/ configured for the variant, model_index.json naming the right
pipeline class, and helios_export.json (source checkpoint, step, variant, config hash) — the
hand-off manifest the next stage starts from. `HeliosPipeline.from_pretrained(out)` (Base) or
`HeliosPyramidPipeline.from_pretrained(out)` (Mid / Distilled) load it unchanged.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from helios_train.model.loading import cast_weights, torch_dtype
from helios_train.model.variants import build_pipeline, check_variant
from helios_train.runtime import checkpoint as ckpt

COMPONENTS = ("vae", "text_encoder", "tokenizer")


def resolve_checkpoint(path) -> Path:
    path = Path(path)
    if (path / ckpt.MARKER).is_file():
        problem = ckpt.verify(path)
        if problem is not None:
            raise ValueError(f"{path}: {problem}")
        return path
    latest = ckpt.latest_valid_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a complete checkpoint-N directory nor a run with a readable one")
    return latest


def run_config(checkpoint_dir: Path):
    """The typed config the checkpoint's run was started with (its run dir's config.yaml)."""
    from helios_train.config import Config

    saved = checkpoint_dir.parent / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"{saved} missing: cannot tell which model/stage produced {checkpoint_dir}")
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(saved))


def config_hash(cfg) -> str:
    blob = json.dumps(OmegaConf.to_container(cfg.stage, resolve=True), sort_keys=True) + json.dumps(
        OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_trained_transformer(checkpoint_dir: Path, role: str = "generator", cfg=None):
    """Base weights + the checkpoint's trainables, adapters attached (not fused)."""
    from helios_train.config.stages import uses_history
    from helios_train.model.loading import load_transformer
    from helios_train.model.trainables import apply_trainable_policy

    cfg = cfg if cfg is not None else run_config(checkpoint_dir)
    transformer = load_transformer(cfg.model, cfg.stage.trainables, history=uses_history(cfg.stage))
    apply_trainable_policy(transformer, cfg.stage.trainables)
    ckpt.load_trainables(transformer, checkpoint_dir / f"{role}.trainable.safetensors")
    return transformer.requires_grad_(False).eval()


def fuse(transformer):
    """Merge LoRA into the base weights and drop the PEFT wrappers: a plain diffusers model."""
    if getattr(transformer, "_hf_peft_config_loaded", False):
        transformer.fuse_lora()
        transformer.unload_lora()
    return transformer


def export(checkpoint, out_dir, variant: str | None = None, link: bool = False, role: str = "generator",
           use_ema: bool = False, dtype: str | None = None) -> Path:
    """Fuse the checkpoint's trainables into its base and write a diffusers-layout folder. `dtype`
    (fp32 | bf16; default: the run's model.weight_dtype) is the transformer's saved dtype, fp32-kept
    modules excepted; the fp32 LoRA delta is merged before the cast."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    src = resolve_checkpoint(checkpoint)
    cfg = run_config(src)
    variant = variant or cfg.stage.name
    check_variant(variant)
    out = Path(out_dir)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    transformer = load_trained_transformer(src, role, cfg)
    if use_ema:  # the EMA of the trainable tensors replaces the live ones before fusing
        from safetensors.torch import load_file

        ema_file = src / f"{role}.ema.safetensors"
        if not ema_file.is_file():
            raise FileNotFoundError(f"--ema: {ema_file} missing (was stage.ema.enabled=true?)")
        ckpt_state = load_file(str(ema_file))
        params = dict(transformer.named_parameters())
        with torch.no_grad():
            for name, value in ckpt_state.items():
                params[name].copy_(value.to(params[name].dtype))
    transformer = cast_weights(fuse(transformer), torch_dtype(dtype or cfg.model.weight_dtype))
    model_root = Path(cfg.model.path)
    # Saving through the pipeline writes model_index.json exactly as diffusers expects for the class.
    vae = AutoencoderKLWan.from_pretrained(model_root, subfolder="vae")
    tok = AutoTokenizer.from_pretrained(model_root, subfolder="tokenizer")
    enc = UMT5EncoderModel.from_pretrained(model_root, subfolder="text_encoder")
    build_pipeline(variant, transformer, vae, enc, tok).save_pretrained(tmp)
    if link:  # large frozen components: point at the source instead of copying gigabytes
        for name in COMPONENTS:
            shutil.rmtree(tmp / name)
            os.symlink((model_root / name).resolve(), tmp / name)
    state = ckpt.read_json(src / "trainer_state.json")
    manifest = {"variant": variant, "source_checkpoint": str(src.resolve()), "step": state["step"], "ema": use_ema,
                "dtype": dtype or cfg.model.weight_dtype,
                "stage": cfg.stage.name, "config_hash": config_hash(cfg), "run_name": cfg.run_name}
    (tmp / "helios_export.json").write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def export_initial(model_dir, out_dir, variant: str = "base") -> Path:
    """The folder a Helios stage would start from, sampled as `variant`: `model_dir`'s transformer with multi-term
    memory patches (initialised from its patch embedding when the folder has none, as stage=base does for Wan2.1),
    no training. The evaluation's "untrained model" baseline (helios_train/miniature.py)."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    from helios_train.config.run import ModelConfig
    from helios_train.model.loading import load_transformer

    model_dir, out = Path(model_dir), Path(out_dir)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model_cfg = OmegaConf.structured(ModelConfig(name="initial", path=str(model_dir)))
    transformer = load_transformer(model_cfg, history=variant != "t2v").requires_grad_(False).eval()
    build_pipeline(variant, transformer, AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae"),
                   UMT5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder"),
                   AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer")).save_pretrained(tmp)
    manifest = {"variant": variant, "source_checkpoint": None, "source_model": str(model_dir.resolve()), "step": 0,
                "ema": False, "dtype": "fp32", "stage": "initial", "config_hash": None, "run_name": None}
    (tmp / "helios_export.json").write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="run dir or checkpoint-N dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant", choices=["t2v", "base", "mid", "distilled"], help="default: the run's stage")
    ap.add_argument("--link", action="store_true", help="symlink vae/text_encoder/tokenizer instead of copying")
    ap.add_argument("--ema", action="store_true", help="export the EMA weights (Distilled stage)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], help="saved transformer dtype (default: the run's model.weight_dtype)")
    a = ap.parse_args(argv)
    with torch.no_grad():
        print(f"exported {export(a.checkpoint, a.out, a.variant, a.link, use_ema=a.ema, dtype=a.dtype)}")


if __name__ == "__main__":
    main()
