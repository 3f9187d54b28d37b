"""Tests for helios_train.algorithms.task_dropout (official helios/utils/utils_helios_base.py:
`prepare_stage1_clean_input_from_latents`).

Statistical tolerances: a fraction p estimated from n draws has sd sqrt(p(1−p)/n); every bound below
is ≥ 4.5 sd, so a correct implementation fails with probability < 1e-5 per check (and the seeds
are fixed, so the tests are deterministic anyway).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections import Counter

import pytest
import torch

from helios_train.algorithms.task_dropout import TaskDropoutConfig, apply_task_dropout


def _ones(b, t=19):
    return torch.ones(b, 2, 1, 2, 2), torch.ones(b, 2, t, 2, 2)


def _dropped(history):
    """Number of zeroed (oldest) frames per sample; asserts zeros are a prefix in time."""
    alive = history.flatten(3).ne(0).any(dim=(1, 3))  # [B, T]
    n = (~alive).sum(dim=1)
    for i, k in enumerate(n.tolist()):
        assert not alive[i, :k].any() and alive[i, k:].all()
    return n


def test_each_task_zeroes_the_right_frames():
    x0, hist = _ones(1)
    g = torch.Generator().manual_seed(0)
    x, h, task = apply_task_dropout(x0, hist, TaskDropoutConfig(t2v_ratio=1.0), g)
    assert task == ["t2v"] and x.abs().sum() == 0 and h.abs().sum() == 0
    x, h, task = apply_task_dropout(x0, hist, TaskDropoutConfig(t2v_ratio=0.0, i2v_ratio=1.0), g)
    assert task == ["i2v"] and x.abs().sum() > 0 and _dropped(h).tolist() == [18]  # newest frame kept
    for k, expected in ((0, 1), (1, 10), (2, 19)):
        cfg = TaskDropoutConfig(t2v_ratio=0.0, v2v_ratio=1.0, v2v_k_choices=[k])
        x, h, task = apply_task_dropout(x0, hist, cfg, g)
        assert task == ["v2v"] and torch.equal(x, x0) and _dropped(h).tolist() == [expected]
    x, h, task = apply_task_dropout(x0, hist, TaskDropoutConfig(t2v_ratio=0.0, v2v_ratio=0.0), g)
    assert task == ["none"] and torch.equal(h, hist)
    # inputs are not modified in place
    assert hist.min() == 1 and x0.min() == 1


def test_disabled_is_identity():
    x0, hist = _ones(3)
    x, h, task = apply_task_dropout(x0, hist, TaskDropoutConfig(enabled=False, t2v_ratio=1.0), torch.Generator())
    assert x is x0 and h is hist and task == ["none"] * 3


def _mix(cfg, calls, b):
    g = torch.Generator().manual_seed(1)
    x0, hist = _ones(b)
    tasks, drops = Counter(), Counter()
    for _ in range(calls):
        _, h, task = apply_task_dropout(x0, hist, cfg, g)
        tasks.update(task)
        for t, d in zip(task, _dropped(h).tolist()):
            if t == "v2v":
                drops[d] += 1
    n = calls * b
    return {k: tasks[k] / n for k in ("t2v", "i2v", "v2v", "none")}, drops


@pytest.mark.parametrize("per_sample,calls,b,tol", [(False, 4000, 1, 0.035), (True, 4, 5000, 0.035)])
def test_stage1_mix(per_sample, calls, b, tol):
    frac, drops = _mix(TaskDropoutConfig(per_sample=per_sample), calls, b)
    assert frac["t2v"] == pytest.approx(0.40, abs=tol)
    assert frac["i2v"] == 0.0
    assert frac["v2v"] == pytest.approx(0.24, abs=tol)
    assert frac["none"] == pytest.approx(0.36, abs=tol)
    total = sum(drops.values())
    assert set(drops) == {1, 10, 19}
    for d in (1, 10, 19):  # V2V drop sizes equally likely
        assert drops[d] / total == pytest.approx(1 / 3, abs=0.07)


def test_stage3_mix():
    frac, _ = _mix(TaskDropoutConfig(t2v_ratio=0.4, v2v_ratio=0.5, per_sample=True), 2, 10000)
    assert frac["t2v"] == pytest.approx(0.40, abs=0.025)
    assert frac["i2v"] == 0.0
    assert frac["v2v"] == pytest.approx(0.30, abs=0.025)
    assert frac["none"] == pytest.approx(0.30, abs=0.025)


def test_i2v_is_drawn_before_v2v():
    # correct.yaml style i2v 0.1: I2V = 0.6·0.1 = 0.06, V2V = 0.6·0.9·0.4 = 0.216
    frac, _ = _mix(TaskDropoutConfig(i2v_ratio=0.1, per_sample=True), 2, 10000)
    assert frac["i2v"] == pytest.approx(0.06, abs=0.012)
    assert frac["v2v"] == pytest.approx(0.216, abs=0.02)


def test_per_batch_vs_per_sample():
    x0, hist = _ones(64)
    g = torch.Generator().manual_seed(3)
    seen_mixed = False
    for _ in range(20):
        _, _, task = apply_task_dropout(x0, hist, TaskDropoutConfig(), g)
        assert len(set(task)) == 1  # official: one task for the whole batch
        _, _, task = apply_task_dropout(x0, hist, TaskDropoutConfig(per_sample=True), g)
        seen_mixed |= len(set(task)) > 1
    assert seen_mixed


def test_same_generator_same_result_and_global_rng_untouched():
    x0, hist = torch.randn(4, 2, 1, 2, 2), torch.randn(4, 2, 19, 2, 2)
    torch.manual_seed(9)
    ref = torch.rand(2)
    torch.manual_seed(9)
    a = apply_task_dropout(x0, hist, TaskDropoutConfig(per_sample=True), torch.Generator().manual_seed(7))
    assert torch.equal(torch.rand(2), ref)
    b = apply_task_dropout(x0, hist, TaskDropoutConfig(per_sample=True), torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
