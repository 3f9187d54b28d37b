"""Experiment tracking: W&B (online / offline / disabled), a metrics.jsonl file and the console.

Only rank 0 tracks. The config sent to W&B and written to disk passes through `redact`, so keys
that look like credentials never leave the process (API keys come from the environment or
`wandb login`, never from our config).

The tracker can never take training down. Once the run has started, a W&B failure (its service gone, the
network, a full disk) is one warning and W&B is dropped for the rest of the process; metrics.jsonl keeps every
value. The case that made this necessary: SLURM signals every process of a job step, W&B's service
(wandb-core) included, and the trainer's next `wandb.log` raised `ConnectionResetError` before it could
checkpoint (a plain `scancel` lost every step since the last checkpoint). Blocking the signals while wandb-core
starts does not help (measured: it unblocks SIGTERM for its own handler), and a service killed that way
leaves its offline file empty (measured: the header only, after 4 logged steps). So: while a stop signal is
pending, values for W&B are held back until the trainer has written its checkpoint (`hold_remote`); every
process's W&B segment is recorded in `wandb_segments.json` and marked `finished` only when `wandb.finish`
returned; a resumed run whose previous segment did not finish rewinds W&B to that segment's start and re-sends
the steps from metrics.jsonl, so the W&B history (online, or every offline folder synced in order) is one
consistent copy of metrics.jsonl whatever killed the previous process.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
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
        self.failure: str | None = None  # why W&B was dropped mid-run, if it was
        self.hold_remote: Callable[[], bool] = lambda: False  # set by the trainer: a stop signal is pending
        self._held: list[dict] = []  # W&B calls held back while `hold_remote()`, sent by `flush_held`
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
        rewind = resume_step
        previous = self.segments()[-1] if self.segments() else None
        if resume_step is not None and previous and previous["id"] == run_id and not previous.get("finished"):
            # that process's W&B never finished (killed, or its service was): what it sent may be lost
            rewind = min(resume_step, previous["resumed_after_step"] or 0)
        self.run = self._init_with_retry(wandb, run_id, id_file, rewind)
        self._record_segment(rewind, resume_step)
        if rewind is not None and rewind < resume_step and self.run is not None:
            self._resend(rewind, resume_step)

    def segments(self) -> list[dict]:
        return json.loads(self.segments_path.read_text()) if self.segments_path.is_file() else []

    def _resend(self, after: int, upto: int) -> None:
        """Send metrics.jsonl's steps in (after, upto] to W&B (validation media are not re-sent)."""
        for row in read_metrics(self.run_dir):
            if after < row["step"] <= upto:
                self._remote({k: v for k, v in row.items() if k != "step"}, row["step"])
        log.warning("the previous process's W&B run did not finish (killed, or its service was), so what it sent "
                    "may be lost: rewound W&B to step %d and re-sent steps %d-%d from %s", after, after + 1, upto,
                    self.metrics_path)

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

    def _record_segment(self, resume_step: int | None, checkpoint_step: int | None) -> None:
        """`wandb_segments.json`: every process that logged to this run's W&B id, where its files are and the
        step it started from — an offline run resumed N times has N folders, synced as one run by
        `wandb sync <run>/wandb/offline-run-*` (same id, in start order; each rewinds to its start)."""
        segments = self.segments()
        segments.append({"id": self.run.id, "dir": str(Path(self.run.dir).parent), "mode": self.cfg.mode,
                         "resumed_after_step": resume_step, "checkpoint_step": checkpoint_step,
                         "starting_step": int(self.run.starting_step), "finished": False})
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
        self._remote({**scalars, **(media or {})}, step)

    def _remote(self, values: dict, step: int) -> None:
        """Send to W&B now, or hold back while a stop signal is pending (the checkpoint comes first)."""
        if self.run is None:
            return
        if self.hold_remote():
            self._held.append({"values": values, "step": step})
            return
        self._guarded("log", lambda: self.run.log(values, step=step))

    def flush_held(self) -> None:
        """Send what `hold_remote` held back, whatever `hold_remote` says now (`finish` calls it: the trainer has
        written its checkpoint by then)."""
        held, self._held = self._held, []
        for item in held:
            if self.run is None:
                return
            self._guarded("log", lambda item=item: self.run.log(item["values"], step=item["step"]))

    def _guarded(self, what: str, call: Callable[[], Any]) -> bool:
        """Run a W&B call; on any failure warn once and drop W&B for the rest of this process. Whether it ran."""
        try:
            call()
            return True
        except Exception as exn:  # wandb raises ConnectionResetError, CommError, OSError, its own errors...
            self.failure = f"{type(exn).__name__}: {exn}"
            log.warning("W&B failed during %s (%s); training goes on without it, every value is still in %s",
                        what, self.failure, self.metrics_path)
            self.run = None
            return False

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
            self._remote({**media, **scalars}, step)

    def summary(self, values: dict[str, Any]) -> None:
        def write() -> None:
            for k, v in values.items():
                self.run.summary[k] = v

        if self.run is not None:
            self._guarded("summary", write)

    def finish(self, exit_code: int | None = None) -> None:
        self.flush_held()
        if self.run is not None:
            run, self.run = self.run, None
            if self._guarded("finish", lambda: run.finish(exit_code=exit_code)):
                segments = self.segments()
                segments[-1]["finished"] = True  # this process's segment: its records are all on disk / sent
                write_text_atomically(self.segments_path, json.dumps(segments, indent=1))


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
