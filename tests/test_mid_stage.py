"""Mid stage (PUPC): segment construction, shared history, token budget, the three execution modes
agree (loss and gradients), recipes, DDP, and toy runs from a Base export and from the toy model."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from conftest import REPO, compose, train
from helios_train.training.tracking import read_metrics

MODES = ("separate", "batch_levels", "packed")


def mid_stage(toy_root, *overrides):
    from helios_train.stages.mid import MidStage

    cfg = compose([f"toy_root={toy_root}", "stage=mid", "stage.trainables.lora.rank=4", *overrides])
    torch.manual_seed(0)
    stage = MidStage(cfg, torch.device("cpu"))
    stage.bind({"generator": type("Role", (), {"model": stage.transformer, "module": stage.transformer})()})
    return stage


def toy_batch(b=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    return {"x0": torch.randn(b, 4, 1, 8, 16, generator=g), "history": torch.randn(b, 4, 19, 8, 16, generator=g),
            "target": torch.randn(b, 4, 9, 8, 16, generator=g), "prompt_embeds": torch.randn(b, 16, 32, generator=g)}


@pytest.mark.parametrize("ratios,levels", [("[1,2,1]", [0, 1, 1, 2]), ("[1,1,1]", [0, 1, 2]),
                                           ("[2,0,3]", [0, 0, 2, 2, 2])])
def test_segments_follow_sample_ratios_and_shapes(toy_root, ratios, levels):
    stage = mid_stage(toy_root, f"stage.pyramid.sample_ratios={ratios}")
    clean = torch.randn(2, 4, 9, 8, 16)
    segs = stage.segments(clean, torch.Generator().manual_seed(0))
    assert [s.level for s in segs] == levels
    sizes = {0: (2, 4), 1: (4, 8), 2: (8, 16)}  # 1/4, 1/2, full resolution
    for s in segs:
        assert tuple(s.x.shape) == tuple(s.target.shape) == (2, 4, 9, *sizes[s.level])
        lv = stage.schedule.levels[s.level]
        assert torch.all((s.timestep <= lv.t_max + 1e-6) & (s.timestep >= lv.t_min - 1e-6))
    # The last level ends at the clean chunk: x = σ·start + (1−σ)·end and v = start − end give
    # end = x − σ·v, which must be the clean latent itself.
    full = [s for s in segs if s.level == 2][0]
    end = full.x - full.sigma.float().view(-1, 1, 1, 1, 1) * full.target
    torch.testing.assert_close(end, clean, atol=1e-5, rtol=1e-5)


def test_draws_are_independent_within_a_level(toy_root):
    stage = mid_stage(toy_root)
    segs = stage.segments(torch.randn(4, 4, 9, 8, 16), torch.Generator().manual_seed(3))
    mid = [s for s in segs if s.level == 1]
    assert len(mid) == 2 and not torch.equal(mid[0].index, mid[1].index)
    torch.testing.assert_close(mid[0].target, mid[1].target)  # same level points, different σ


def test_every_segment_sees_the_same_conditioned_history(toy_root):
    """Separate forwards: every call gets the one history the Base conditioning produced (task
    dropout + anti-drift drawn once per micro-batch, before the pyramid draws)."""
    stage = mid_stage(toy_root)
    seen = []
    model = stage.transformer

    def spy(**kw):
        seen.append({k: kw[k] for k in ("latents_history_short", "latents_history_mid", "latents_history_long")})
        return model(**kw)

    stage.roles["generator"].model = spy
    batch = toy_batch()
    stage.loss("generator", batch, 0, torch.Generator().manual_seed(11))
    assert len(seen) == 4
    for other in seen[1:]:
        for k, v in seen[0].items():
            assert torch.equal(v, other[k])
    x0, history, _ = stage.condition(batch, torch.Generator().manual_seed(11))  # same draws, same order
    from helios_train.model.inputs import split_history

    short, mid, long_ = split_history(x0, history, stage.cfg.stage.history)
    assert torch.equal(seen[0]["latents_history_short"], short) and torch.equal(seen[0]["latents_history_long"], long_)


def test_mid_token_budget_from_real_patch_layers():
    """Per sample at 48×80 (official `prepare_stage2_clean_input`, helios/utils/utils_helios_base.py): levels
    540 / 2160 / 8640 noisy tokens from the 14B model's own patch_embedding, 2400 history tokens from its
    memory patches; 2-init = 23100, 2-post = 18540."""
    from diffusers import HeliosTransformer3DModel

    from helios_train.algorithms.history import HistoryConfig
    from helios_train.model.inputs import _run_patch
    from helios_train.model.inputs import token_counts
    from helios_train.algorithms.pyramid import level_token_counts

    with torch.device("meta"):
        model = HeliosTransformer3DModel()
    per_level = [_run_patch(model.patch_embedding, 9, (48 // f, 80 // f), pad=False) for f in (4, 2, 1)]
    assert per_level == level_token_counts((48, 80), 9) == [540, 2160, 8640]
    hist = token_counts(model, (48, 80), HistoryConfig())["history"]
    assert hist == 2400
    assert sum(n * r for n, r in zip(per_level, [1, 2, 1])) + 4 * hist == 23100
    assert sum(per_level) + 3 * hist == 18540


def test_tokens_per_sample_counts_every_segment(toy_root):
    from helios_train.model.inputs import token_counts

    stage = mid_stage(toy_root)
    hist = token_counts(stage.transformer, (8, 16), stage.cfg.stage.history)["history"]
    assert stage.tokens_per_sample(toy_batch()) == {"noisy": 18 + 2 * 72 + 288, "history": 4 * hist}


def _loss_and_grads(stage, batch, seed=1):
    with torch.no_grad():  # non-zero LoRA B so the adapters take part in the comparison
        g = torch.Generator().manual_seed(0)
        for name, p in sorted(stage.transformer.named_parameters()):
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    loss, logs = stage.loss("generator", batch, 0, torch.Generator().manual_seed(seed))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in stage.transformer.named_parameters() if p.requires_grad}
    return float(loss.detach()), logs, grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_execution_modes_give_the_same_loss_and_gradients(toy_root, checkpointing):
    """separate / batch_levels / packed: identical maths, so identical loss and gradients for the same
    draws — also with gradient checkpointing, which recomputes the packed blocks during backward."""
    batch = toy_batch()
    out = {m: _loss_and_grads(mid_stage(toy_root, f"stage.pyramid.execution={m}",
                                        f"model.gradient_checkpointing={checkpointing}"), batch) for m in MODES}
    ref_loss, ref_logs, ref_grads = out["separate"]
    assert ref_logs["segments"] == 4
    for mode in MODES[1:]:
        loss, logs, grads = out[mode]
        assert abs(loss - ref_loss) < 1e-5, mode
        for k in ("loss_level0", "loss_level1", "loss_level2"):
            assert abs(logs[k] - ref_logs[k]) < 1e-5, (mode, k)
        assert grads.keys() == ref_grads.keys()
        scale = max(float(g.abs().max()) for g in ref_grads.values())
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-5 * scale, rtol=1e-4, msg=f"{mode}: {name}")


def test_packed_attention_is_block_diagonal(toy_root):
    """Perturbing the level-0 draw changes no other segment's prediction in the packed pass."""
    from helios_train.model.packed_forward import packed_forward

    stage = mid_stage(toy_root, "stage.pyramid.execution=packed")
    b = toy_batch()
    segs = stage.segments(b["target"], torch.Generator().manual_seed(2))
    xs, ts = [s.x for s in segs], [s.timestep.float() for s in segs]
    args = (b["x0"], b["history"], b["prompt_embeds"], stage.cfg.stage.history)
    with torch.no_grad():
        ref = packed_forward(stage.transformer, xs, ts, *args)
        moved = packed_forward(stage.transformer, [xs[0] + 1.0, *xs[1:]], ts, *args)
    assert not torch.allclose(moved[0], ref[0])
    for a, c in zip(moved[1:], ref[1:]):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)


