"""Everything decided before the first step: config checks, toy assets, run directory, resume point.

All checks here run before any model is built, so a bad config or path fails in seconds with a
message that names the key and the rule.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from helios_train.config import ConfigError
from helios_train.config.keys import check_known_keys

from helios_train.backends.lockstep import params_sharded
from helios_train.backends.run_shape import ShapeError, check_resume_shape, current_shape, saved_shape
from helios_train.backends.sequence_groups import sequence_degree
from helios_train.data.readers import choose_layout
from helios_train.data.shards import expand_shards
from helios_train.runtime import checkpoint as ckpt
from helios_train.training.tracking import redact

log = logging.getLogger(__name__)

# What a resume must not change (compared with the run's saved config.yaml): the stage and model
# sections (old checkpoints would be meaningless), and every key that decides which sample is read next
# and which random draws it gets — the saved data positions and the (seed, step, micro-batch) keys of the
# draws would silently point elsewhere. The cluster shape may change (check_shape).
COMPAT_SECTIONS = ("stage", "model")
COMPAT_KEYS = (
    "data.mode", "data.shards", "data.shuffle_buffer", "data.seed", "data.min_chunks", "data.secondary_section",
    "trainer.seed", "trainer.seed_per_rank",
)  # the cluster shape (world, accumulation, batch size, workers, backend) is checked by resume_shape.py


def validate(cfg: DictConfig, dry_run: bool = False) -> None:
    """Config rules checked before any work. `dry_run`: paths that only real weights need are not checked."""
    check_known_keys(cfg)  # (choices and types were checked when the config was composed: config/choices.py)
    tc = cfg.trainer
    for key in ("max_steps", "grad_accum_steps", "log_every", "checkpoint_every"):
        if getattr(tc, key) < 1:
            raise ConfigError(f"trainer.{key}={getattr(tc, key)}: must be >= 1")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}: must be >= 1")
    hist = cfg.stage.history
    if hist.latent_window_size < 1 or any(s < 1 for s in hist.history_sizes):
        raise ConfigError(f"stage.history: sizes {list(hist.history_sizes)} / window {hist.latent_window_size} must be >= 1")
    v = cfg.validation
    if v.every > 0:
        if (v.height is None) != (v.width is None):
            raise ConfigError(f"validation.height={v.height} validation.width={v.width}: give both or neither "
                              f"(neither = the data's resolution)")
        for key in ("height", "width"):
            value = getattr(v, key)
            # VAE ×8 then the latent rule below (×8): validation sizes must be multiples of 64 pixels.
            if value is not None and value % 64:
                raise ConfigError(f"validation.{key}={value}: must be a multiple of 64 pixels "
                                  f"(8× VAE downsampling × 8 for the long memory patch and the pyramid)")
        if v.num_frames < 1:
            raise ConfigError(f"validation.num_frames={v.num_frames}: must be >= 1 (rounded up to 33-frame chunks)")
    _validate_objective(cfg, dry_run)
    if cfg.data.min_chunks < 1:
        raise ConfigError(f"data.min_chunks={cfg.data.min_chunks}: a sample needs at least one 33-frame chunk")
    for key in ("latent_height", "latent_width"):
        value = getattr(cfg.data, key)
        # The long memory patch (4,8,8) and the 3-level pyramid (/4, then the (1,2,2) patch) need /8.
        if value is not None and value % 8:
            raise ConfigError(f"data.{key}={value}: latent height/width must be a multiple of 8 "
                              f"(pixels a multiple of 64) for the long memory patch and the pyramid")


def _validate_objective(cfg: DictConfig, dry_run: bool = False) -> None:
    """Stage, objective and data must agree: ODE regression reads ODE-pair shards, nothing else does."""
    ode_data = cfg.data.mode == "ode_pairs"
    if cfg.stage.name != "distilled":
        if ode_data:
            raise ConfigError(f"data.mode=ode_pairs is for stage=distilled stage.objective=ode, not stage={cfg.stage.name}")
        return
    if (cfg.stage.objective == "ode") != ode_data:
        raise ConfigError(f"stage.objective={cfg.stage.objective} with data.mode={cfg.data.mode}: the ODE objective "
                          "needs ODE-pair shards (data=ode_pairs, helios_train/sampling/ode_pair_capture.py) and DMD needs video latents")
    if cfg.stage.objective == "ode" and cfg.stage.ode.num_chunks > cfg.data.min_chunks:
        raise ConfigError(f"stage.ode.num_chunks={cfg.stage.ode.num_chunks} > data.min_chunks={cfg.data.min_chunks}: "
                          "shorter samples could not supply that many chunks")
    if cfg.stage.ema.enabled and not cfg.stage.ema.sharded and params_sharded(cfg):
        raise ConfigError("stage.ema.sharded=false with launcher.zero_stage=3: ZeRO-3 partitions the generator's "
                          "parameters, so each rank keeps the EMA of its partition; set stage.ema.sharded=true "
                          "(the checkpoint still holds the whole EMA) or use launcher=deepspeed_zero2")
    if cfg.stage.gan.enabled and not cfg.stage.gan.idle_head_updates and cfg.launcher.name == "deepspeed":
        raise ConfigError("stage.gan.idle_head_updates=false needs launcher=single|ddp: DeepSpeed's ZeRO buffers "
                          "give the idle GAN heads zero gradients, so AdamW always steps them (the official behaviour)")
    if cfg.data.secondary_section and cfg.data.mode != "latents":
        raise ConfigError(f"data.secondary_section=true needs data.mode=latents (got {cfg.data.mode})")
    if cfg.stage.objective == "dmd" and not dry_run:
        path = cfg.stage.dmd.real_score_path
        if not path:
            raise ConfigError("stage.dmd.real_score_path is empty: give the teacher/critic base (a Base export folder)")
        if not Path(path).is_dir():
            raise ConfigError(f"stage.dmd.real_score_path={path!r}: no such folder")


def ensure_toy_assets(cfg: DictConfig) -> None:
    if cfg.model.build_toy or cfg.data.build_toy:
        from helios_train.data.toy_assets import ensure_toy_assets as build

        build(Path(cfg.toy_root), seed=cfg.data.toy.seed, spec=cfg.model.toy_spec,
              miniature_size=cfg.data.toy.miniature_size)


def resolve_shards(cfg: DictConfig, world_size: int) -> list[str]:
    """The shard list, checked against the readers a fresh run needs (helios_train/data/readers.py);
    `data.num_workers` is lowered (with a warning) when there are too few shards for one reader each."""
    shards = expand_shards(cfg.data.shards)
    try:
        layout, notes = choose_layout(len(shards), world_size, int(cfg.trainer.grad_accum_steps),
                                      int(cfg.data.num_workers), cfg.data.num_readers)
    except ValueError as exn:
        raise ConfigError(f"{exn} (data.shards={cfg.data.shards})") from None
    for note in notes:
        print(f"[helios-train] WARNING: {note}")
    workers = layout.worker_count(int(cfg.data.num_workers))
    if workers != int(cfg.data.num_workers):
        print(f"[helios-train] WARNING: data.num_workers={cfg.data.num_workers} cannot split the {layout.per_rank} "
              f"reader(s) of a rank evenly: using data.num_workers={workers}")
        cfg.data.num_workers = workers
    return shards


def check_data_fits_model(cfg: DictConfig, shards: list[str]) -> None:
    """Latent channels come from the model (data.latent_channels=null, the default) or must agree with it;
    the first sample of the first shard must match the model's latent channels and text width; a latent
    size left null is the first sample's."""
    import json

    from helios_train.data.first_sample import check_against_model
    from helios_train.model.loading import transformer_config_file

    model = json.loads(Path(transformer_config_file(cfg.model)).read_text())
    channels, text_dim = int(model.get("in_channels", 16)), int(model.get("text_dim", 4096))
    if cfg.data.latent_channels is None:
        cfg.data.latent_channels = channels
    elif int(cfg.data.latent_channels) != channels:
        raise ConfigError(f"data.latent_channels={cfg.data.latent_channels} but model.path's transformer takes "
                          f"{channels} latent channels: drop data.latent_channels (it follows the model)")
    try:
        size = check_against_model(shards[0], cfg.data.mode, channels, text_dim)
    except ValueError as mismatch:
        raise ConfigError(str(mismatch)) from None
    if size is not None and cfg.data.latent_height is None and cfg.data.latent_width is None:
        # One latent size per run (a batch stacks samples): the first sample's, unless given; others are skipped.
        cfg.data.latent_height, cfg.data.latent_width = int(size[0]), int(size[1])


