"""`python -m helios_train <overrides> dry_run=true` — one real training step of the stage at full size on
fake tensors: the measured memory of the production configuration, on a machine without its GPUs.
(`python -m helios_train dry-run-table`: the same for every official recipe, as a table against the planner.)

What runs is the trainer's own step (`Trainer.run_step`): the stage's roles built by the stage
(transformers from model.path's config.json, or the class defaults = the 14B geometry, with the
recipe's LoRA / GAN heads / EMA), its conditioning and losses for every phase of a step, backward,
clipping and the AdamW step — only the weights are fake (helios_train/model/fake_weights.py), so no
memory is allocated and nothing is read but config files. The batch has the configured geometry
(384×640 → 48×80 latents, history 16/2/1 + the x0 anchor, 9 noisy frames, 512 text tokens), built
through the loader's own sample code; the shards are not read.

Measured (helios_train/planning/step_memory.py, torch's MemTracker): the peak bytes of live tensors during each
phase and their breakdown. Notes on what a fake step cannot know:
- values: a read of a fake tensor's value (`float(loss)`, the grad norm) returns 0, so every
  data-dependent branch takes its "finite, not first chunk" side; the count is printed;
- the step is measured in steady state: AdamW creates its state on its first step, so a warm-up
  optimizer step on zero gradients creates it first; the DMD step measured is the first one in which
  every phase of the recipe runs (a generator update, the GAN from its start step);
- kernels: the step runs CPU kernels under CPU autocast (same bf16 casts for matmul / conv /
  attention as CUDA autocast); SDPA's memory is its flash-style kernel's (no L×L matrix); the CUDA
  caching allocator's rounding and fragmentation are not modelled (see the per-GPU allowance in the
  README).

Per GPU under `launcher=...` for `plan_gpus` GPUs (one process measures; the backend's sharding is
applied to the measured bytes, rows as in helios_train/planning/plan.py):
  single      the measured peak;
  ddp         + DDP's gradient buckets (a copy of the trainable gradients of every DDP-wrapped role);
  zero2       trainable gradients, AdamW state and DeepSpeed's fp32 master copy of the trainables /G,
              + one reduce bucket per engine (5e8 elements × 4 B);
  zero3       the frozen and trainable parameters /G as well, + two gathered blocks of the largest role;
  activations (everything a phase allocates beyond parameters, gradients, optimizer state and EMA,
  at its peak) are the measured ones, whatever the backend.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from helios_train.runtime.roles import Calls
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

GB = 1e9


class HostReadPlaceholders(TorchDispatchMode):
    """Answers reads of a fake tensor's value (`.item()`, `float()`, `bool()`) with 0 and counts them."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            self.count += 1
            t = args[0]
            return False if t.dtype == torch.bool else (0.0 if t.is_floating_point() else 0)
        return func(*args, **(kwargs or {}))


def dry_run_config(cfg):
    """The configuration as trained, made runnable in one process on fake CPU tensors."""
    d = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.set_struct(d, True)
    d.launcher.name = "single"  # one process measures; the backend's sharding is applied after
    d.trainer.device = "cpu"  # fake CPU tensors stand in for the GPU's
    d.trainer.grad_accum_steps = 1  # every micro-batch has the same peak
    d.trainer.perf.count_flops = False
    d.tracker.mode = "disabled"
    d.validation.every = 0
    d.data.num_workers = 0
    d.launcher.ulysses_degree = d.launcher.ring_degree = 1  # the split is applied by `measure` (one rank's share)
    if d.stage.name == "distilled" and d.stage.objective == "dmd" and not d.stage.dmd.real_score_path:
        d.stage.dmd.real_score_path = d.model.path  # the teacher has the generator's architecture
    if cfg.launcher.name == "deepspeed" and int(cfg.launcher.zero_stage) == 3:
        d.stage.dmd.low_vram = False  # as in the real run: ZeRO-3 already partitions the bases
    return d


