"""Experiment tracking: W&B (online / offline / disabled), a metrics.jsonl file and the console.

Only rank 0 tracks. The config sent to W&B and written to disk passes through `redact`, so keys
that look like credentials never leave the process (API keys come from the environment or
`wandb login`, never from our config).
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)
SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.IGNORECASE)


def redact(obj: Any) -> Any:
    """Copy of a plain config dict with credential-looking keys replaced by "<redacted>"."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET_KEY.search(str(k)) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


class Tracker:
    def __init__(self, tracker_cfg, run_dir: Path, run_name: str, config: dict, enabled: bool):
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.run = None
        if not enabled:
            return
        if tracker_cfg.mode not in ("online", "offline", "disabled"):
            raise ValueError(f"tracker.mode={tracker_cfg.mode!r}: expected online | offline | disabled")
        if tracker_cfg.mode != "disabled":
            import wandb

            id_file = run_dir / "wandb_run_id.txt"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.run = self._init_with_retry(wandb, tracker_cfg, run_name, run_id, id_file, run_dir, config)

    @staticmethod
    def _init_with_retry(wandb, tracker_cfg, run_name, run_id, id_file, run_dir, config, attempts: int = 15):
        """Resume the run's W&B id; after a SIGKILL the dead trainer's wandb service can still hold the
        id for a few seconds ("run ID ... is in use"), so wait for it, then fall back to a new id."""
        for attempt in range(attempts + 1):
            try:
                return wandb.init(
                    project=tracker_cfg.project,
                    entity=tracker_cfg.entity,
                    name=run_name,
                    id=run_id,
                    resume="allow",  # a resumed training run continues the same W&B run
                    mode=tracker_cfg.mode,
                    dir=str(run_dir),
                    config=redact(config),
                    tags=list(tracker_cfg.tags),
                    settings=wandb.Settings(silent=True),
                )
            except Exception as exn:  # wandb raises its own ServerResponseError
                if "in use" not in str(exn):
                    raise
                if attempt == attempts - 1:
                    log.warning("W&B run id %s still in use; continuing under a new id", run_id)
                    run_id = uuid.uuid4().hex[:12]
                    id_file.write_text(run_id)
                else:
                    time.sleep(2.0)
        raise RuntimeError(f"could not start a W&B run in {run_dir}")

    def truncate_after(self, step: int) -> None:
        """Drop metric lines written after `step` by a run that died before its next checkpoint."""
        if not self.enabled or not self.metrics_path.is_file():
            return
        kept = [ln for ln in self.metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, values: dict[str, Any], media: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        scalars = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in values.items()}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps({"step": step, **scalars}) + "\n")
        if self.run is not None:
            self.run.log({**scalars, **(media or {})}, step=step)

    def log_media(self, step: int, videos: dict[str, Path], drift: Optional[dict[str, list[float]]]) -> None:
        """Validation videos (mp4 paths) and the per-chunk drift curve (values relative to chunk 0)."""
        if not self.enabled:
            return
        scalars = {f"drift/{k}_last_chunk": v[-1] for k, v in (drift or {}).items()}
        with open(self.metrics_path.with_name("validation.jsonl"), "a") as fh:
            fh.write(json.dumps({"step": step, "videos": [str(p) for p in videos.values()], "drift": drift}) + "\n")
        if self.run is not None:
            import wandb

            media: dict[str, Any] = {k: wandb.Video(str(p), format="mp4") for k, p in videos.items()}
            if drift:
                chunks = list(range(len(next(iter(drift.values())))))
                media["validation/drift"] = wandb.plot.line_series(
                    xs=chunks, ys=[drift[k] for k in drift], keys=list(drift), title=f"drift vs chunk 0 (step {step})",
                    xname="chunk")
            self.run.log({**media, **scalars}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def finish(self, exit_code: int | None = None) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln]


def wandb_env_defaults() -> None:
    # Keep wandb from prompting for a login in non-interactive runs; online mode still needs a key.
    os.environ.setdefault("WANDB_SILENT", "true")
