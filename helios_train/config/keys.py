"""Keys the schema does not have: found, named, and matched to the key the user most likely meant.

Hydra refuses an unknown key on the command line ("Could not override ..."), but `+key=value` / `++key=value`
append it and nothing would ever read it; a key of another stage (`stage.pyramid.*` under stage=base) is
unknown too. Both are reported here with the nearest valid key, or the stage that has it."""
from __future__ import annotations

import difflib
from dataclasses import is_dataclass
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from helios_train.config.schema import ConfigError, typed_schema
from helios_train.config.stages import STAGE_CONFIGS


def unknown_keys(cfg: DictConfig, schema: DictConfig, prefix: str = "") -> list[str]:
    """Leaf keys of `cfg` that the structured schema does not have (an unknown section is listed by its leaves,
    so `++stage.dmd.update_ration=3` under stage=base names `stage.dmd.update_ration`)."""
    out, known = [], set(schema.keys())  # (`key in schema` is False for a MISSING value)
    for key in cfg.keys():
        path, node = f"{prefix}{key}", cfg._get_node(key)
        if key not in known:
            out.extend(_leaf_paths(node, path + ".") if isinstance(node, DictConfig) else [path])
            continue
        spec = schema._get_node(key)
        if isinstance(node, DictConfig) and isinstance(spec, DictConfig) and is_dataclass(OmegaConf.get_type(spec)):
            out.extend(unknown_keys(node, spec, path + "."))
    return out


def _leaf_paths(node: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and (is_dataclass(OmegaConf.get_type(child)) or child.keys()):
            out.extend(_leaf_paths(child, f"{prefix}{key}."))
        else:
            out.append(f"{prefix}{key}")
    return out


def nearest_key(path: str, paths: list[str]) -> Optional[str]:
    """The key a misspelled or misplaced `path` most likely meant: one with the same last name if any
    (trainer.lr → trainer.optim.lr), else the closest spelling."""
    leaf = path.rsplit(".", 1)[-1]
    same_leaf = [p for p in paths if p.rsplit(".", 1)[-1] == leaf]
    pool = same_leaf or paths
    close = difflib.get_close_matches(path, pool, n=1, cutoff=0.0 if same_leaf else 0.6)
    return close[0] if close else None


def hint(path: str, stage_name: str) -> str:
    """What `path` most likely meant: the nearest key of this run's schema, or, for a `stage.*` key that only
    another stage has (or nearly has), that key and its stage."""
    own = _leaf_paths(typed_schema(stage_name))
    if path.startswith("stage."):
        others = {p: str(name) for name in STAGE_CONFIGS if name != stage_name
                  for p in _leaf_paths(typed_schema(name)) if p not in own}
        near = nearest_key(path, list(others))
        if near == path:
            return f"a key of stage={others[near]} only"
        if near is not None and difflib.SequenceMatcher(None, path, near).ratio() >= 0.9:
            return f"did you mean {near}? a key of stage={others[near]} only"
    near = nearest_key(path, own)
    return f"did you mean {near}?" if near else ""


def check_known_keys(cfg: DictConfig) -> None:
    """Fail naming every key that `+key=` / `++key=` added and the schema lacks, with the nearest valid key."""
    unknown = unknown_keys(cfg, typed_schema(cfg.stage.name))
    if unknown:
        hints = [f"  {path}" + (f" ({h})" if (h := hint(path, cfg.stage.name)) else "") for path in unknown]
        raise ConfigError("config keys that nothing reads (added with + or ++?):\n" + "\n".join(hints)
                          + "\nSet an existing key without +, e.g. trainer.optim.lr=1e-4.")


def explain_unknown_key(path: str, stage_name: str) -> str:
    """`path: no such key (...)` for a key the composed config refused."""
    h = hint(path, stage_name)
    return f"{path}: no such key" + (f" ({h})" if h else "")