def test_packed_processor_leaves_the_stock_forward_unchanged(toy_root):
    from helios_train.model.inputs import model_inputs
    from helios_train.model.packed_forward import SegmentAttnProcessor, install_segment_attention

    stage = mid_stage(toy_root)
    b = toy_batch()
    inputs = model_inputs(b["target"], b["x0"], b["history"], torch.tensor([500.0, 100.0]), b["prompt_embeds"],
                          stage.cfg.stage.history)
    with torch.no_grad():
        before = stage.transformer(**inputs, return_dict=False)[0]
        install_segment_attention(stage.transformer)
        assert all(isinstance(blk.attn1.processor, SegmentAttnProcessor) for blk in stage.transformer.blocks)
        after = stage.transformer(**inputs, return_dict=False)[0]
    assert torch.equal(before, after)


def test_unknown_execution_is_refused(toy_root):
    with pytest.raises(ValueError, match="separate | batch_levels | packed"):
        mid_stage(toy_root, "stage.pyramid.execution=varlen")


@pytest.mark.parametrize("name,expect", [
    ("stage_2_init", dict(lr=1e-4, warmup=1000, ratios=[1, 2, 1], seed=45, patch="frozen", memory="frozen")),
    ("stage_2_post", dict(lr=3e-5, warmup=500, ratios=[1, 1, 1], seed=46, patch="lora", memory="lora")),
    ("stage_2_correct", dict(lr=3e-5, warmup=500, ratios=[1, 1, 1], seed=46, patch="lora", memory="lora")),
])
def test_stage_2_recipes_pin_the_official_values(name, expect):
    """Official `stage_2_init.yaml` / `stage_2_post.yaml` values; `correct` = post + the issue-#38 anti-drift
    changes."""
    cfg = compose([f"experiment={name}", "model=helios_14b"])
    st, tr = cfg.stage, cfg.trainer
    assert st.name == "mid" and list(st.pyramid.sample_ratios) == expect["ratios"]
    assert (st.pyramid.num_stages, st.pyramid.gamma, list(st.pyramid.stage_range), st.pyramid.shift) == (
        3, pytest.approx(1 / 3), pytest.approx([0, 1 / 3, 2 / 3, 1]), 1.0)
    assert st.timesteps.weighting_scheme == "none" and not st.timesteps.use_dynamic_shifting
    assert (st.trainables.lora.rank, st.trainables.lora.alpha, st.trainables.lora.init) == (256, 256, "gaussian")
    assert (st.trainables.patch_embedding, st.trainables.memory_patches) == (expect["patch"], expect["memory"])
    assert (tr.optim.lr, tr.optim.lr_scheduler, tr.optim.warmup_steps) == (expect["lr"], "constant_with_warmup",
                                                                           expect["warmup"])
    assert (list(tr.optim.betas), tr.optim.weight_decay, tr.optim.eps, tr.optim.max_grad_norm) == (
        [0.9, 0.999], 1e-4, 1e-8, 1.0)
    assert (tr.seed, cfg.data.batch_size, tr.checkpoint_every) == (expect["seed"], 1, 500)
    assert list(st.history.history_sizes) == [16, 2, 1] and st.history.latent_window_size == 9
    assert (st.task_dropout.t2v_ratio, st.task_dropout.v2v_ratio) == (0.4, 0.4)
    if name == "stage_2_correct":
        assert (st.anti_drift.mode, st.anti_drift.saturation, st.task_dropout.i2v_ratio) == ("random", True, 0.1)
    else:
        assert (st.anti_drift.mode, st.anti_drift.saturation, st.task_dropout.i2v_ratio) == ("noise", False, 0.0)


