"""Stage algorithms (helios_train/stages/stage.py: what a stage is). `stage=base|mid|distilled` picks one;
`stage=distilled` has two objectives, each its own class (`stage.objective=ode|dmd`)."""
from __future__ import annotations

import importlib

import torch

STAGES = {
    ("t2v", None): "helios_train.stages.t2v:T2VStage",
    ("base", None): "helios_train.stages.base:BaseStage",
    ("mid", None): "helios_train.stages.mid:MidStage",
    ("distilled", "ode"): "helios_train.stages.ode:OdeStage",
    ("distilled", "dmd"): "helios_train.stages.dmd:DmdStage",
}


def stage_class(stage_cfg):
    """The class that runs `stage_cfg` (its name, and its objective where the stage has one)."""
    key = (str(stage_cfg.name), str(stage_cfg.objective) if "objective" in stage_cfg else None)
    module_name, cls_name = STAGES[key].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def build_stage(cfg, device: torch.device, distribution=None):
    return stage_class(cfg.stage)(cfg, device, distribution)
