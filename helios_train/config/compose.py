"""The config `python -m helios_train <overrides>` runs, from Python: `compose([...])` (a DictConfig) or
`load([...])` (a `Config` dataclass); `helios_train.train(config)` takes either."""
from __future__ import annotations

import re

from helios_train.config.keys import explain_unknown_key
from helios_train.config.schema import CONF_DIR, Config, ConfigError, register_configs
from helios_train.config.stages import STAGE_CONFIGS


def compose(overrides=()):
    """The config `python -m helios_train <overrides>` runs, composed with Hydra's compose API (notebooks,
    benches, tests): e.g. `compose(["experiment=stage_1_init", "model=helios_14b"])`. A value outside its
    choices or of the wrong type raises ConfigError naming the key."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        try:
            return hydra_compose(config_name="config", overrides=list(overrides))
        except ConfigCompositionException as exn:
            raise _explained(exn, overrides) from exn


def _explained(exn, overrides) -> Exception:
    """Hydra's composition error as a ConfigError naming the key, when it is a bad value or an unknown key."""
    from omegaconf.errors import ValidationError

    cause = exn.__cause__
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        return ConfigError(f"{cause.full_key}={cause.value!r}: {str(cause.msg).splitlines()[0]}")
    unknown = re.match(r"Could not override '([\w.]+)'", str(exn))
    if unknown:
        stage = next((o.split("=", 1)[1] for o in overrides if o.startswith("stage=")), "base")
        if stage not in STAGE_CONFIGS:
            return exn
        return ConfigError(explain_unknown_key(unknown.group(1), stage))
    return exn


def load(overrides=()) -> Config:
    """`compose(overrides)` as a `Config` dataclass (interpolations resolved)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(compose(overrides))
