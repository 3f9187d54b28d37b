"""A trainer's checkpoint: written by every rank into `checkpoint-N.tmp`, marked complete, renamed; read back so a
resumed run continues exactly, also on another cluster shape (helios_train/backends/run_shape.py).

Contents: each trainable role (the backend writes weights, optimizer and scheduler), the callbacks' files (EMA)
and states, each rank's RNG streams, one data position per data-parallel slot, and `trainer_state.json` (step,
non-finite counts, run shape, stage and callback states, numerics settings).
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm import tqdm

from helios_train.backends.run_shape import check_resume_shape, saved_shape
from helios_train.data.video_dataset import resume_position
from helios_train.runtime import checkpoint as ckpt
from helios_train.runtime.numerics import compare_numerics, numerics_settings


def save(trainer) -> None:
    b, step = trainer.backend, trainer.step
    tmp = ckpt.tmp_dir(trainer.run_dir, step)
    if b.is_main:
        tmp.mkdir(parents=True, exist_ok=True)
    b.barrier()
    for role in trainer.roles.values():
        b.save_role(role, tmp)
    for callback in trainer.callbacks:
        callback.save(trainer, tmp, b.is_main)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    ckpt.save_torch(rng, tmp / f"rng-rank{b.rank}.pt")
    if b.sequence.sequence_rank == 0:  # one data position per data-parallel slot
        ckpt.write_json(trainer.position.state_dict(), tmp / f"data-rank{b.data_rank}.json")
    if b.is_main:
        state = {
            "step": step,
            "nonfinite_total": trainer.nonfinite_total,
            "consecutive_nonfinite": trainer.consecutive_nonfinite,
            "world_size": b.world_size,
            "shape": trainer.shape.state_dict(),
            "portable_checkpoints": b.name != "deepspeed" or trainer.cfg.trainer.portable_checkpoints,
            "stage": trainer.stage.state_dict(),
            # e.g. the FLOP counts: a resumed run reuses them instead of counting again (the FlopCounterMode
            # dispatch changes kernel choices at the 1e-9 level, helios_train/training/callbacks/throughput.py)
            **{c.name: c.state_dict() for c in trainer.callbacks if c.name},
            "numerics": numerics_settings(trainer.cfg),
        }
        ckpt.write_json(state, tmp / "trainer_state.json")
    b.barrier()
    if b.is_main:
        path = ckpt.finalize(trainer.run_dir, step, trainer.cfg.trainer.checkpoints_total_limit)
        tqdm.write(f"[helios-train] saved {path}")
    b.barrier()


def load(trainer, path: Path) -> None:
    b = trainer.backend
    state = ckpt.read_json(path / "trainer_state.json")
    saved = saved_shape(state, trainer.shape)
    change = check_resume_shape(path, saved, trainer.shape, trainer.cfg.trainer.allow_batch_change,
                                state.get("portable_checkpoints", False))
    for role in trainer.roles.values():
        b.load_role(role, path)
    for callback in trainer.callbacks:
        callback.load(trainer, path)
        if callback.name and callback.name in state:
            callback.load_state_dict(state[callback.name])
    if saved.world_size == b.world_size:
        rng = ckpt.load_torch(path / f"rng-rank{b.rank}.pt")
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    # (another world size: the seeding of __init__ stays; the training draws never read these streams,
    # they come from micro_generator's keys)
    old_readers, data_note = _load_data_position(trainer, path, saved)
    trainer.step = state["step"]
    trainer.nonfinite_total = state["nonfinite_total"]
    counts = state["consecutive_nonfinite"]  # an int in checkpoints written before the per-role count
    trainer.consecutive_nonfinite = {r: (counts.get(r, 0) if isinstance(counts, dict) else int(counts))
                                     for r in trainer.roles}
    trainer.stage.load_state_dict(state["stage"])
    differences = compare_numerics(state.get("numerics"), numerics_settings(trainer.cfg))
    if differences and b.is_main:
        tqdm.write(f"[helios-train] resuming with other numerics than {path} was written with ({differences}): "
                   "the run continues, but not bit for bit like an uninterrupted one")
    if change is not None or old_readers != trainer.position.layout.readers:
        trainer.resume_record = {"resume/world_size_before": saved.world_size,
                                 "resume/grad_accum_before": saved.grad_accum_steps,
                                 "resume/readers_before": old_readers, "resume/readers": trainer.position.layout.readers}
        if b.is_main:
            tqdm.write(f"[helios-train] resuming {path.name} on another shape: "
                       f"{change or trainer.shape.describe() + ', as before'}; data: {data_note}")
    if b.is_main:
        tqdm.write(f"[helios-train] resumed from {path} at step {trainer.step}")


def _load_data_position(trainer, path: Path, saved) -> tuple[int, str]:
    """Every rank reads every rank's reader positions (video_dataset.resume_position)."""
    b, cfg = trainer.backend, trainer.cfg
    files = sorted(path.glob("data-rank*.json"))
    if len(files) != saved.data_world:
        raise ValueError(f"{path}: {len(files)} data-rank*.json file(s), the checkpoint was written by "
                         f"{saved.data_world} data-parallel rank(s)")
    states = [ckpt.read_json(f) for f in files]
    if any("layout" not in s for s in states):
        raise ValueError(f"{path}: data positions in the per-worker format of earlier helios-train versions; "
                         "resume it with the version that wrote it")
    trainer.position, old_readers, note, warnings = resume_position(
        states, len(trainer.shards), b.data_rank, b.data_world, trainer.shape.grad_accum_steps, cfg.data)
    for line in warnings if b.is_main else ():
        tqdm.write(f"[helios-train] WARNING: {line}")
    return old_readers, note