VAE_STRIDE = 8  # pixels per latent cell (Wan VAE, spatial)
OFFICIAL_VALIDATION_SIZE = (384, 640)


def resolve_validation_defaults(cfg: DictConfig, shards: list[str]) -> None:
    """Validation renders what the run trains on unless told otherwise: prompts from `validation.prompts_file`
    or the first shard's captions, size = the data's latent size × 8. Runs after `check_data_fits_model`
    (which fills the latent size from the first sample)."""
    from helios_train.data.first_sample import first_captions
    from helios_train.runtime.prompt_file import InputError, read_prompt_lines
    from helios_train.sampling.validation import TOKYO

    v = cfg.validation
    if v.every <= 0:
        return
    if v.height is None:
        lh, lw = cfg.data.latent_height, cfg.data.latent_width
        h, w = (VAE_STRIDE * lh, VAE_STRIDE * lw) if lh and lw else OFFICIAL_VALIDATION_SIZE
        if h % 64 or w % 64:
            raise ConfigError(f"validation at the data's resolution {h}x{w} (latents {lh}x{lw} × {VAE_STRIDE}) is not "
                              f"a multiple of 64 pixels: set validation.height and validation.width")
        v.height, v.width = h, w
    if v.prompts is None:
        if v.prompts_file:
            try:
                v.prompts = [p for _, p in read_prompt_lines(v.prompts_file, "validation.prompts_file")]
            except InputError as bad:
                raise ConfigError(str(bad)) from None
        else:
            captions = first_captions(shards[0], v.num_data_prompts) if v.num_data_prompts > 0 else []
            if not captions:
                log.warning("validation: no caption in the first samples of %s; rendering the official prompt "
                            "(set validation.prompts or validation.prompts_file)", shards[0])
            v.prompts = captions or [TOKYO]
    elif v.prompts_file:
        raise ConfigError("validation.prompts and validation.prompts_file are both set: keep one")