@pytest.mark.slow
def test_toy_mid_run_from_base_export_trains(toy_root, tmp_path):
    from helios_train.sampling.export import export

    train(toy_root, tmp_path, ["trainer.max_steps=6", "trainer.checkpoint_every=6", "data.num_workers=0",
                               "run_name=base"])
    exported = export(tmp_path / "base", tmp_path / "base_export")
    train(toy_root, tmp_path, ["stage=mid", f"model.path={exported}", "model.build_toy=false",
                               "stage.trainables.lora.rank=8", "trainer.optim.lr=1e-3", "trainer.optim.warmup_steps=0",
                               "trainer.max_steps=40", "trainer.checkpoint_every=40", "data.num_workers=0",
                               "validation.every=40", "validation.at_first_step=false", "run_name=mid"])
    hist = read_metrics(tmp_path / "mid")
    losses = [m["loss"] for m in hist]
    assert len(losses) == 40 and all(m["segments"] == 4 for m in hist)
    assert np.mean(losses[-8:]) < 0.9 * np.mean(losses[:8]), (np.mean(losses[:8]), np.mean(losses[-8:]))
    assert {"loss_level0", "loss_level1", "loss_level2"} <= set(hist[0])
    # Validation of a Mid checkpoint goes through HeliosPyramidPipeline with CFG-Zero* on.
    record = json.loads((tmp_path / "mid/validation.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 40 and len(record["drift"]["motion"]) == 3
    from helios_train.model.variants import DEFAULTS, build_pipeline

    assert DEFAULTS["mid"].cfg_zero_star
    pipe = build_pipeline("mid", *[None] * 4)
    assert type(pipe).__name__ == "HeliosPyramidPipeline" and pipe.config.is_cfg_zero_star


@pytest.mark.slow
def test_packed_run_matches_separate_run_and_trains(toy_root, tmp_path):
    """The toy checkpoint stands in for a Base checkpoint (model.transformer_path = its transformer/).
    Same seed: the packed run's loss curve equals the separate run's step for step, and falls."""
    common = ["stage=mid", f"model.transformer_path={toy_root}/model/transformer", "stage.trainables.lora.rank=8",
              "trainer.optim.lr=1e-3", "trainer.optim.warmup_steps=0", "trainer.checkpoint_every=30",
              "data.num_workers=0", "trainer.seed=45"]
    train(toy_root, tmp_path, [*common, "trainer.max_steps=30", "stage.pyramid.execution=packed", "run_name=packed"])
    train(toy_root, tmp_path, [*common, "trainer.max_steps=8", "stage.pyramid.execution=separate",
                               "run_name=separate"])
    packed = [m["loss"] for m in read_metrics(tmp_path / "packed")]
    separate = [m["loss"] for m in read_metrics(tmp_path / "separate")]
    np.testing.assert_allclose(packed[:8], separate, rtol=1e-4)
    assert np.mean(packed[-6:]) < 0.9 * np.mean(packed[:6]), (np.mean(packed[:6]), np.mean(packed[-6:]))


@pytest.mark.slow
# ZeRO-3 (every submodule's shards gathered on the way) subsumes ZeRO-2's packed path here; ZeRO-2 Mid runs in
# tests/test_recipe_matrix.py on two processes.
@pytest.mark.parametrize("launcher,mode", [("ddp", "separate"), ("ddp", "packed"), ("deepspeed_zero3", "packed")])
def test_two_processes_match_one_process(toy_root, tmp_path, launcher, mode):
    """Mid on 2 ranks equals 1 process with the same global batch (2 ranks × 1 ≡ 1 rank × 2
    accumulated; one video, so every reader agrees): DDP with several stock forwards through the
    wrapper (separate) or one packed pass on the unwrapped module with backend-averaged gradients;
    ZeRO-2 / ZeRO-3 with the packed pass (ZeRO-3 gathers each submodule's shards on the way)."""
    from test_ddp import env, one_video_shard, overrides

    shard = one_video_shard(toy_root, tmp_path / "one.tar")
    extra = ["stage=mid", "stage.trainables.lora.rank=4", f"stage.pyramid.execution={mode}"]
    train(toy_root, tmp_path, overrides(toy_root, tmp_path, shard, *extra, "trainer.grad_accum_steps=2",
                                        "run_name=single"))
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "helios_train", f"launcher={launcher}",
           *overrides(toy_root, tmp_path, shard, *extra, "run_name=ddp")]
    environ = {k: v for k, v in env().items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.run(cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert len(a) == len(b) == 3
    np.testing.assert_allclose([m["loss"] for m in a], [m["loss"] for m in b], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([m["grad_norm"] for m in a], [m["grad_norm"] for m in b], rtol=1e-4)
