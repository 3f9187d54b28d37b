"""In-loop validation as a callback: before the first step of a fresh run (`validation.at_first_step`) and every
`validation.every` steps, rank 0 renders the output role with the stage's sampler (helios_train/sampling/
validation.py), with the EMA weights when `validation.use_ema` and an EMA is kept.

Where ranks wait: under sharded parameters (ZeRO-3) every rank renders alongside rank 0 without writing, since
every forward gathers the weights collectively; otherwise the other ranks wait for rank 0's render in the
rendezvous store, not in a collective — a render longer than `trainer.collective_timeout_s` must not end the job
(official issue #17: multi-node runs hanging at the first validation until the NCCL timeout)."""
from __future__ import annotations

import contextlib
from pathlib import Path

from tqdm import tqdm

from helios_train.runtime.callbacks import Callback
from helios_train.runtime.heartbeat import wait_for_rank0


def validation_due(vcfg, step: int, fresh_start: bool) -> bool:
    """Before the first step of a fresh run (if configured) and every `every` steps."""
    if vcfg.every <= 0:
        return False
    return (step == 0 and fresh_start and vcfg.at_first_step) or (step > 0 and step % vcfg.every == 0)


class ValidationCallback(Callback):
    def __init__(self, cfg, run_dir: Path, role: str, ema=None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.role = role
        self.ema = ema  # an EMACallback whose weights are rendered (validation.use_ema), or None
        self.validator = None

    def setup(self, trainer) -> None:
        # Rank 0 renders; where parameters are sharded every rank runs the sampler's forwards with it, and under
        # sequence parallelism rank 0's sequence group (its forwards are split over the group).
        b = trainer.backend
        if b.data_rank == 0 or b.shards_parameters:
            from helios_train.sampling.validation import Validator

            self.validator = Validator(self.cfg, self.run_dir, trainer.tracker, b.device)

    def on_train_start(self, trainer) -> None:
        self._maybe_validate(trainer)

    def on_logged(self, trainer, step: int) -> None:
        self._maybe_validate(trainer)

    def _maybe_validate(self, trainer) -> None:
        b, step = trainer.backend, trainer.step
        if not validation_due(self.cfg.validation, step, trainer.fresh_start):
            return
        weights = self.ema.weights(trainer, renders=self.validator is not None) if self.ema is not None \
            else contextlib.nullcontext()
        with weights:
            if self.validator is not None:
                result = self.validator.run(step, trainer.roles[self.role].module, write=b.is_main)
                if b.is_main:
                    tqdm.write(f"[helios-train] step {step}: validation videos {result['videos']}")
        if not b.shards_parameters:
            wait_for_rank0(b, f"helios/validation/{self.run_dir}/{step}", self.cfg.validation.wait_timeout_s)
        b.barrier()
