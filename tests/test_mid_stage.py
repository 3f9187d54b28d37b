"""Mid stage (PUPC): segment construction, token budget, execution modes agree, toy run from a Base export."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import compose, train
from helios_train.tracking import read_metrics


def test_segments_follow_sample_ratios_and_shapes(toy_root):
    from helios_train.stages.mid import MidStage

    cfg = compose([f"toy_root={toy_root}", "stage=mid", "stage.trainables.lora.rank=4"])
    stage = MidStage(cfg, torch.device("cpu"))
    clean = torch.randn(2, 4, 9, 8, 16)
    segs = stage.segments(clean, torch.Generator().manual_seed(0))
    assert [s.level for s in segs] == [0, 1, 1, 2]  # [1, 2, 1] in stage_2_init
    assert [tuple(s.x.shape[-2:]) for s in segs] == [(2, 4), (4, 8), (4, 8), (8, 16)]
    for s in segs:
        lv = stage.schedule.levels[s.level]
        assert torch.all((s.timestep <= lv.t_max + 1e-6) & (s.timestep >= lv.t_min - 1e-6))
    # the last level ends at the clean chunk: x at sigma -> end == clean, target = start - clean
    full = segs[-1]
    start = full.x + (1 - full.sigma.float().view(-1, 1, 1, 1, 1)) * full.target  # x + (1-σ)(start-end) = start
    torch.testing.assert_close(start - full.target, clean, atol=1e-5, rtol=1e-5)


def test_mid_token_budget_from_real_patch_layers():
    """Per sample, 2-init at 48×80: 540 + 2·2160 + 8640 noisy and 4 × 2400 history = 23100 (spec §7.2)."""
    from diffusers import HeliosTransformer3DModel

    from helios_train.history import HistoryConfig, token_counts
    from helios_train.pyramid import level_token_counts

    with torch.device("meta"):
        model = HeliosTransformer3DModel()
    hist = token_counts(model, (48, 80), HistoryConfig())["history"]
    levels = level_token_counts((48, 80), 9)
    assert levels == [540, 2160, 8640] and hist == 2400
    assert sum(n * r for n, r in zip(levels, [1, 2, 1])) + 4 * hist == 23100
    assert sum(levels) + 3 * hist == 18540


def test_separate_and_batched_levels_give_the_same_loss(toy_root):
    from helios_train.stages.mid import MidStage

    out = []
    for mode in ("separate", "batch_levels"):
        cfg = compose([f"toy_root={toy_root}", "stage=mid", "stage.trainables.lora.rank=4",
                       f"stage.pyramid.execution={mode}"])
        torch.manual_seed(0)
        stage = MidStage(cfg, torch.device("cpu"))
        stage.bind({"generator": type("R", (), {"model": stage.transformer})()})
        g = torch.Generator().manual_seed(1)
        batch = {"x0": torch.randn(2, 4, 1, 8, 16), "history": torch.randn(2, 4, 19, 8, 16),
                 "target": torch.randn(2, 4, 9, 8, 16), "prompt_embeds": torch.randn(2, 16, 32)}
        loss, logs = stage.loss("generator", batch, 0, g)
        out.append(float(loss))
        assert logs["segments"] == 4
    assert abs(out[0] - out[1]) < 1e-5


@pytest.mark.slow
def test_toy_mid_run_from_base_export_trains(toy_root, tmp_path):
    from helios_train.export import export

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
    import json

    record = json.loads((tmp_path / "mid/validation.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 40 and len(record["drift"]["motion"]) == 3
    from helios_train.variants import DEFAULTS, build_pipeline

    assert DEFAULTS["mid"].cfg_zero_star
    pipe = build_pipeline("mid", *[None] * 4)
    assert type(pipe).__name__ == "HeliosPyramidPipeline" and pipe.config.is_cfg_zero_star
