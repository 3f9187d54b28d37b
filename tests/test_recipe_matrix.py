"""Every official recipe at production settings except size: `model=helios_14b_shape` (the 14B config
scaled in width and depth only) with bf16 frozen weights under bf16 autocast, gradient checkpointing,
the recipe's LoRA targets with ranks scaled by the width ratio (256 / 5120), its timestep / anti-drift /
pyramid / DMD / GAN / EMA settings; 2 optimizer steps each under `single`, and the Base, Mid and DMD
recipes on 2 processes under ddp, deepspeed_zero2 and deepspeed_zero3. Each run: every loss finite,
every role's LoRA B matrices (zero at init) changed (memory patches aside: zero history), frozen weights bf16 and trainables fp32."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import compose, run_pooled

WIDTH_RATIO = 256 / 5120  # model=helios_14b_shape's hidden size over the 14B's
RECIPES = ("stage_1_init", "stage_1_post", "stage_1_correct", "stage_2_init", "stage_2_post", "stage_2_correct",
           "stage_3_ode", "stage_3_post", "stage_3_post_gan_version")
DISTRIBUTED = ("stage_1_init", "stage_2_init", "stage_3_post")  # Base, Mid, DMD


def scaled(rank: int) -> int:
    return max(4, round(rank * WIDTH_RATIO))


@pytest.fixture(scope="module")
def shape_assets(toy_root, tmp_path_factory) -> dict:
    """The helios_14b_shape checkpoint + latent shards, and ODE pairs recorded from it (as a Mid teacher)."""
    from helios_train.sampling.ode_pair_capture import make_ode_pairs
    from helios_train.data.toy_assets import ensure_toy_assets

    assets = ensure_toy_assets(toy_root, spec="helios_14b_shape")
    out = tmp_path_factory.mktemp("ode14b")
    (out / "prompts.txt").write_text("a red circle moves left to right\n")
    make_ode_pairs(assets.model_dir, out / "prompts.txt", out / "shards", num_chunks=3, height=64, width=128,
                   steps=(2, 2, 2), per_shard=1, dtype="bf16")
    return {"model": assets.model_dir, "ode": out / "shards"}


def recipe_overrides(recipe: str, toy_root: Path, assets: dict, out: Path, launcher: str = "single") -> list[str]:
    cfg = compose([f"experiment={recipe}", "model=helios_14b_shape"])
    o = [f"experiment={recipe}", "model=helios_14b_shape", f"toy_root={toy_root}", f"output_root={out}",
         f"run_name={recipe}-{launcher}", f"launcher={launcher}", "trainer.max_steps=2", "trainer.checkpoint_every=2",
         "trainer.log_every=1", "validation.every=0", "tracker.mode=offline", "data.num_workers=0",
         f"stage.trainables.lora.rank={scaled(cfg.stage.trainables.lora.rank)}"]
    if cfg.stage.name == "distilled" and cfg.stage.objective == "ode":
        o += [f"data.shards={assets['ode']}/ode-*.tar", "data.latent_height=8", "data.latent_width=16"]
    if cfg.stage.name == "distilled" and cfg.stage.objective == "dmd":
        o += [f"stage.dmd.real_score_path={assets['model']}", f"stage.dmd.critic_lora_rank={scaled(cfg.stage.dmd.critic_lora_rank)}"]
    if cfg.stage.name == "distilled" and cfg.stage.gan.enabled:
        # The GAN from step 0 (the recipe's 1000 is past a 2-step run); head width 768 scaled, a multiple of 32.
        o += ["stage.gan.start_step=0", "stage.gan.head_width=64"]
    return o


def check_run(result: dict, overrides: list[str]) -> None:
    cfg = compose(overrides)
    distilled = cfg.stage.name == "distilled"
    assert result["step"] == 2 and result["finite"], result["losses"]
    assert result["mixed_precision"] == "bf16"  # `auto` from the bf16 weights
    assert result["ema"] == (distilled and cfg.stage.ema.enabled)
    expected_roles = {"generator", "critic"} if distilled and cfg.stage.objective == "dmd" else {"generator"}
    assert set(result["roles"]) == expected_roles
    ckpt = Path(result["run_dir"]) / "checkpoint-2"
    for name, role in result["roles"].items():
        assert role["frozen_dtypes"] == ["torch.bfloat16"] and role["trainable_dtypes"] == ["torch.float32"], role
        assert role["checkpointing"]
        with safe_open(str(ckpt / f"{name}.trainable.safetensors"), "pt") as f:
            # The memory-patch adapters see only the history, which is all zero for a first chunk / T2V
            # sample: they may legitimately not move in 2 steps. Every other B matrix must have.
            b = [k for k in f.keys() if "lora_B" in k and not k.startswith(("patch_short", "patch_mid", "patch_long"))]
            unchanged = [k for k in b if not f.get_tensor(k).abs().max() > 0]
        assert b and not unchanged, f"{name}: LoRA B still zero after 2 steps: {unchanged[:5]}"
    if result["ema"]:  # the whole EMA (gathered from every rank's share when sharded), as export --ema reads it
        with safe_open(str(ckpt / "generator.ema.safetensors"), "pt") as e, \
                safe_open(str(ckpt / "generator.trainable.safetensors"), "pt") as t:
            assert set(e.keys()) == set(t.keys())
            assert all(e.get_slice(k).get_shape() == t.get_slice(k).get_shape() for k in t.keys())
    if distilled and cfg.stage.objective == "dmd":
        from helios_train.backends.lockstep import params_sharded

        # stage.dmd.low_vram (the recipes' default) really moved the bases — except under ZeRO-3, which shards them
        assert (result["onloaded_gb"] > 0) == (cfg.stage.dmd.low_vram and not params_sharded(cfg))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_at_production_settings(recipe, toy_root, shape_assets, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from matrix_worker import run_one

    overrides = recipe_overrides(recipe, toy_root, shape_assets, tmp_path)
    result = run_one(overrides)
    check_run(result, overrides)
    if recipe == "stage_3_post_gan_version":
        from helios_train.training.tracking import read_metrics

        assert all(m["critic/gan/active"] == 1.0 for m in read_metrics(Path(result["run_dir"])))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ddp", "deepspeed_zero2", "deepspeed_zero3"])
def test_base_mid_dmd_recipes_on_two_processes(launcher, toy_root, shape_assets, tmp_path):
    configs = [recipe_overrides(r, toy_root, shape_assets, tmp_path, launcher) for r in DISTRIBUTED]
    results, _ = run_pooled(configs, tmp_path)
    for overrides, result in zip(configs, results):
        check_run(result, overrides)
