"""The one training loop every stage runs: data, roles, accumulation, clipping, logging, checkpoints.

A stage (helios_train/stages/) declares roles and gives a loss; the backend (helios_train/backends/) owns
process groups, wrapping and optimizer stepping; callbacks (helios_train/training/callbacks/, plus the
stage's own) run around each step — EMA, validation, throughput — so the loop reaches into none of them.
Every random draw of a step comes from a generator keyed by (seed, step, phase, global micro-batch)
(`micro_generator`) and the data position is checkpointed per reader, so a resumed run reproduces an
uninterrupted one exactly (tests/test_train_toy.py, tests/test_faults.py), also on another cluster shape
(helios_train/backends/run_shape.py, tests/test_resume_shape.py).
"""
from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from helios_train.backends import build_backend
from helios_train.backends.run_shape import current_shape
from helios_train.data.readers import choose_layout
from helios_train.data.video_dataset import DataPosition, build_loader
from helios_train.runtime.heartbeat import Heartbeat, SilentRank, is_collective_timeout
from helios_train.runtime.process_guard import PROCESS_START, report_exit
from helios_train.runtime.seeding import micro_batch_key
from helios_train.stages import build_stage
from helios_train.training import checkpointing
from helios_train.training.callbacks import default_callbacks
from helios_train.training.roles import prepare_roles
from helios_train.training.step_metrics import RANK_MEAN_SUFFIXES, StepMetrics
from helios_train.training.tracking import Tracker


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg, run_dir: Path, shards: list[str], resume_from: Path | None, plain_config: dict,
                 optimizer_foreach: bool | None = None):
        self.cfg, self.run_dir, self.shards = cfg, run_dir, shards
        tc = cfg.trainer
        self.backend = b = build_backend(cfg.launcher, tc, cfg.data)
        seed = tc.seed + (b.data_rank if tc.seed_per_rank else 0)  # a sequence group's ranks: one seed
        torch.manual_seed(seed)  # module init etc.; the training draws use `micro_generator`
        random.seed(seed)
        self.stage = build_stage(cfg, b.device, b)
        stage_roles = prepare_roles(self.stage.role_specs(), b, tc.max_steps, optimizer_foreach)
        self.stage.bind(stage_roles)
        self.roles = {n: r for n, r in stage_roles.items() if r.trainable}  # what the trainer steps and saves
        self.tracker = Tracker(cfg.tracker, run_dir, cfg.run_name, plain_config, enabled=b.is_main)
        self.callbacks = default_callbacks(cfg, self.stage, b, run_dir)
        for callback in self.callbacks:
            callback.setup(self)
        self.step = 0
        # Per role: a finite critic phase must not hide a generator that keeps diverging (DMD), so each
        # role's run of non-finite updates is counted on its own.
        self.consecutive_nonfinite = dict.fromkeys(self.roles, 0)
        self.nonfinite_total = 0
        # steps since the last checkpoint, and how many of them updated every role finitely: a checkpoint is
        # never written from a state that has produced no finite step since the previous one
        self.steps_since_save, self.finite_steps_since_save = 0, 0
        self.step_finite = True
        # for the exit report (launch/warning_lead.py sizes the next segment's time-limit warning from them)
        self.timings: dict[str, float] = {}
        self.shape = current_shape(cfg, b.world_size)
        # (no shards: the dry run, which feeds synthetic batches to run_step and never builds a loader)
        self.position = DataPosition(choose_layout(len(shards), b.data_world, tc.grad_accum_steps,
                                                   cfg.data.num_workers, cfg.data.num_readers)[0] if shards else None)
        self.resume_record: dict = {}  # logged with the first step after a resume on another shape
        self.heartbeat = Heartbeat(b.rank, b.world_size, interval_s=tc.collective_timeout_s / 10)
        self.metrics = StepMetrics()
        if resume_from is not None:
            checkpointing.load(self, resume_from)
        self.tracker.start(self.step if resume_from is not None else None)
        self.stop_signal: str | None = None
        self.step_began = time.perf_counter()  # when the current step started (the silent-rank report's wait)
        self.tracker.hold_remote = lambda: self.stop_signal is not None  # checkpoint first, then W&B
        self.run_lock = None  # the run directory lock (rank 0), released by whoever built the trainer
        self.fresh_start = resume_from is None
        self.on_phase = lambda name: None  # observer: called with each phase's role name (dry-run memory labels)

    def callback(self, kind):
        """The registered callback of class `kind`, or None."""
        return next((c for c in self.callbacks if isinstance(c, kind)), None)

    def save(self) -> None:
        if self.steps_since_save and not self.finite_steps_since_save:
            raise NonFiniteLossError(
                f"steps {self.step - self.steps_since_save + 1}-{self.step}: every one non-finite, no finite step "
                f"since the last checkpoint; not writing checkpoint-{self.step} from this state (resume from the "
                "last checkpoint, perhaps with a lower learning rate)")
        began = time.perf_counter()
        checkpointing.save(self)
        self.timings["checkpoint_s"] = round(time.perf_counter() - began, 2)
        self.steps_since_save, self.finite_steps_since_save = 0, 0

    # -- one step ----------------------------------------------------------------------------------
    def _next_batches(self, it) -> list[dict]:
        out = []
        for _ in range(self.cfg.trainer.grad_accum_steps):
            batch = next(it)
            self.position.update(batch)
            out.append(batch)
        return out

    def micro_generator(self, phase: int, micro: int) -> torch.Generator:
        """The generator for one micro-batch of one phase: every random draw of a step (timesteps,
        noise, degradations) is a function of (seed, step, phase, global micro-batch index) only.

        Why: a resumed run needs no RNG stream state to continue exactly, and the same global batch
        gets the same draws whether it is spread over ranks or over accumulation steps (the DDP
        equivalence test relies on this). `trainer.seed_per_rank=false` reproduces the official
        behaviour of every rank drawing the same numbers.
        """
        tc, b = self.cfg.trainer, self.backend
        index = (b.data_rank if tc.seed_per_rank else 0) * tc.grad_accum_steps + micro
        return torch.Generator(device="cpu").manual_seed(micro_batch_key(tc.seed, self.step, phase, index))

    def _accumulate(self, name: str, batches: list[dict], phase: int) -> tuple[float, dict]:
        """Losses and backward passes of role `name` over the micro-batches; (mean loss, values to log)."""
        role, b, debug = self.roles[name], self.backend, self.cfg.trainer.debug
        accum = len(batches)
        total, logs, sums = 0.0, {}, {}
        for i, batch in enumerate(batches):
            with b.accumulation_context(role, is_last_micro=(i == accum - 1)):
                loss, logs = self.stage.loss(name, batch, self.step, self.micro_generator(phase, i))
                # Part losses are the mean over micro-batches, as over ranks (step_metrics.py), so a logged value
                # does not depend on how the global batch is split; other values are the last micro-batch's.
                for k, v in logs.items():
                    if k.endswith(RANK_MEAN_SUFFIXES):
                        sums[k] = sums.get(k, 0.0) + float(v) / accum
                if self.step in debug.nonfinite_loss_steps and (not debug.nonfinite_roles or name in debug.nonfinite_roles):
                    loss = loss * float("nan")  # fault drill (trainer.debug), exercises the guard below
                b.backward(role, loss / accum)
            total += float(loss.detach()) / accum
        return total, {**logs, **sums}

    def _update_role(self, name: str, batches: list[dict], phase: int = 0) -> dict:
        role, b = self.roles[name], self.backend
        total, logs = self._accumulate(name, batches, phase)
        self.stage.before_optimizer_step(name, self.step)
        norm, stepped = b.grad_norm_and_step(role)
        prefix = "" if len(self.roles) == 1 else f"{name}/"
        out = {f"{prefix}{k}": v for k, v in logs.items()}
        out.update({f"{prefix}loss": total, f"{prefix}grad_norm": norm, f"{prefix}lr": b.current_lr(role)})
        if stepped and math.isfinite(total):
            self.consecutive_nonfinite[name] = 0
        else:
            self.step_finite = False
            self._count_nonfinite(name, total, norm, [k for batch in batches for k in batch.get("keys", [])])
        return out

    def _count_nonfinite(self, role: str, loss: float, norm: float, keys: list[str]) -> None:
        self.nonfinite_total += 1
        self.consecutive_nonfinite[role] += 1
        tqdm.write(f"[helios-train] step {self.step}: non-finite {role} loss={loss} grad_norm={norm}; "
                   f"update skipped (samples: {keys})")
        limit = self.cfg.trainer.max_consecutive_nonfinite
        if self.consecutive_nonfinite[role] >= limit:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite[role]} consecutive non-finite steps of role {role!r} "
                f"(trainer.max_consecutive_nonfinite={limit}); last samples: {keys}"
            )

    def run_phases(self, batches: list[dict]) -> tuple[dict, list[str]]:
        """Every phase of the stage at `self.step` (a role's losses, backward, clipping and optimizer step
        each), inside the callbacks' step contexts; returns the logs and the updated roles."""
        logs: dict = {}
        self.step_finite = True  # until a role's update is skipped as non-finite
        phases = self.stage.phases(self.step)
        with contextlib.ExitStack() as stack:
            for callback in self.callbacks:
                stack.enter_context(callback.step_context(self, self.step))
            for phase, name in enumerate(phases):
                self.on_phase(name)
                logs.update(self._update_role(name, batches, phase))
        return logs, phases

    def finish_step(self, updated: list[str]) -> dict:
        """The callbacks' after-step work (EMA, low-VRAM residency, FLOP counts); returns their values to log."""
        self.on_phase("after_step")
        logs: dict = {}
        for callback in self.callbacks:
            logs.update(callback.on_step_end(self, self.step, updated))
        return logs

    def run_step(self, raw_batches: list[dict]) -> tuple[dict, list[dict]]:
        """One training step at `self.step` on one batch per micro-batch."""
        batches = [self.stage.prepare_batch(x) for x in raw_batches]
        logs, updated = self.run_phases(batches)
        logs.update(self.finish_step(updated))
        return logs, batches

    # -- preemption -------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        """SIGTERM / SIGUSR1 (SLURM preemption) → finish the step, checkpoint, exit cleanly."""

        def request_stop(signum, _frame):
            self.stop_signal = signal.Signals(signum).name

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                previous[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread (e.g. embedded use): no preemption handling
                pass
        return previous

    def _stop_requested(self) -> bool:
        # Any rank's signal stops every rank at the same step, so all take part in the checkpoint.
        return self.backend.all_sum_int(int(self.stop_signal is not None)) > 0

    def _stop(self) -> None:
        if self.backend.is_main:
            tqdm.write(f"[helios-train] received {self.stop_signal or 'a stop signal on another rank'}: "
                       f"checkpoint-{self.step} written, exiting; rerun the same command to resume")
        report_exit(self.stop_signal or "peer", safe=True, detail=f"checkpoint-{self.step} written", step=self.step,
                    timings=self.timings)

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, b, tc = self.cfg, self.backend, self.cfg.trainer
        if self.step >= tc.max_steps:
            if b.is_main:
                tqdm.write(f"[helios-train] already at step {self.step} >= trainer.max_steps={tc.max_steps}; nothing to do")
            self.close()
            report_exit("none", safe=True, detail=f"already at step {self.step}", step=self.step, finished=True)
            return {"step": self.step}
        previous_handlers = self._install_signal_handlers()
        self.heartbeat.beat(self.step)
        it = iter(build_loader(self.shards, cfg.data, cfg.stage.history, b.data_rank, self.position,
                               first_batch=self.step * tc.grad_accum_steps))
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not b.is_main, desc=cfg.stage.name, dynamic_ncols=True)
        last: dict = {}
        try:
            for callback in self.callbacks:
                callback.on_train_start(self)
            while self.step < tc.max_steps:
                last = self._train_one_step(it, bar)
                stop = self._stop_requested()
                if self.step % tc.checkpoint_every == 0 or self.step == tc.max_steps or stop:
                    self.save()
                if stop:
                    self._stop()
                    break
        except BaseException as exn:
            self._fail(exn)
            raise
        finally:
            bar.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        self.close()
        if self.step >= tc.max_steps and self.stop_signal is None:
            report_exit("none", safe=True, detail=f"finished at step {self.step}", step=self.step, finished=True,
                        timings=self.timings)
        return {"step": self.step, "stopped_by": self.stop_signal, **last}

    def _train_one_step(self, it, bar) -> dict:
        t0 = self.step_began = time.perf_counter()
        self.timings.setdefault("startup_s", round(time.time() - PROCESS_START, 2))
        debug = self.cfg.trainer.debug
        if debug.crash_at_step == self.step + 1 and self.backend.rank == debug.crash_rank:
            raise RuntimeError(f"fault drill: rank {self.backend.rank} crashes at step {self.step + 1} "
                               "(trainer.debug.crash_at_step)")
        logs, batches = self.run_step(self._next_batches(it))
        if self.cfg.trainer.debug.step_sleep_s:
            time.sleep(self.cfg.trainer.debug.step_sleep_s)
        self.step += 1
        self.steps_since_save += 1
        self.finite_steps_since_save += int(self.step_finite)
        self.heartbeat.beat(self.step)
        last = self.metrics.log(self, logs, batches, time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{next((v for k, v in last.items() if k.endswith('loss')), 0.0):.4f}")
        for callback in self.callbacks:
            callback.on_logged(self, self.step)
        # the slowest step so far, validation included: what a stop signal may have to wait for before the save
        self.timings["step_s"] = round(max(self.timings.get("step_s", 0.0), time.perf_counter() - t0), 2)
        return last

    def _fail(self, exn: BaseException) -> None:
        """A step raised: close the W&B run as failed (a run left open in this process would swallow the next
        one's logs) and, for a collective that timed out, name the silent rank. The backend is not shut down
        here: its barrier could wait on ranks that did not fail."""
        self.heartbeat.mark_exited(exn)  # first: peers whose collectives now fail report this rank as exited
        self.tracker.finish(exit_code=1)
        if is_collective_timeout(exn):
            beats = self.heartbeat.read()
            message = self.heartbeat.describe_silence(self.step, time.perf_counter() - self.step_began, beats, str(exn))
            killed = self.heartbeat.stop_silent_local_ranks(self.step, beats)
            if killed:
                message += f"; ended the silent rank(s) {killed} on this host"
            print(f"[helios-train] {message}", file=sys.stderr, flush=True)
            raise SilentRank(message) from exn

    def close(self) -> None:
        self.heartbeat.stop()
        self.tracker.finish()
        self.backend.shutdown()
