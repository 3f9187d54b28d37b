"""Peak memory of one Distilled (DMD) training step vs one Base training step on the toy model.

    python bench/peak_memory.py            # also printed by `python bench/compute_per_chunk.py`

Each configuration is measured in its own fresh subprocess (imports, model build, one step, exit),
twice: once bare (process RSS, and CUDA allocator peaks when CUDA is available), once under
torch.profiler(profile_memory=True) for the live-tensor timeline (the profiler's own bookkeeping
would inflate the bare run's RSS, so it gets a run of its own).

- Base: `stage=base`, one step (the generator's flow-matching update).
- DMD: `stage=distilled` (objective=dmd), step 0 — step % update_ratio == 0 runs both phases: the
  generator's DMD update (few-step pyramid rollout with grad, then fake score = critic, real score =
  teacher cond + uncond under CFG) and the critic's flow-matching update. The real-score base is the
  toy checkpoint folder itself (an exported Base folder has the same layout and shapes).
Both: the toy config's batch (2), LoRA r8 (the DMD critic LoRA r8 too, as in tests/test_distilled_stage.py),
fp32 weights, the real Trainer (backend, optimizers, EMA) with the step body of `Trainer.train`.

Workers run with one intra-op thread (OMP_NUM_THREADS=1; PEAK_MEMORY_THREADS=N to change).
Per run: RSS after imports, after build (model(s), optimizers, loader, first batch; gc + malloc_trim
so freed heap is returned), VmHWM over the step alone (reset through /proc/self/clear_refs), and the
whole-process peak (max of VmHWM before the reset and over the step; not ru_maxrss, which a child
inherits from its parent across fork+exec). The step's increment = step VmHWM − RSS after build. On CUDA:
memory_allocated after build and max_memory_allocated over the step (peak stats reset after build).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 2**20
CONFIGS = ("base", "dmd")
HOLDS = {
    "base": "generator (frozen base + LoRA r8 / patch-embed LoRA / memory patches) + its AdamW",
    "dmd": "generator (student base + LoRA) + critic/teacher base (ONE copy, teacher = adapters off) "
           "+ critic LoRA + EMA of the generator's trainables (fp32) + two AdamW optimizers "
           "(generator, critic); activations: rollout with grad, 3 no-grad critic/teacher forwards, "
           "critic rollout (no grad) + critic fwd/bwd",
}


# -- measurement inside a fresh process -------------------------------------------------------------
def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else -1


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux ≥ 4.0: VmHWM := VmRSS
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _compose(config: str, toy_root: Path, out: Path):
    sys.path.insert(0, str(REPO))
    from helios_train.config import compose

    common = [f"toy_root={toy_root}", f"output_root={out}", f"run_name={config}", "tracker.mode=disabled",
              "validation.every=0", "trainer.perf.count_flops=false", "data.num_workers=0",
              "trainer.max_steps=10", "trainer.checkpoint_every=1000", "model.build_toy=false",
              "data.build_toy=false"]
    if config == "dmd":
        model = toy_root / "model"
        common += ["stage=distilled", "stage.objective=dmd", f"stage.dmd.real_score_path={model}",
                   "stage.trainables.lora.rank=8", "stage.dmd.critic_lora_rank=8"]
    return compose(common)


def worker(config: str, toy_root: Path, profile: bool) -> dict:
    import torch

    from helios_train.training import run_setup
    from helios_train.data.video_dataset import build_loader
    from helios_train.training.trainer import Trainer

    out: dict = {"config": config, "profile": profile}
    _trim()
    out["rss_imports_mb"] = _status_kb("VmRSS") / 1024
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _compose(config, toy_root, Path(tmp))
        run_setup.validate(cfg)
        shards = run_setup.resolve_shards(cfg, 1)
        run_dir, _, plain = run_setup.prepare_run_dir(cfg, True)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = Trainer(cfg, run_dir, shards, None, plain)
        stage, b = trainer.stage, trainer.backend
        it = iter(build_loader(shards, cfg.data, cfg.stage.history, b.rank, trainer.position))
        batches = [stage.prepare_batch(x) for x in trainer._next_batches(it)]
        cuda = b.device.type == "cuda"
        params = {id(p): p for r in trainer.roles.values() for p in r.module.parameters()}
        out.update(device=str(b.device), batch=cfg.data.batch_size, phases=stage.phases(0),
                   params_total=sum(p.numel() for p in params.values()),
                   params_trainable=sum(p.numel() for p in params.values() if p.requires_grad),
                   roles={n: sum(p.numel() for p in r.module.parameters() if p.requires_grad)
                          for n, r in trainer.roles.items()})
        _trim()
        out["rss_built_mb"] = _status_kb("VmRSS") / 1024
        if cuda:
            torch.cuda.synchronize()
            out["cuda_built_mb"] = torch.cuda.memory_allocated() / MB
            torch.cuda.reset_peak_memory_stats()
        out["build_hwm_mb"] = _status_kb("VmHWM") / 1024  # peak of imports + build, before the reset
        out["hwm_reset"] = _reset_hwm()
        prof = None
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as tprofile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            prof = tprofile(activities=acts, profile_memory=True, record_shapes=True, with_stack=True)
            prof.__enter__()
        t0 = time.perf_counter()
        logs = {}
        logs, updated = trainer.run_phases(batches)  # the step body of Trainer.run_step
        trainer.finish_step(updated)
        if cuda:
            torch.cuda.synchronize()
        out["step_s"] = time.perf_counter() - t0
        if prof is not None:
            prof.__exit__(None, None, None)
            out.update(_tensor_timeline(prof, str(b.device)))
        out["step_hwm_mb"] = _status_kb("VmHWM") / 1024
        out["rss_after_mb"] = _status_kb("VmRSS") / 1024
        out["process_peak_mb"] = max(out["build_hwm_mb"], out["step_hwm_mb"])
        # ru_maxrss survives fork+exec (it starts at the parent's RSS), so a big parent pollutes it:
        # kept for reference only; the per-mm VmHWM above starts fresh at exec.
        out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        if cuda:
            out["cuda_step_peak_mb"] = torch.cuda.max_memory_allocated() / MB
        out["state_mb"] = _state_bytes(trainer)
        out["losses"] = {k: v for k, v in logs.items() if k.endswith("loss")}
    return out


def _state_bytes(trainer) -> dict:
    """Bytes of the persistent training state after the step, by kind (unique storages)."""
    seen: set = set()

    def size(tensors) -> float:
        total = 0
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total / MB

    params = {id(p): p for r in trainer.roles.values() for p in r.module.parameters()}.values()
    out = {"frozen weights": size(p for p in params if not p.requires_grad),
           "trainables": size(p for p in params if p.requires_grad),
           "AdamW state": size(v for r in trainer.roles.values() for s in r.optimizer.state.values()
                               for v in s.values() if hasattr(v, "untyped_storage"))}
    from helios_train.training.callbacks.ema import EMACallback

    ema = trainer.callback(EMACallback)
    out["EMA"] = size(ema.ema.shadow.values()) if ema is not None else 0.0
    return out


def _tensor_timeline(prof, device: str) -> dict:
    """Peak of live tensor bytes over the step from the profiler's memory timeline, by category
    (torch.profiler._memory_profiler, the data behind export_memory_timeline)."""
    try:
        from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

        times, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(device)
    except Exception as exn:  # private API: report instead of failing the bench
        return {"tensor_error": f"{type(exn).__name__}: {exn}"}
    if not sizes:
        return {"tensor_error": "empty timeline"}
    totals = [sum(s) for s in sizes]
    i = max(range(len(totals)), key=totals.__getitem__)
    names = {idx + 1: (c.name.lower() if c is not None else "unknown") for c, idx in _CATEGORY_TO_INDEX.items()}
    at_peak = {names.get(k, "unknown"): v / MB for k, v in enumerate(sizes[i]) if k > 0 and v >= 1024}
    return {"tensor_start_mb": totals[0] / MB, "tensor_peak_mb": totals[i] / MB, "tensor_at_peak": at_peak}


# -- driver ---------------------------------------------------------------------------------------
def measure(config: str, toy_root: Path, profile: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--toy-root", str(toy_root)]
    if profile:
        cmd.append("--profile")
    # One intra-op thread: on a shared 2-core box two spinning OpenMP threads slow a step 10-100x;
    # the same setting for both configs, so the comparison is unaffected.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": os.environ.get("PEAK_MEMORY_THREADS", "1")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def planner_14b() -> dict[str, tuple[float, float]]:
    """Per-GPU GB of Base r128 (stage_1_init) and DMD r256 (stage_3_post, EMA off so ZeRO-3 is comparable)
    on 8 GPUs from `python -m helios_train plan-table`'s functions."""
    from helios_train.planning.plan import BACKENDS, GB, plan, recipe_config

    base, dmd = recipe_config("stage_1_init"), recipe_config("stage_3_post", ["stage.ema.enabled=false"])
    return {be: (plan(base, be)["total"] / GB, plan(dmd, be)["total"] / GB) for be in BACKENDS}


