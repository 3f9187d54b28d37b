"""Every config in conf/ composes; typos and unknown options fail at start-up naming the culprit."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose

GROUPS = ["stage", "model", "data", "launcher", "tracker", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group):
    opts = options(group)
    if group != "experiment":
        assert opts, f"conf/{group} has no option"
    for opt in opts:
        cfg = compose([f"{group}={opt}"])
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every value resolves
        if group not in ("experiment",):
            assert cfg[group].name in (opt, cfg[group].name)


def test_default_is_toy_base():
    cfg = compose([])
    assert (cfg.stage.name, cfg.model.name, cfg.data.name) == ("base", "toy", "toy")
    assert cfg.tracker.mode == "offline"
    assert cfg.run_name == "base-toy-toy"


def test_misspelled_key_fails_naming_it():
    with pytest.raises(Exception, match="lr_rate"):
        compose(["trainer.optim.lr_rate=1e-4"])


def test_misspelled_nested_stage_key_fails_naming_it():
    with pytest.raises(Exception, match="noise_ratio_shortt"):
        compose(["stage.anti_drift.noise_ratio_shortt=0.5"])


def test_wrong_type_fails_naming_key():
    with pytest.raises(Exception, match="max_steps"):
        compose(["trainer.max_steps=many"])


def test_unknown_group_option_fails_naming_it():
    with pytest.raises(Exception, match="bse"):
        compose(["stage=bse"])


def test_unknown_stage_name_fails_before_work():
    from helios_train.run_setup import validate

    with pytest.raises(ValueError, match="stage.name='dream'"):
        validate(compose(["stage.name=dream"]))


def test_bad_choice_and_geometry_fail_naming_value():
    from helios_train.run_setup import ConfigError, validate

    with pytest.raises(ConfigError, match="data.mode='video'"):
        validate(compose(["data.mode=video"]))
    with pytest.raises(ConfigError, match="latent_height=12"):
        validate(compose(["data.latent_height=12"]))


def test_validation_geometry_fails_naming_value():
    from helios_train.run_setup import ConfigError, validate

    with pytest.raises(ConfigError, match="validation.height=100"):
        validate(compose(["validation.height=100"]))
    with pytest.raises(ConfigError, match="data.min_chunks=0"):
        validate(compose(["data.min_chunks=0"]))


def test_distilled_objective_and_data_must_agree_before_work(tmp_path):
    from helios_train.run_setup import ConfigError, validate

    with pytest.raises(ConfigError, match="stage.objective=ode with data.mode=latents"):
        validate(compose(["stage=distilled", "stage.objective=ode"]))
    with pytest.raises(ConfigError, match="data.mode=ode_pairs is for stage=distilled"):
        validate(compose(["data=toy_ode"]))
    with pytest.raises(ConfigError, match="real_score_path is empty"):
        validate(compose(["stage=distilled"]))
    with pytest.raises(ConfigError, match="real_score_path='/nowhere'"):
        validate(compose(["stage=distilled", "stage.dmd.real_score_path=/nowhere"]))
    with pytest.raises(ConfigError, match="stage.objective='gan'"):
        validate(compose(["stage=distilled", "stage.objective=gan"]))
    with pytest.raises(ConfigError, match="stage.ema.sharded=false with launcher.zero_stage=3"):
        validate(compose(["stage=distilled", f"stage.dmd.real_score_path={tmp_path}", "launcher=deepspeed_zero3",
                          "stage.ema.sharded=false"]))
    # the EMA under ZeRO-3 is the sharded one (helios_train/ema_shards.py): valid
    validate(compose(["stage=distilled", f"stage.dmd.real_score_path={tmp_path}", "launcher=deepspeed_zero3"]))
    with pytest.raises(ConfigError, match="idle_head_updates=false needs launcher=single"):
        validate(compose(["stage=distilled", f"stage.dmd.real_score_path={tmp_path}", "launcher=deepspeed_zero2",
                          "stage.gan.enabled=true", "stage.gan.idle_head_updates=false"]))
    validate(compose(["experiment=stage_3_ode", "data=toy_ode"]))  # the ODE recipe on toy pairs is consistent
    validate(compose(["stage=distilled", f"stage.dmd.real_score_path={tmp_path}"]))