def measured_step(cfg) -> int:
    """The first step in which every phase of the recipe runs (DMD: a generator update, GAN active)."""
    if cfg.stage.name != "distilled" or cfg.stage.objective != "dmd":
        return 0
    start = int(cfg.stage.gan.start_step) if cfg.stage.gan.enabled else 0
    ratio = int(cfg.stage.dmd.update_ratio)
    return -(-start // ratio) * ratio


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def synthetic_batch(cfg, in_channels: int, text_dim: int) -> dict:
    """One micro-batch of the configured geometry through the loader's own sample code (its shape checks
    apply): random latents, zero prompt embeddings; a non-first chunk (full-length history tensors)."""
    from helios_train.data.samples import collate, latent_sample, ode_sample, sample_rng

    d, hist = cfg.data, cfg.stage.history
    h, w = d.latent_height or 48, d.latent_width or 80
    channels, window = d.latent_channels or in_channels, int(hist.latent_window_size)
    chunks = max(int(d.min_chunks), 4)
    rng = np.random.default_rng(0)
    embed = _npy(np.zeros((int(cfg.model.text_max_length), text_dim), np.float32))
    samples, i = [], 0
    while len(samples) < int(d.batch_size):
        key = f"dry-run-{i:04d}"
        i += 1
        if d.mode != "ode_pairs" and sample_rng(d.seed, 0, key).integers(chunks) == 0:
            continue  # a first chunk would take DMD's amplified sampler: measure the common case
        raw = {"__key__": key, "prompt_embed.npy": embed, "json": json.dumps({"caption": "dry run"}).encode()}
        if d.mode == "ode_pairs":
            samples.append(ode_sample({**raw, **_ode_members(cfg, chunks, channels, window, h, w, rng)}, d, hist, 0))
        else:
            raw["latents.npy"] = _npy(rng.standard_normal((chunks, channels, window, h, w), dtype=np.float32))
            samples.append(latent_sample(raw, d, hist, 0))
    return collate(samples)


def _ode_members(cfg, chunks, channels, window, h, w, rng) -> dict:
    from diffusers import HeliosDMDScheduler

    from helios_train.algorithms.sigma_table import PYRAMID

    levels, states = int(cfg.stage.ode.levels), 2
    table = HeliosDMDScheduler(**PYRAMID).timesteps_per_stage
    members = {"json": json.dumps({"caption": "dry run", "num_chunks": chunks, "levels": levels}).encode()}
    for c in range(chunks):
        for k in range(levels):
            s = 2 ** (levels - 1 - k)
            lat = rng.standard_normal((states + 1, channels, window, h // s, w // s), dtype=np.float32)
            t = torch.linspace(float(table[k].max()), float(table[k].min()), states).numpy().astype(np.float32)
            members[f"c{c}_s{k}.latents.npy"], members[f"c{c}_s{k}.timesteps.npy"] = _npy(lat), _npy(t)
    return members


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _warm_up_optimizers(trainer) -> None:
    """Create AdamW's state (it does so lazily on its first step) with one step on zero gradients."""
    for role in trainer.roles.values():
        for p in role.params:
            p.grad = torch.zeros_like(p)
        role.optimizer.step()
        role.optimizer.zero_grad(set_to_none=True)


def _role_sizes(trainer, residency) -> dict[str, dict]:
    """Per trainable role: frozen and trainable parameters (count, bytes), AdamW state bytes, one block's bytes,
    and whether DDP wraps it."""
    roles, specs = {}, trainer.stage.role_specs()
    for name, role in trainer.roles.items():
        # An offloaded base's parameters hold empty tensors: count its host copies (stage.dmd.low_vram)
        frozen = residency.hosts[name] if residency is not None else \
            [p for p in role.module.parameters() if not p.requires_grad]
        roles[name] = {
            "frozen_params": sum(p.numel() for p in frozen),
            "trainable_params": sum(p.numel() for p in role.params),
            "frozen_bytes": _bytes(frozen),
            "trainable_bytes": _bytes(role.params),
            "adamw_bytes": _bytes(t for st in role.optimizer.state.values() for t in st.values()
                                  if isinstance(t, torch.Tensor) and t.dim() > 0),
            "ddp_wrapped": specs[name].calls == Calls.ONCE,  # False: the DDP backend reduces it itself
            "block_bytes": _bytes(role.module.blocks[0].parameters()) if hasattr(role.module, "blocks") else 0,
        }
    return roles


def measure(cfg) -> dict:
    """Build the stage on fake weights, run one step, return the measured components (bytes)."""
    from helios_train.backends.sequence_groups import SimulatedSequenceGroup
    from helios_train.model.fake_weights import FakeWeights, transformer_config
    from helios_train.model.sequence_parallel import enable_sequence_parallel
    from helios_train.model.loading import use_weights_source
    from helios_train.planning.step_memory import StepMemory
    from helios_train.training.callbacks.ema import EMACallback
    from helios_train.training.trainer import Trainer

    dcfg = dry_run_config(cfg)
    tcfg = transformer_config(dcfg.model)
    if "deepspeed" in sys.modules:  # an earlier ZeRO-3 run in this process may have swapped F.linear for its own
        from helios_train.backends.deepspeed import restore_torch_linear

        restore_torch_linear()
    weights = FakeWeights()
    with use_weights_source(weights), tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        trainer = Trainer(dcfg, Path(tmp), [], None, {}, optimizer_foreach=True)
        modules = list({id(r.module): r.module for r in trainer.roles.values()}.values())
        # launcher.ulysses_degree: rank 0 of a sequence group (each rank holds the whole sample, splits inside)
        split = stack.enter_context(SimulatedSequenceGroup(cfg.launcher))
        for module in modules if split.mesh is not None else ():
            enable_sequence_parallel(module, split.mesh, torch.device("cpu"), cfg.launcher.sequence_plan)
        batch = synthetic_batch(dcfg, int(tcfg.get("in_channels", 16)), int(tcfg.get("text_dim", 4096)))
        trainer.step = measured_step(dcfg)
        _warm_up_optimizers(trainer)
        ema = trainer.callback(EMACallback)
        ema_tensors = list(ema.ema.shadow.values()) if ema is not None else []
        mem = StepMemory()
        mem.track_external(*modules, *[r.optimizer for r in trainer.roles.values()], *ema_tensors)
        trainer.on_phase = lambda name: setattr(mem, "label", name)
        residency = getattr(trainer.stage, "residency", None)
        if residency is not None:  # an onloaded base is parameters again, not activations
            residency.on_onload = lambda name: mem.track_external(residency.modules[name])
            onloaded_before = residency.total_onloaded_bytes
        reads = HostReadPlaceholders()
        with reads, mem:
            logs, _ = trainer.run_step([batch])
        trainer.close()
    roles = _role_sizes(trainer, residency)
    low_vram = None
    if residency is not None:
        trainable = sum(r["trainable_bytes"] for r in roles.values())
        # frozen bytes on the device at each phase's peak (the resident base, plus any offloaded weight a
        # live graph still holds): the phase's measured parameter bytes minus the (always resident) trainables
        low_vram = {"frozen_peak_bytes": max(snap["Parameter"] - trainable for snap in mem.phase_peaks.values()),
                    "onloaded_bytes": residency.total_onloaded_bytes - onloaded_before,
                    "host_bytes": sum(residency.bytes.values())}
    return {"roles": roles, "phases": mem.phase_peaks, "ema_bytes": _bytes(ema_tensors), "low_vram": low_vram,
            "host_reads": reads.count, "step": trainer.step, "transformer_config": tcfg,
            "logs": sorted(logs)}


# -- per GPU ------------------------------------------------------------------------------------------
def phase_transients(measured: dict, grads_transient: bool) -> dict[str, float]:
    """Each phase's peak transient bytes: activations + temporaries (+ the .grad tensors alive, single/ddp)."""
    out = {}
    for name, snap in measured["phases"].items():
        if name == "after_step":
            continue
        out[name] = snap["Activation"] + snap["Temp"] + (snap["Gradient"] if grads_transient else 0)
    return out


def measured_rows(measured: dict, backend: str, gpus: int, launcher_cfg=None,
                  ema_sharded: bool = False) -> tuple[dict[str, float], float]:
    """The backend's sharding applied to the measured bytes (module docstring); returns (rows, CPU bytes)."""
    from helios_train.planning.plan import REDUCE_BUCKET, ROWS, apply_offload

    roles = list(measured["roles"].values())
    zero, z3 = backend.startswith("deepspeed"), backend == "deepspeed_zero3"
    trainable = sum(r["trainable_bytes"] for r in roles)
    rows = dict.fromkeys(ROWS, 0.0)
    rows["frozen weights"] = sum(r["frozen_bytes"] for r in roles) / (gpus if z3 else 1)
    if measured.get("low_vram") and not z3:  # stage.dmd.low_vram: what was on the device, measured
        rows["frozen weights"] = measured["low_vram"]["frozen_peak_bytes"]
    rows["trainable params"] = trainable / (gpus if z3 else 1)
    rows["AdamW state"] = sum(r["adamw_bytes"] for r in roles) / (gpus if zero else 1)
    if zero:
        rows["fp32 master"] = rows["gradients"] = trainable / gpus
        rows["reduce buckets"] = REDUCE_BUCKET * 4 * len(roles)
    elif backend == "ddp":
        rows["gradients"] = sum(r["trainable_bytes"] for r in roles if r["ddp_wrapped"])
    if z3:
        rows["zero3 gathered"] = 2 * max(r["block_bytes"] for r in roles)
    rows["EMA"] = measured["ema_bytes"] / (gpus if (z3 or ema_sharded) else 1)  # stage.ema.sharded: 1/N per rank
    rows["activations"] = max(phase_transients(measured, grads_transient=not zero).values())
    return apply_offload(rows, launcher_cfg, backend)


def _gb(x: float) -> str:
    return f"{x / GB:8.2f}"


def report(cfg, measured: dict, planned: dict, rows: dict, cpu: float) -> str:
    from helios_train.model.fake_weights import config_file

    path = config_file(cfg.model)
    source = path if os.path.isfile(path) else "class defaults (the 14B geometry)"
    if cfg.model.get("transformer_overrides"):
        source += f" with {dict(cfg.model.transformer_overrides)}"
    hw = (cfg.data.latent_height or 48, cfg.data.latent_width or 80)
    lines = [f"dry run: stage={cfg.stage.name}" + (f" ({cfg.stage.objective})" if cfg.stage.name == "distilled" else "")
             + f", step {measured['step']}, micro-batch {cfg.data.batch_size} × {hw[0]}×{hw[1]} latents, "
             f"{cfg.model.weight_dtype} weights, autocast {cfg.trainer.mixed_precision}, gradient checkpointing "
             f"{'on' if cfg.model.gradient_checkpointing else 'off'}; transformer config: {source}; "
             f"{measured['seconds']:.0f} s",
             f"  {'role':<10} {'frozen params':>14} {'trainable':>12} {'phase peak GB':>14} "
             f"{'transient GB':>13} {'planned':>8} {'ratio':>6}"]
    grads_transient = not planned["backend"].startswith("deepspeed")
    measured_t = phase_transients(measured, grads_transient)
    for name, role in measured["roles"].items():
        plan_t = planned["phases"][name]
        p = plan_t["activations"] + plan_t["gradients"]
        lines.append(f"  {name:<10} {role['frozen_params'] / 1e9:12.3f} B {role['trainable_params'] / 1e9:10.3f} B "
                     f"{measured['phases'][name]['Total'] / GB:14.2f} {measured_t[name] / GB:13.2f} {p / GB:8.2f} "
                     f"{measured_t[name] / max(p, 1):6.2f}")
    lines.append(f"  GB per GPU, launcher={planned['backend']} on plan_gpus={cfg.plan_gpus}: "
                 f"{'planned':>8} {'measured':>9} {'ratio':>6}")
    for k in rows:
        lines.append(f"    {k:<20} {_gb(planned['rows'][k])} {_gb(rows[k])} "
                     + (f"{rows[k] / planned['rows'][k]:6.2f}" if planned['rows'][k] else "     -"))
    total, ptotal = sum(rows.values()), planned["total"]
    verdict = "fits" if total / GB <= cfg.plan_gpu_memory_gb else "does NOT fit"
    lines.append(f"    {'total':<20} {_gb(ptotal)} {_gb(total)} {total / ptotal:6.2f}   -> {verdict} in "
                 f"{cfg.plan_gpu_memory_gb:.0f} GB (no allowance for the CUDA context / fragmentation)")
    if cpu:
        lines.append(f"    {'(offloaded to CPU)':<20} {_gb(cpu)} per GPU process, in host memory")
    lv = measured.get("low_vram")
    if lv and planned["backend"] != "deepspeed_zero3":
        lines.append(f"  stage.dmd.low_vram: one frozen base on the device at a time (measured peak {_gb(lv['frozen_peak_bytes'])} "
                     f"GB); this step moved {lv['onloaded_bytes'] / GB:.1f} GB host→device; pinned host copies "
                     f"{lv['host_bytes'] / GB:.1f} GB per GPU process")
    lines.append(checkpoint_line(measured, planned["backend"]))
    if planned["sequence_degree"] > 1:
        from helios_train.planning.plan import traffic_line

        lines.append(traffic_line(planned) + " (planned; one rank measured, its peers simulated)")
    lines.append(f"  {measured['host_reads']} reads of a fake value answered 0 (no numbers are computed: shapes only)")
    return "\n".join(lines)


def checkpoint_bytes(measured: dict) -> tuple[float, float, float]:
    """(fp32 trainables, whole AdamW state, EMA) bytes of one checkpoint, over every role."""
    roles = measured["roles"].values()
    return (sum(r["trainable_bytes"] for r in roles), sum(r["adamw_bytes"] for r in roles), measured["ema_bytes"])


def checkpoint_line(measured: dict, backend: str) -> str:
    weights, adamw, ema = checkpoint_bytes(measured)
    line = (f"  checkpoint: {weights / GB:.2f} GB fp32 trainables + {adamw / GB:.2f} GB whole AdamW state"
            + (f" + {ema / GB:.2f} GB EMA" if ema else "") + ", written by rank 0")
    if backend.startswith("deepspeed"):
        line += (f"; ZeRO shards another {(weights + adamw) / GB:.2f} GB over all ranks; trainer.portable_checkpoints "
                 f"gathers the {adamw / GB:.2f} GB of AdamW state per save (one all-reduce per tensor and moment) "
                 "so it resumes on any shape")
    return line


def run_dry(cfg) -> dict:
    """`dry_run=true`: measure one step, print it against the planner; returns the per-GPU totals (GB)."""
    import time

    from helios_train.planning.plan import plan

    t0 = time.perf_counter()
    measured = measure(cfg)
    measured["seconds"] = time.perf_counter() - t0
    planned = plan(cfg)
    rows, cpu = measured_rows(measured, planned["backend"], cfg.plan_gpus, cfg.launcher, OmegaConf.select(cfg, "stage.ema.sharded", default=False))
    print(report(cfg, measured, planned, rows, cpu))
    total = sum(rows.values())
    lv = measured.get("low_vram") or {}
    return {"measured_per_gpu_gb": total / GB, "planned_per_gpu_gb": planned["total"] / GB,
            "onloaded_gb": lv.get("onloaded_bytes", 0) / GB,
            "measured_activations_gb": rows["activations"] / GB,
            "planned_activations_gb": planned["rows"]["activations"] / GB,
            "fits": total / GB <= cfg.plan_gpu_memory_gb, "host_reads": measured["host_reads"],
            "seconds": measured["seconds"], "checkpoint_gb": sum(checkpoint_bytes(measured)) / GB,
            **{f"measured/{k}": v / GB for k, v in rows.items()}}


def comparison_table(cfgs: list, labels: list[str], backends=("ddp", "deepspeed_zero2", "deepspeed_zero3")) -> str:
    """Markdown rows for the README: planned and measured GB per GPU of each recipe under each backend."""
    from helios_train.planning.plan import plan

    lines = ["| recipe (14B, 48×80, 8 GPUs) | backend | activations planned | activations measured | "
             "total planned | total measured | measured / planned |", "|---|---|---|---|---|---|---|"]
    for cfg, label in zip(cfgs, labels):
        measured = measure(cfg)
        for backend in backends:
            planned = plan(cfg, backend)
            rows, _ = measured_rows(measured, backend, cfg.plan_gpus, cfg.launcher, OmegaConf.select(cfg, "stage.ema.sharded", default=False))
            total = sum(rows.values())
            lines.append(f"| {label} | {backend} | {planned['rows']['activations'] / GB:.1f} | "
                         f"{rows['activations'] / GB:.1f} | {planned['total'] / GB:.1f} | {total / GB:.1f} | "
                         f"{total / planned['total']:.2f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv=None) -> None:
    """`python -m helios_train dry-run-table [--recipes ...]`: the README's planned-vs-measured table of every official
    recipe at 14B (one dry run per recipe: minutes each)."""
    import argparse

    from helios_train.planning.plan import RECIPES, recipe_config

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    a = ap.parse_args(argv)
    print(comparison_table([recipe_config(r) for r in a.recipes], a.recipes))


if __name__ == "__main__":
    main()
