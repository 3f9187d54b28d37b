"""The one training loop every stage runs: data, roles, accumulation, clipping, logging, checkpoints.

A stage (helios_train/stages/) gives roles and a loss; the backend (helios_train/backends/) owns
process groups, wrapping and optimizer stepping. Every random draw of a step comes from a generator
keyed by (seed, step, phase, global micro-batch) (`micro_generator`), the data position is
checkpointed per reader, so a resumed run reproduces an uninterrupted one exactly
(tests/test_train_toy.py, tests/test_faults.py), also on another cluster shape (helios_train/backends/run_shape.py,
tests/test_resume_shape.py).
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import sys
import time
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from tqdm import tqdm

from helios_train.runtime import checkpoint as ckpt
from helios_train.backends import build_backend
from helios_train.data.decoding import SKIP_REASONS
from helios_train.data.readers import choose_layout
from helios_train.data.video_dataset import DataPosition, build_loader, resume_position
from helios_train.runtime.heartbeat import Heartbeat, SilentRank, is_collective_timeout, wait_for_rank0
from helios_train.backends.lockstep import params_sharded
from helios_train.runtime.numerics import compare_numerics, numerics_settings
from helios_train.runtime.process_guard import report_exit
from helios_train.backends.run_shape import check_resume_shape, current_shape, saved_shape
from helios_train.runtime.seeding import micro_batch_key
from helios_train.stages import build_stage
from helios_train.training.throughput import Throughput
from helios_train.training.tracking import Tracker

log = logging.getLogger(__name__)


WINDOW_PREFIXES = ("task/", "degrade/")  # logged as fractions over the log window
RANK_MEAN_SUFFIXES = ("loss", "_share")  # per-rank values logged as their mean over ranks


class NonFiniteLossError(RuntimeError):
    pass


def build_optimizer(params, optim_cfg, max_steps: int, foreach: bool | None = None, update_every: int = 1):
    """AdamW and its LR schedule. The scheduler steps once per optimizer update; a role that updates once
    every `update_every` training steps gets a schedule of ceil(max_steps / update_every) updates with a
    warm-up of ceil(warmup_steps / update_every) updates, i.e. both measured in training steps."""
    # foreach None = torch's default (the multi-tensor kernels on CUDA); the dry run asks for them on
    # its CPU fake tensors so that it measures the optimizer step a GPU runs.
    opt = torch.optim.AdamW(
        params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay, eps=optim_cfg.eps,
        foreach=foreach,
    )
    sched = get_scheduler(
        optim_cfg.lr_scheduler, opt, num_warmup_steps=-(-optim_cfg.warmup_steps // update_every),
        num_training_steps=-(-max_steps // update_every),
    )
    return opt, sched


class Trainer:
    def __init__(self, cfg, run_dir: Path, shards: list[str], resume_from: Path | None, plain_config: dict,
                 optimizer_foreach: bool | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        tc = cfg.trainer
        self.backend = build_backend(cfg.launcher, tc, cfg.data)
        b = self.backend
        seed = tc.seed + (b.data_rank if tc.seed_per_rank else 0)  # a sequence group's ranks: one seed
        torch.manual_seed(seed)  # module init etc.; the training draws use `micro_generator`
        random.seed(seed)
        self.stage = build_stage(cfg, b.device)
        self.roles = {}
        for name, spec in self.stage.role_specs().items():
            params = [p for p in spec.module.parameters() if p.requires_grad]
            opt, sched = build_optimizer(params, spec.optim, tc.max_steps, optimizer_foreach, spec.update_every)
            self.roles[name] = b.prepare(name, spec.module, opt, sched, spec.optim.max_grad_norm,
                                         multi_forward=spec.multi_forward)
        self.stage.bind(self.roles)
        if cfg.data.mode == "raw":
            self._attach_online_encoder()
        self.step = 0
        # Per role: a finite critic phase must not hide a generator that keeps diverging (DMD), so each
        # role's run of non-finite updates is counted on its own.
        self.consecutive_nonfinite = dict.fromkeys(self.roles, 0)
        self.nonfinite_total = 0
        self.shards = shards
        self.shape = current_shape(cfg, b.world_size)
        # (no shards: the dry run, which feeds synthetic batches to run_step and never builds a loader)
        self.position = DataPosition(choose_layout(len(shards), b.data_world, tc.grad_accum_steps,
                                                   cfg.data.num_workers, cfg.data.num_readers)[0] if shards else None)
        self.resume_record: dict = {}  # logged with the first step after a resume on another shape
        self.tracker = Tracker(cfg.tracker, run_dir, cfg.run_name, plain_config, enabled=b.is_main)
        self.heartbeat = Heartbeat(b.rank, b.world_size, interval_s=tc.collective_timeout_s / 10)
        self.throughput = Throughput(tc.perf, b.device, b.data_world)
        if resume_from is not None:
            self._load(resume_from)
        self.tracker.start(self.step if resume_from is not None else None)
        self.stop_signal: str | None = None
        self.run_lock = None  # the run directory lock (rank 0), released by whoever built the trainer
        self.fresh_start = resume_from is None
        self.validator = None
        # Rank 0 renders; under ZeRO-3 every rank must run the sampler's forwards with it (lockstep.py), under
        # sequence parallelism rank 0's sequence group (its forwards are split over the group).
        if cfg.validation.every > 0 and (b.data_rank == 0 or params_sharded(cfg)):
            from helios_train.sampling.validation import Validator

            self.validator = Validator(cfg, run_dir, self.tracker, b.device)
        self._window: dict[str, list[float]] = {}
        self.on_phase = lambda name: None  # observer: called with each phase's role name (dry-run memory labels)

    def _attach_online_encoder(self) -> None:
        from helios_train.data.online_encoding import OnlineEncoder
        from helios_train.model.loading import load_text_stack, load_vae

        tok, enc = load_text_stack(self.cfg.model, self.backend.device)
        vae = load_vae(self.cfg.model, self.backend.device)
        self.stage.online_encoder = OnlineEncoder(
            vae, tok, enc, self.cfg.stage.history, self.cfg.model.text_max_length, self.backend.device,
            seed=self.cfg.trainer.seed,
        )

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self) -> None:
        b, step = self.backend, self.step
        tmp = ckpt.tmp_dir(self.run_dir, step)
        if b.is_main:
            tmp.mkdir(parents=True, exist_ok=True)
        b.barrier()
        for role in self.roles.values():
            b.save_role(role, tmp)
        self.stage.save_extra(tmp, b.is_main)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        ckpt.save_torch(rng, tmp / f"rng-rank{b.rank}.pt")
        if b.sequence.sequence_rank == 0:  # one data position per data-parallel slot
            ckpt.write_json(self.position.state_dict(), tmp / f"data-rank{b.data_rank}.json")
        if b.is_main:
            state = {
                "step": step,
                "nonfinite_total": self.nonfinite_total,
                "consecutive_nonfinite": self.consecutive_nonfinite,
                "world_size": b.world_size,
                "shape": self.shape.state_dict(),
                "portable_checkpoints": b.name != "deepspeed" or self.cfg.trainer.portable_checkpoints,
                "stage": self.stage.state_dict(),
                # A resumed run reuses the counts instead of counting again: the FlopCounterMode dispatch
                # changes kernel choices (1e-9 differences), which would make a resumed step differ from
                # the uninterrupted run's (helios_train/training/throughput.py).
                "flops": self.throughput.state_dict(),
                "numerics": numerics_settings(self.cfg),
            }
            ckpt.write_json(state, tmp / "trainer_state.json")
        b.barrier()
        if b.is_main:
            path = ckpt.finalize(self.run_dir, step, self.cfg.trainer.checkpoints_total_limit)
            tqdm.write(f"[helios-train] saved {path}")
        b.barrier()

    def _load(self, path: Path) -> None:
        b = self.backend
        state = ckpt.read_json(path / "trainer_state.json")
        saved = saved_shape(state, self.shape)
        change = check_resume_shape(path, saved, self.shape, self.cfg.trainer.allow_batch_change,
                                    state.get("portable_checkpoints", False))
        for role in self.roles.values():
            b.load_role(role, path)
        self.stage.load_extra(path)
        if saved.world_size == b.world_size:
            rng = ckpt.load_torch(path / f"rng-rank{b.rank}.pt")
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        # (another world size: the seeding of __init__ stays; the training draws never read these streams,
        # they come from micro_generator's keys)
        data_note = self._load_data_position(path, saved)
        self.step = state["step"]
        self.nonfinite_total = state["nonfinite_total"]
        saved_count = state["consecutive_nonfinite"]  # an int in checkpoints written before the per-role count
        self.consecutive_nonfinite = {r: (saved_count.get(r, 0) if isinstance(saved_count, dict) else int(saved_count))
                                      for r in self.roles}
        self.stage.load_state_dict(state["stage"])
        if (saved.grad_accum_steps, saved.batch_size) == (self.shape.grad_accum_steps, self.shape.batch_size):
            # (a rank's step does other work after a change of accumulation or batch: counted again)
            self.throughput.load_state_dict(state.get("flops"), state.get("flops_per_step"))
        differences = compare_numerics(state.get("numerics"), numerics_settings(self.cfg))
        if differences and b.is_main:
            tqdm.write(f"[helios-train] resuming with other numerics than {path} was written with ({differences}): "
                       "the run continues, but not bit for bit like an uninterrupted one")
        if change is not None or data_note[0] != self.position.layout.readers:
            self.resume_record = {"resume/world_size_before": saved.world_size,
                                  "resume/grad_accum_before": saved.grad_accum_steps,
                                  "resume/readers_before": data_note[0], "resume/readers": self.position.layout.readers}
            if b.is_main:
                tqdm.write(f"[helios-train] resuming {path.name} on another shape: "
                           f"{change or self.shape.describe() + ', as before'}; data: {data_note[1]}")
        if b.is_main:
            tqdm.write(f"[helios-train] resumed from {path} at step {self.step}")

    def _load_data_position(self, path: Path, saved) -> tuple[int, str]:
        """Every rank reads every rank's reader positions (video_dataset.resume_position)."""
        b, cfg = self.backend, self.cfg
        files = sorted(path.glob("data-rank*.json"))
        if len(files) != saved.data_world:
            raise ValueError(f"{path}: {len(files)} data-rank*.json file(s), the checkpoint was written by "
                             f"{saved.data_world} data-parallel rank(s)")
        states = [ckpt.read_json(f) for f in files]
        if any("layout" not in s for s in states):
            raise ValueError(f"{path}: data positions in the per-worker format of earlier helios-train versions; "
                             "resume it with the version that wrote it")
        self.position, old_readers, note, warnings = resume_position(
            states, len(self.shards), b.data_rank, b.data_world, self.shape.grad_accum_steps, cfg.data)
        for line in warnings if b.is_main else ():
            tqdm.write(f"[helios-train] WARNING: {line}")
        return old_readers, note

    # -- loop ------------------------------------------------------------------------------------
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

    def _update_role(self, name: str, batches: list[dict], phase: int = 0) -> dict:
        role, b = self.roles[name], self.backend
        accum = len(batches)
        total, logs, sums = 0.0, {}, {}
        for i, batch in enumerate(batches):
            with b.accumulation_context(role, is_last_micro=(i == accum - 1)):
                loss, logs = self.stage.loss(name, batch, self.step, self.micro_generator(phase, i))
                # Part losses are the mean over micro-batches, as over ranks (_log_step), so a logged value
                # does not depend on how the global batch is split; other values are the last micro-batch's.
                for k, v in logs.items():
                    if k.endswith(RANK_MEAN_SUFFIXES):
                        sums[k] = sums.get(k, 0.0) + float(v) / accum
                debug = self.cfg.trainer.debug
                if self.step in debug.nonfinite_loss_steps and (not debug.nonfinite_roles or name in debug.nonfinite_roles):
                    loss = loss * float("nan")  # fault drill (trainer.debug), exercises the guard below
                b.backward(role, loss / accum)
            total += float(loss.detach()) / accum
        self.stage.before_optimizer_step(name, self.step)
        norm, stepped = b.grad_norm_and_step(role)
        finite = stepped and math.isfinite(total)
        prefix = "" if len(self.roles) == 1 else f"{name}/"
        out = {f"{prefix}{k}": v for k, v in {**logs, **sums}.items()}
        out.update({f"{prefix}loss": total, f"{prefix}grad_norm": norm, f"{prefix}lr": b.current_lr(role)})
        if not finite:
            keys = [k for batch in batches for k in batch.get("keys", [])]
            self._count_nonfinite(name, total, norm, keys)
        else:
            self.consecutive_nonfinite[name] = 0
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

    def train(self) -> dict:
        cfg, b, tc = self.cfg, self.backend, self.cfg.trainer
        if self.step >= tc.max_steps:
            if b.is_main:
                tqdm.write(f"[helios-train] already at step {self.step} >= trainer.max_steps={tc.max_steps}; nothing to do")
            self.close()
            return {"step": self.step}
        previous_handlers = self._install_signal_handlers()
        self.heartbeat.beat(self.step)
        loader = build_loader(self.shards, cfg.data, cfg.stage.history, b.data_rank, self.position,
                              first_batch=self.step * tc.grad_accum_steps)
        it = iter(loader)
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not b.is_main, desc=cfg.stage.name, dynamic_ncols=True)
        last: dict = {}
        try:
            self._maybe_validate()
            while self.step < tc.max_steps:
                t0 = time.perf_counter()
                logs, batches = self.run_step(self._next_batches(it))
                if tc.debug.step_sleep_s:
                    time.sleep(tc.debug.step_sleep_s)
                self.step += 1
                self.heartbeat.beat(self.step)
                last = self._log_step(logs, batches, time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix(loss=f"{next((v for k, v in last.items() if k.endswith('loss')), 0.0):.4f}")
                self._maybe_validate()
                stop = self._stop_requested()
                if self.step % tc.checkpoint_every == 0 or self.step == tc.max_steps or stop:
                    self.save()
                if stop:
                    if b.is_main:
                        tqdm.write(f"[helios-train] received {self.stop_signal or 'a stop signal on another rank'}: "
                                   f"checkpoint-{self.step} written, exiting; rerun the same command to resume")
                    report_exit(self.stop_signal or "peer", safe=True, detail=f"checkpoint-{self.step} written",
                                step=self.step)
                    break
        except BaseException as exn:
            # The W&B run is closed as failed (a run left open in this process would swallow the next one's
            # logs); the backend is not shut down here: its barrier could wait on ranks that did not fail.
            self.tracker.finish(exit_code=1)
            if is_collective_timeout(exn):
                beats = self.heartbeat.read()
                message = self.heartbeat.describe_silence(self.step, tc.collective_timeout_s, beats)
                killed = self.heartbeat.stop_silent_local_ranks(self.step, beats)
                if killed:
                    message += f"; ended the silent rank(s) {killed} on this host"
                print(f"[helios-train] {message}", file=sys.stderr, flush=True)
                raise SilentRank(message) from exn
            raise
        finally:
            bar.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        self.close()
        return {"step": self.step, "stopped_by": self.stop_signal, **last}

    def run_step(self, raw_batches: list[dict]) -> tuple[dict, list[dict]]:
        """One training step at `self.step` on one batch per micro-batch: every phase of the stage (a role's
        losses, backward, clipping and optimizer step each), then the stage's after-step hook (EMA)."""
        batches = [self.stage.prepare_batch(x) for x in raw_batches]
        logs: dict = {}
        phases = self.stage.phases(self.step)
        work = self.stage.work_key(self.step)
        with self.throughput.measuring(work):
            for phase, name in enumerate(phases):
                self.on_phase(name)
                logs.update(self._update_role(name, batches, phase))
        self.throughput.after_step(work, self.stage.work_variant())
        self.on_phase("after_step")
        logs.update(self.stage.after_step(self.step, phases))
        return logs, batches

    def _maybe_validate(self) -> None:
        """Rank 0 renders validation videos; the other ranks wait at the barrier (under ZeRO-3 they render
        alongside it without writing, since every forward gathers the sharded weights collectively)."""
        from helios_train.sampling.validation import validation_due

        if not validation_due(self.cfg.validation, self.step, self.fresh_start):
            return
        role = self.roles.get("generator") or next(iter(self.roles.values()))
        ema = getattr(self.stage, "ema", None)
        # Every rank enters the EMA swap: a sharded EMA is gathered (a collective) for the ranks that render.
        weights = ema.swap_into(role.module, renders=self.validator is not None) \
            if (ema is not None and self.cfg.validation.use_ema) else contextlib.nullcontext()
        with weights:
            if self.validator is not None:
                result = self.validator.run(self.step, role.module, write=self.backend.is_main)
                if self.backend.is_main:
                    tqdm.write(f"[helios-train] step {self.step}: validation videos {result['videos']}")
        # The others wait for rank 0's render in the store, not in a collective: a render longer than
        # trainer.collective_timeout_s must not end the job (official issue #17: multi-node runs hanging at
        # the first validation until the NCCL timeout). Under ZeRO-3 every rank rendered in lockstep.
        if not params_sharded(self.cfg):
            wait_for_rank0(self.backend, f"helios/validation/{self.run_dir}/{self.step}",
                           self.cfg.validation.wait_timeout_s)
        self.backend.barrier()

    def _log_step(self, logs: dict, batches: list[dict], dt: float) -> dict:
        b, tc = self.backend, self.cfg.trainer
        local_samples = sum(len(x["keys"]) for x in batches)
        logs.update({"step_time_s": dt, "samples_per_s": local_samples * b.data_world / max(dt, 1e-9)})
        logs.update(self.throughput.metrics(dt, self.stage.tokens_per_sample(batches[0]), local_samples))
        skips = self.position.skip_counts()
        # One collective for every rank-summed count and rank-averaged value (every rank has the same keys).
        means = [k for k in logs if k.endswith(RANK_MEAN_SUFFIXES)]
        counts = [f"data/skipped_{k}" for k in SKIP_REASONS] + ["data/samples_read"]
        # (a sequence group's ranks read the same samples: its first rank counts them)
        counted = int(b.sequence.sequence_rank == 0)
        totals = b.all_sum([counted * skips.get(k, 0) for k in SKIP_REASONS] + [counted * self.position.samples_read()]
                           + [float(logs[k]) for k in means])
        logs.update({k: int(v) for k, v in zip(counts, totals)})
        logs.update({k: v / b.world_size for k, v in zip(means, totals[len(counts):])})
        logs["nonfinite_skipped_total"] = self.nonfinite_total
        logs.update(self.resume_record)
        self.resume_record = {}
        for k, v in logs.items():
            if k.startswith(WINDOW_PREFIXES):
                self._window.setdefault(k, []).append(float(v))
        if self.step % tc.log_every == 0 or self.step == tc.max_steps:
            # Degradation / task fractions are averaged over the steps since the last log line, so a
            # log every N steps still shows how often each degradation was applied in that window.
            logs.update({k: sum(v) / len(v) for k, v in self._window.items()})
            self._window.clear()
            self.tracker.log(self.step, logs)
            if b.is_main and skips:
                tqdm.write(f"[helios-train] step {self.step}: skipped samples so far {skips}")
        return logs

    def close(self) -> None:
        self.heartbeat.stop()
        self.tracker.finish()
        self.backend.shutdown()
