"""`python -m helios_train evaluate` without a model: chunk pairing, the copy-last-frame baseline, the scores of a
rollout against its ground truth, and the report it writes (JSON, markdown, plots, grid)."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from helios_train.data import miniature_world as world
from helios_train.evaluation.continuation import chunk_pairs, copy_last_frame
from helios_train.evaluation.evaluate import parse_export
from helios_train.evaluation.report import write_report
from helios_train.evaluation.scores import continuation_scores, distribution_scores, mean_curves


@pytest.fixture(scope="module")
def clip():
    c = world.split_clips("heldout", 1)[0]
    return c, world.render(c, np.arange(5 * world.CHUNK_FRAMES))


def test_generated_chunk_k_is_compared_with_true_chunk_k_plus_1(clip):
    _, truth = clip
    generated = truth[world.CHUNK_FRAMES:]  # a perfect continuation (trimmed like the pipeline's 4n+1 output)
    pairs = chunk_pairs(generated[:-2], truth, 4)
    assert len(pairs) == 4 and len(pairs[-1][0]) == world.CHUNK_FRAMES - 2
    scores = continuation_scores(generated[:-2], truth, 4)
    assert scores["psnr"] == [100.0] * 4 and np.allclose(scores["ssim"], 1.0)
    shifted = truth[:-world.CHUNK_FRAMES]  # one chunk late: every chunk misplaced
    assert max(continuation_scores(shifted, truth, 4)["psnr"]) < 40


def test_copy_last_frame_holds_the_last_given_frame(clip):
    _, truth = clip
    held = copy_last_frame(truth[:world.CHUNK_FRAMES], 3)
    assert held.shape == (3 * world.CHUNK_FRAMES, 64, 64, 3)
    assert (held == truth[world.CHUNK_FRAMES - 1]).all()
    scores = distribution_scores(held, truth, 3)
    assert scores["motion"] == [0.0, 0.0, 0.0]  # a still video
    assert len(scores["boundary_jump"]) == 2


def test_mean_curves_average_clips_of_unequal_length():
    assert mean_curves([{"psnr": [10.0, 20.0]}, {"psnr": [30.0]}]) == {"psnr": [20.0, 20.0]}


def test_export_argument_names_a_diffusers_folder(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    assert parse_export(f"Base={tmp_path}") == ("Base", str(tmp_path), None)
    assert parse_export(f"Mid weights={tmp_path}:distilled") == ("Mid weights", str(tmp_path), "distilled")
    with pytest.raises(argparse.ArgumentTypeError, match="no model_index.json"):
        parse_export(f"x={tmp_path / 'missing'}")
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=FOLDER"):
        parse_export(str(tmp_path))


def test_report_writes_table_plots_and_grid(tmp_path, clip):
    _, truth = clip
    gen = truth[world.CHUNK_FRAMES:]
    results = {"data": "x", "clips": 1, "chunks": 4, "variants": {
        "perfect": {"variant": "base", **continuation_scores(gen, truth, 4),
                    "distribution": distribution_scores(gen, truth, 4), "cost": {"forwards": 100.0, "tflops": 0.01,
                                                                                  "seconds": 1.0},
                    "adherence": {"score": 1.0, "per_chunk": [1.0] * 4}, "_videos": [gen]},
        "copy last frame": {"variant": "baseline", **continuation_scores(copy_last_frame(truth[:33], 4), truth, 4)}}}
    write_report(results, tmp_path, ["clip"])
    table = (tmp_path / "results.md").read_text()
    assert "| perfect | 100.00 |" in table and "| copy last frame |" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "_videos" not in saved["variants"]["perfect"] and saved["clip_keys"] == ["clip"]
    for name in ("psnr_per_chunk.png", "quality_vs_flops.png", "grid.mp4"):
        assert (tmp_path / name).stat().st_size > 1000
    assert json.loads((tmp_path / "grid.json").read_text())["columns"] == ["perfect"]