def report(results: dict[str, dict], profiled: dict[str, dict], planner: dict | None) -> str:
    b, d = results["base"], results["dmd"]
    cuda = "cuda_step_peak_mb" in b
    lines = [f"\nPeak memory of ONE training step, toy model, {b['device']}, batch {b['batch']}, fp32, LoRA r8 "
             f"(DMD critic LoRA r8); each config in its own fresh process",
             f"  Base: one step ({'+'.join(b['phases'])});  DMD: step 0 ({' + '.join(d['phases'])} phases)"]
    head = (f"{'config':<6} {'params total':>12} {'trainable':>10} {'RSS built':>10} {'step peak':>10} "
            f"{'step incr':>10} {'proc peak':>10} {'tensors peak':>13}")
    if cuda:
        head += f" {'CUDA built':>11} {'CUDA peak':>10} {'CUDA incr':>10}"
    lines += [head + "   (MiB)"]

    def row(name, r, p):
        s = (f"{name:<6} {r['params_total']:12,d} {r['params_trainable']:10,d} {r['rss_built_mb']:10.1f} "
             f"{r['step_hwm_mb']:10.1f} {r['step_hwm_mb'] - r['rss_built_mb']:10.1f} {r['process_peak_mb']:10.1f} "
             f"{p.get('tensor_peak_mb', float('nan')):13.3f}")
        if cuda:
            s += (f" {r['cuda_built_mb']:11.3f} {r['cuda_step_peak_mb']:10.3f} "
                  f"{r['cuda_step_peak_mb'] - r['cuda_built_mb']:10.3f}")
        return s

    lines += [row("Base", b, profiled["base"]), row("DMD", d, profiled["dmd"])]

    def ratio(x, y):
        return f"{x / y:.2f}" if y else "n/a"

    pb, pd = profiled["base"], profiled["dmd"]
    r = (f"{'DMD/Base':<6} {ratio(d['params_total'], b['params_total']):>12} "
         f"{ratio(d['params_trainable'], b['params_trainable']):>10} {ratio(d['rss_built_mb'], b['rss_built_mb']):>10} "
         f"{ratio(d['step_hwm_mb'], b['step_hwm_mb']):>10} "
         f"{ratio(d['step_hwm_mb'] - d['rss_built_mb'], b['step_hwm_mb'] - b['rss_built_mb']):>10} "
         f"{ratio(d['process_peak_mb'], b['process_peak_mb']):>10} "
         f"{ratio(pd.get('tensor_peak_mb', 0), pb.get('tensor_peak_mb', 0)):>13}")
    if cuda:
        r += (f" {ratio(d['cuda_built_mb'], b['cuda_built_mb']):>11} "
              f"{ratio(d['cuda_step_peak_mb'], b['cuda_step_peak_mb']):>10} "
              f"{ratio(d['cuda_step_peak_mb'] - d['cuda_built_mb'], b['cuda_step_peak_mb'] - b['cuda_built_mb']):>10}")
    lines.append(r)
    lines.append("  RSS built = after imports + build + first batch (gc, malloc_trim); step peak = VmHWM over the "
                 "step (reset via clear_refs);\n  step incr = step peak - RSS built; "
                 "proc peak = whole-process VmHWM (build and step); "
                 "tensors peak = live tensor bytes over the step (torch.profiler memory timeline, separate run).")
    if not cuda:
        lines.append("  On the toy the tensors are a few MiB, so process RSS is mostly the runtime (torch/diffusers "
                     "imports, first-step autograd/oneDNN/AdamW buffers):\n  the model-memory ratio is in the "
                     "tensors-peak column and the persistent-state table below; on CUDA the CUDA columns are the "
                     "allocator's.")
    lines.append(f"  RSS after imports (no model): Base {b['rss_imports_mb']:.1f}, DMD {d['rss_imports_mb']:.1f} MiB"
                 f"; step time {b['step_s']:.2f} s vs {d['step_s']:.2f} s (bare runs, 1 thread)")
    lines.append("\nPersistent training state after the step (MiB, unique storages):")
    keys = list(b["state_mb"])
    lines.append(f"  {'config':<6} " + " ".join(f"{k:>15}" for k in keys) + f" {'sum':>9}")
    for name, x in (("Base", b), ("DMD", d)):
        lines.append(f"  {name:<6} " + " ".join(f"{x['state_mb'][k]:15.3f}" for k in keys)
                     + f" {sum(x['state_mb'].values()):9.3f}")
    lines.append(f"  {'DMD/Base':<6} " + " ".join(f"{ratio(d['state_mb'][k], b['state_mb'][k]):>15}" for k in keys)
                 + f" {ratio(sum(d['state_mb'].values()), sum(b['state_mb'].values())):>9}")
    lines.append("\nLive tensors at the step's peak by profiler category (MiB):")
    for name, p in (("Base", pb), ("DMD", pd)):
        if "tensor_error" in p:
            lines.append(f"  {name:<6} unavailable: {p['tensor_error']}")
        else:
            lines.append(f"  {name:<6} " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(p["tensor_at_peak"].items())))
    lines.append("\nWhat each holds:")
    lines += [f"  {name}: {HOLDS[k]}" for name, k in (("Base", "base"), ("DMD", "dmd"))]
    lines.append(f"  trainables per role: Base {b['roles']}, DMD {d['roles']}")
    if planner:
        lines.append("\n14B planner (python -m helios_train plan-table: Base LoRA r128 vs DMD LoRA r256, bf16, "
                     "8 GPUs, GB per GPU incl. estimated activations):")
        lines.append(f"  {'backend':<18} {'Base':>8} {'DMD':>8} {'DMD/Base':>9}")
        lines += [f"  {be:<18} {x:8.1f} {y:8.1f} {y / x:9.2f}" for be, (x, y) in planner.items()]
        lines.append("  (toy: fp32 weights, LoRA r8 on both; so the toy ratio is the shape of the cost, "
                     "not the 14B's numbers)")
    return "\n".join(lines)


def run(toy_root: Path, with_planner: bool = True) -> str:
    results = {c: measure(c, toy_root, profile=False) for c in CONFIGS}
    profiled = {c: measure(c, toy_root, profile=True) for c in CONFIGS}
    planner = None
    if with_planner:
        sys.path.insert(0, str(REPO))
        planner = planner_14b()
    return report(results, profiled, planner)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--toy-root", type=Path, default=REPO / "checkpoints/_toy")
    ap.add_argument("--no-planner", action="store_true", help="skip the 14B planner rows")
    args = ap.parse_args()
    if args.worker:
        res = worker(args.worker, args.toy_root.resolve(), args.profile)
        print("RESULT " + json.dumps(res))
        return
    sys.path.insert(0, str(REPO))
    from helios_train.data.toy_assets import ensure_toy_assets

    ensure_toy_assets(args.toy_root)
    print(run(args.toy_root.resolve(), not args.no_planner))


if __name__ == "__main__":
    main()
