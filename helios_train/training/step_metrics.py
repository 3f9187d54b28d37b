"""What one training step logs: the stage's values, time and samples/s, the callbacks' metrics (throughput),
data read and skipped (summed over ranks), part losses averaged over ranks, and task / degradation fractions
averaged over the log window — in one collective per step."""
from __future__ import annotations

from tqdm import tqdm

from helios_train.data.decoding import SKIP_REASONS

WINDOW_PREFIXES = ("task/", "degrade/")  # logged as fractions over the log window
RANK_MEAN_SUFFIXES = ("loss", "_share")  # per-rank values logged as their mean over ranks


class StepMetrics:
    def __init__(self):
        self._window: dict[str, list[float]] = {}

    def log(self, trainer, logs: dict, batches: list[dict], dt: float) -> dict:
        b, tc = trainer.backend, trainer.cfg.trainer
        local_samples = sum(len(x["keys"]) for x in batches)
        logs.update({"step_time_s": dt, "samples_per_s": local_samples * b.data_world / max(dt, 1e-9)})
        for callback in trainer.callbacks:
            logs.update(callback.metrics(trainer, dt, batches))
        skips = trainer.position.skip_counts()
        # One collective for every rank-summed count and rank-averaged value (every rank has the same keys).
        means = [k for k in logs if k.endswith(RANK_MEAN_SUFFIXES)]
        counts = [f"data/skipped_{k}" for k in SKIP_REASONS] + ["data/samples_read"]
        # (a sequence group's ranks read the same samples: its first rank counts them)
        counted = int(b.sequence.sequence_rank == 0)
        totals = b.all_sum([counted * skips.get(k, 0) for k in SKIP_REASONS]
                           + [counted * trainer.position.samples_read()] + [float(logs[k]) for k in means])
        logs.update({k: int(v) for k, v in zip(counts, totals)})
        logs.update({k: v / b.world_size for k, v in zip(means, totals[len(counts):])})
        logs["nonfinite_skipped_total"] = trainer.nonfinite_total
        logs.update(trainer.resume_record)
        trainer.resume_record = {}
        for k, v in logs.items():
            if k.startswith(WINDOW_PREFIXES):
                self._window.setdefault(k, []).append(float(v))
        if trainer.step % tc.log_every == 0 or trainer.step == tc.max_steps:
            # Degradation / task fractions are averaged over the steps since the last log line, so a
            # log every N steps still shows how often each degradation was applied in that window.
            logs.update({k: sum(v) / len(v) for k, v in self._window.items()})
            self._window.clear()
            trainer.tracker.log(trainer.step, logs)
            if b.is_main and skips:
                tqdm.write(f"[helios-train] step {trainer.step}: skipped samples so far {skips}")
        return logs