PATH_KEYS = (("model", "path"), ("model", "transformer_path"))


def plain_config(cfg: DictConfig) -> dict:
    """Resolved, redacted config; model paths made absolute so export/inference work from any cwd."""
    out = redact(OmegaConf.to_container(cfg, resolve=True))
    for section, key in PATH_KEYS:
        if out.get(section, {}).get(key):
            out[section][key] = os.path.abspath(out[section][key])
    return out


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_diff(a, b, path + "."))
        elif a != b:
            out.append(f"  {path}: {a!r} -> {b!r}")
    return out


def check_compatible(run_dir: Path, config: dict) -> None:
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    lines = []
    for section in COMPAT_SECTIONS:
        lines.extend(_diff({section: saved.get(section, {})}, {section: config.get(section, {})}))
    old_cfg, new_cfg = OmegaConf.create(saved), OmegaConf.create(config)
    for key in COMPAT_KEYS:
        a, b = (OmegaConf.select(c, key, default="<absent>") for c in (old_cfg, new_cfg))
        if a != b:
            lines.append(f"  {key}: {a!r} -> {b!r}")
    if lines:
        raise ConfigError(
            f"run {run_dir} was started with a different config; resuming would mix two experiments or "
            "read other samples with other random draws than its checkpoints recorded. Changed keys:\n"
            + "\n".join(lines) + "\nUse a new run_name, or restore these values."
        )
    steps = [OmegaConf.select(c, "trainer.max_steps") for c in (old_cfg, new_cfg)]
    schedule = OmegaConf.select(new_cfg, "trainer.optim.lr_scheduler")
    if steps[0] != steps[1] and schedule != "constant":
        print(f"[helios-train] note: trainer.max_steps {steps[0]} -> {steps[1]} changes the {schedule} LR schedule "
              "from here on")


