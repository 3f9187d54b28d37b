"""EMA warmup schedule and update rule (official helios/utils/create_ema_zero3.py: `EMAModel_Zero3.get_decay`,
`step`)."""
from __future__ import annotations

import pytest
import torch

from helios_train.algorithms.ema import EMA, EMAConfig, ema_decay


def test_decay_schedule_matches_spec():
    cfg = EMAConfig(enabled=True, decay=0.99, update_after_step=250)
    assert ema_decay(250, cfg) == 0.0 and ema_decay(251, cfg) == 0.0  # k <= 0: plain copy
    assert ema_decay(252, cfg) == pytest.approx(2 / 11)
    first = next(s for s in range(251, 5000) if ema_decay(s, cfg) >= 0.99)
    assert 880 <= first - 250 <= 895  # "reaches 0.99 about 890 EMA steps after start"


def test_update_copy_average_and_swap():
    lin = torch.nn.Linear(3, 2)
    lin.bias.requires_grad_(False)  # frozen tensors are not tracked
    ema = EMA(lin, EMAConfig(enabled=True, decay=0.5, update_after_step=0))
    assert ema.names == ["weight"]
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin, step=1)  # k = 0 → copy
    torch.testing.assert_close(ema.shadow["weight"], torch.ones(2, 3))
    with torch.no_grad():
        lin.weight.fill_(3.0)
    d = ema.update(lin, step=100)  # decay capped at 0.5
    assert d == 0.5
    torch.testing.assert_close(ema.shadow["weight"], torch.full((2, 3), 2.0))
    with ema.swap_into(lin):
        torch.testing.assert_close(lin.weight, torch.full((2, 3), 2.0))
    torch.testing.assert_close(lin.weight, torch.full((2, 3), 3.0))
    state = ema.state_dict()
    other = EMA(lin, EMAConfig())
    other.load_state_dict(state)
    torch.testing.assert_close(other.shadow["weight"], state["weight"])
