"""Adding a model family touches only helios_train/model/: an adapter (helios_train/model/adapter.py) registered
under a name, picked with `model.family=<name>`. Here a family whose transformer is built from the checkpoint's
config.json with fresh random weights (a from-scratch run) trains the toy Base stage through the unchanged
stages, trainer and backends."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import train
from helios_train.model import FAMILIES, adapter_for, register_family
from helios_train.model.helios import HeliosAdapter
from helios_train.training.tracking import read_metrics


class FromScratchAdapter(HeliosAdapter):
    """Helios inputs and trainables, but no weights read: the architecture of model.path, initialised anew."""

    family = "helios_from_scratch"
    loaded: list[str] = []

    def load(self, model_cfg, trainables_cfg=None, device="cpu"):
        from diffusers import HeliosTransformer3DModel

        from helios_train.model.fake_weights import transformer_config

        torch.manual_seed(1234)
        model = HeliosTransformer3DModel.from_config(transformer_config(model_cfg))
        FromScratchAdapter.loaded.append(model_cfg.path)
        return model.to(device)


@pytest.fixture
def from_scratch():
    register_family(FromScratchAdapter.family, FromScratchAdapter)
    yield FromScratchAdapter
    FAMILIES.pop(FromScratchAdapter.family)


def test_a_registered_family_trains_through_the_unchanged_stages(toy_root, tmp_path, from_scratch):
    common = ["trainer.max_steps=3", "trainer.checkpoint_every=3", "data.num_workers=0"]
    train(toy_root, tmp_path, common + [f"model.family={from_scratch.family}", "run_name=scratch"])
    train(toy_root, tmp_path, common + ["run_name=pretrained"])
    assert from_scratch.loaded == [str(toy_root / "model")]  # the adapter built the generator, once
    scratch, pretrained = read_metrics(tmp_path / "scratch"), read_metrics(tmp_path / "pretrained")
    assert [m["step"] for m in scratch] == [1, 2, 3] and all(math.isfinite(m["loss"]) for m in scratch)
    # Same data, draws and LoRA init; other base weights: other losses from the first step on.
    assert scratch[0]["loss"] != pytest.approx(pretrained[0]["loss"], rel=1e-3)


def test_an_unknown_family_is_refused_naming_the_registered_ones(toy_root, tmp_path):
    with pytest.raises(ValueError, match=r"model.family='wan_causal'.*\['helios'\]"):
        adapter_for(type("M", (), {"family": "wan_causal"})())