def check_shape(cfg: DictConfig, resume_from: Path) -> None:
    """A change of cluster shape is allowed unless it changes the global batch or needs state the checkpoint
    does not hold (helios_train/backends/run_shape.py); refused here, before the model loads."""
    state = ckpt.read_json(resume_from / "trainer_state.json")
    now = current_shape(cfg, world_size())
    try:
        check_resume_shape(resume_from, saved_shape(state, now), now, cfg.trainer.allow_batch_change,
                           state.get("portable_checkpoints", False))
    except ShapeError as exn:
        raise ConfigError(str(exn)) from None


def resolve_resume(cfg: DictConfig, run_dir: Path) -> Optional[Path]:
    mode = cfg.resume
    if mode in ("auto", "latest"):
        # A complete-marked checkpoint whose files do not match its marker (truncated, missing) is reported
        # and skipped for the previous one; only an explicit resume=<dir> fails on it.
        latest = ckpt.latest_valid_checkpoint(run_dir)
        if latest is None and mode == "latest":
            raise ConfigError(f"resume=latest but {run_dir} has no complete, readable checkpoint")
        return latest
    if mode == "never":
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is not None:
            raise ConfigError(f"resume=never but {run_dir} already has {latest.name}: use a new run_name or resume=auto")
        return None
    path = Path(mode)
    if not (path / ckpt.MARKER).is_file():
        raise ConfigError(f"resume={mode!r}: not a complete checkpoint directory (no {ckpt.MARKER} marker)")
    problem = ckpt.verify(path)
    if problem is not None:
        raise ConfigError(f"resume={mode!r}: {problem}")
    return path


def record_command(run_dir: Path) -> None:
    """Append this process's command line to `<run>/commands.jsonl` (rank 0, with the run lock held): the run's
    record of every start, resume and change of overrides (config.yaml holds the first start's resolved config)."""
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid(),
            "argv": sys.argv}
    with open(run_dir / "commands.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")


def prepare_run_dir(cfg: DictConfig, is_main: bool) -> tuple[Path, Optional[Path], dict]:
    run_dir = Path(cfg.output_root) / cfg.run_name
    config = plain_config(cfg)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for path in ckpt.remove_incomplete(run_dir):
            print(f"[helios-train] removed incomplete checkpoint {path}")
    resume_from = resolve_resume(cfg, run_dir)
    if resume_from is not None:
        check_compatible(run_dir, config)
        check_shape(cfg, resume_from)
    elif is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    return run_dir, resume_from, config


def check_sequence_parallel(cfg: DictConfig, dry_run: bool = False) -> None:
    """launcher.ulysses_degree / ring_degree against the world size, the stage and every forward's token count
    (helios_train/training/sequence_checks.py; the dry run measures one rank of a sequence group)."""
    from helios_train.training.sequence_checks import check_sequence_split

    try:
        if dry_run:
            check_sequence_split(cfg, sequence_degree(cfg.launcher), "cuda")
        else:
            check_sequence_split(cfg, world_size(), training_device(cfg).type)
    except ValueError as bad:
        raise ConfigError(str(bad)) from None


def data_world(cfg: DictConfig) -> int:
    """Data-parallel ranks of this launch: the world size over the sequence degree (checked to divide it)."""
    from helios_train.backends.sequence_groups import check_world

    try:
        check_world(cfg.launcher, world_size(), training_device(cfg).type)
    except ValueError as bad:
        raise ConfigError(str(bad)) from None
    return world_size() // sequence_degree(cfg.launcher)


def training_device(cfg: DictConfig):
    """The device type the run will train on (`trainer.device`), without touching CUDA state."""
    import torch

    name = cfg.trainer.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))
