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
        if group != "experiment":  # the option's name is the file's, except both ZeRO files name the backend
            assert cfg[group].name == ("deepspeed" if opt.startswith("deepspeed_zero") else opt), (group, opt)


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
    from helios_train.training.run_setup import validate

    with pytest.raises(ValueError, match="stage.name='dream'"):
        validate(compose(["stage.name=dream"]))


def test_bad_choice_and_geometry_fail_naming_value():
    from helios_train.training.run_setup import ConfigError, validate

    with pytest.raises(ConfigError, match="data.mode='video'"):
        validate(compose(["data.mode=video"]))
    with pytest.raises(ConfigError, match="latent_height=12"):
        validate(compose(["data.latent_height=12"]))


def test_validation_geometry_fails_naming_value():
    from helios_train.training.run_setup import ConfigError, validate

    with pytest.raises(ConfigError, match="validation.height=100"):
        validate(compose(["validation.height=100"]))
    with pytest.raises(ConfigError, match="data.min_chunks=0"):
        validate(compose(["data.min_chunks=0"]))


def test_distilled_objective_and_data_must_agree_before_work(tmp_path):
    from helios_train.training.run_setup import ConfigError, validate

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
    # the EMA under ZeRO-3 is the sharded one (helios_train/backends/ema_shards.py): valid
    validate(compose(["stage=distilled", f"stage.dmd.real_score_path={tmp_path}", "launcher=deepspeed_zero3"]))
    with pytest.raises(ConfigError, match="idle_head_updates=false needs launcher=single"):
        validate(compose(["stage=distilled", f"stage.dmd.real_score_path={tmp_path}", "launcher=deepspeed_zero2",
                          "stage.gan.enabled=true", "stage.gan.idle_head_updates=false"]))
    validate(compose(["experiment=stage_3_ode", "data=toy_ode"]))  # the ODE recipe on toy pairs is consistent
    validate(compose(["stage=distilled", f"stage.dmd.real_score_path={tmp_path}"]))


# Leaf keys whose name legitimately appears nowhere in the code as `.name` / "name".
UNREAD_ALLOWED: dict[str, str] = {}


def _leaf_keys(cls, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.name


def _names_read(path) -> set[str]:
    """Attribute names accessed (`x.key`) and dotted-path parts of string constants ("stage.dmd.key",
    getattr/select) in one module; comments and docstrings do not count."""
    import ast

    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.update(node.value.split("."))
    return out


def test_every_config_key_is_read_by_some_code():
    """No config key that nothing reads: every leaf of the schema (every group's keys live in it, extra keys
    fail at composition) is accessed as an attribute or named in a string constant somewhere in helios_train/
    or data_prep/ outside the schema package (comments and docstrings do not count). Static: a name shared with
    an unrelated attribute can hide a dead key (the data.toy size keys were found dead by reading the hits)."""
    from conftest import REPO
    from helios_train.config import STAGE_CONFIGS, Config

    read = set().union(*(_names_read(p) for d in ("helios_train", "data_prep") for p in (REPO / d).rglob("*.py")
                         if "config" not in p.relative_to(REPO).parts))
    leaves = [*_leaf_keys(Config), *(leaf for cls in STAGE_CONFIGS.values() for leaf in _leaf_keys(cls, "stage."))]
    dead = [path for path, name in leaves if path not in UNREAD_ALLOWED and name not in read]
    assert not dead, f"config keys read by nothing: {dead}"


@pytest.mark.parametrize("override,named,suggested", [
    ("+trainer.lr=1", "trainer.lr", "trainer.optim.lr"),  # what Hydra's own error message suggests
    ("++stage.dmd.update_ration=3", "stage.dmd.update_ration", "stage.dmd.update_ratio"),
    ("+learning_rate=1", "learning_rate", None),
])
def test_keys_appended_with_plus_fail_naming_the_key_and_the_nearest_valid_one(override, named, suggested):
    from helios_train.training.run_setup import ConfigError, validate

    cfg = compose([override])
    with pytest.raises(ConfigError) as err:
        validate(cfg, dry_run=True)
    assert f"  {named}" in str(err.value)
    if suggested:
        assert f"did you mean {suggested}?" in str(err.value)
    validate(compose([]), dry_run=True)  # every shipped config passes the check


def test_toy_validation_renders_the_datas_first_caption_at_the_datas_size(toy_root):
    """The toy preset sets how often and how briefly validation renders, not what: prompt and size come from the
    data, so a toy model trained on other data validates on that data's captions (a fixed toy prompt at 64x128
    was rendered whatever the data before)."""
    from helios_train.data.first_sample import first_captions
    from helios_train.training import run_setup

    cfg = compose([f"toy_root={toy_root}", "validation.every=5"])
    shards = run_setup.resolve_shards(cfg, 1)
    run_setup.check_data_fits_model(cfg, shards)
    run_setup.resolve_validation_defaults(cfg, shards)
    assert list(cfg.validation.prompts) == first_captions(shards[0], 1)
    assert (cfg.validation.height, cfg.validation.width) == (8 * cfg.data.latent_height, 8 * cfg.data.latent_width)
