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

from helios_train.runtime.atomic_file import write_text_atomically

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
    """metrics.jsonl + W&B on rank 0. `start(resume_step)` opens both once the resume point is known, so a
    resumed run's history continues exactly after its checkpoint (steps logged after it by the run that
    died are dropped: from metrics.jsonl here, from W&B by rewinding the run to the checkpoint's step)."""

    def __init__(self, tracker_cfg, run_dir: Path, run_name: str, config: dict, enabled: bool):
        self.enabled = enabled
        self.cfg, self.run_dir, self.run_name, self.config = tracker_cfg, run_dir, run_name, config
        self.metrics_path = run_dir / "metrics.jsonl"
        self.segments_path = run_dir / "wandb_segments.json"
        self.run = None
        if enabled and tracker_cfg.mode not in ("online", "offline", "disabled"):
            raise ValueError(f"tracker.mode={tracker_cfg.mode!r}: expected online | offline | disabled")

    def start(self, resume_step: int | None = None) -> None:
        if not self.enabled:
            return
        if resume_step is not None:
            self.truncate_after(resume_step)
        if self.cfg.mode == "disabled":
            return
        import wandb

        id_file = self.run_dir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = self._init_with_retry(wandb, run_id, id_file, resume_step)
        self._record_segment(resume_step)

    def _init_args(self, wandb, run_id: str, resume_step: int | None) -> dict:
        args = dict(project=self.cfg.project, entity=self.cfg.entity, name=self.run_name, id=run_id,
                    mode=self.cfg.mode, dir=str(self.run_dir), config=redact(self.config), tags=list(self.cfg.tags),
                    settings=wandb.Settings(silent=True))
        if resume_step is not None and supports_rewind(wandb):
            # The run continues from the checkpoint's step: W&B drops anything logged at or before it
            # from here on and, when synced, rewinds the server's history to it (wandb's `resume_from`).
            args["resume_from"] = f"{run_id}?_step={resume_step}"
        else:
            args["resume"] = "allow"  # a fresh run, or a wandb without rewind (steps after the checkpoint repeat)
        return args

    def _init_with_retry(self, wandb, run_id, id_file, resume_step, attempts: int = 15):
        """Resume the run's W&B id; after a SIGKILL the dead trainer's wandb service can still hold the
        id for a few seconds ("run ID ... is in use"), so wait for it, then fall back to a new id. A server
        that refuses the rewind (not enabled, run not finished yet) gets a plain resume, said in a warning."""
        rewind = True
        for attempt in range(attempts + 1):
            try:
                return wandb.init(**self._init_args(wandb, run_id, resume_step if rewind else None))
            except Exception as exn:  # wandb raises its own ServerResponseError / CommError
                if rewind and resume_step is not None and "rewind" in str(exn).lower():
                    log.warning("W&B could not rewind run %s to step %d (%s): resuming it plainly; the steps "
                                "logged after that checkpoint by the run that stopped will appear twice",
                                run_id, resume_step, exn)
                    rewind = False
                    continue
                if "in use" not in str(exn):
                    raise
                if attempt == attempts - 1:
                    log.warning("W&B run id %s still in use; continuing under a new id", run_id)
                    run_id = uuid.uuid4().hex[:12]
                    id_file.write_text(run_id)
                else:
                    time.sleep(2.0)
        raise RuntimeError(f"could not start a W&B run in {self.run_dir}")

    def _record_segment(self, resume_step: int | None) -> None:
        """`wandb_segments.json`: every process that logged to this run's W&B id, where its files are and the
        step it started from — an offline run resumed N times has N folders, synced as one run by
        `wandb sync <run>/wandb/offline-run-*` (same id, in start order; each rewinds to its start)."""
        segments = json.loads(self.segments_path.read_text()) if self.segments_path.is_file() else []
        segments.append({"id": self.run.id, "dir": str(Path(self.run.dir).parent), "mode": self.cfg.mode,
                         "resumed_after_step": resume_step, "starting_step": int(self.run.starting_step)})
        write_text_atomically(self.segments_path, json.dumps(segments, indent=1))
        if self.cfg.mode == "offline" and len(segments) > 1:
            log.info("W&B offline: this run has %d segments; sync them as one run with: wandb sync %s/wandb/"
                     "offline-run-*-%s", len(segments), self.run_dir, self.run.id)

    def truncate_after(self, step: int) -> None:
        """Drop metric lines written after `step` by a run that died before its next checkpoint (the file is
        replaced whole: a kill during the rewrite leaves the old file, never a half one)."""
        if not self.enabled or not self.metrics_path.is_file():
            return
        kept = [ln for ln in self.metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        write_text_atomically(self.metrics_path, "".join(ln + "\n" for ln in kept))

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


def supports_rewind(wandb) -> bool:
    """wandb.init(resume_from=...) exists and works offline (wandb >= 0.20)."""
    import inspect

    return "resume_from" in inspect.signature(wandb.init).parameters


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln]


def wandb_env_defaults() -> None:
    # Keep wandb from prompting for a login in non-interactive runs; online mode still needs a key.
    os.environ.setdefault("WANDB_SILENT", "true")
