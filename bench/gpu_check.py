"""One-command GPU check: Helios training steps at 48×80 latents on this machine's GPU, in bf16.

    python bench/gpu_check.py                 # on a CUDA machine: < 8 min on one H100 / H200
    python bench/gpu_check.py --allow-cpu     # the same code path at toy size on a CPU (what CI runs)

Random-weight transformers (nothing downloaded or read: helios_train/model/fake_weights.py RandomWeights)
at two geometries — Wan2.1-1.3B (12 heads × 128, FFN 8960, 30 blocks) and the 14B width (40 heads × 128,
FFN 13824) with as many of its 40 blocks as the planner says fit in 85 % of the GPU — train the official
stage_1_init recipe (LoRA r128 + memory patches, bf16 frozen weights under bf16 autocast, gradient
checkpointing, batch 2, history 16/2/1 + x0, 9 noisy frames, 512 text tokens) through the real trainer
(`Trainer.run_step`). Per geometry and speed option (`model.attention_backend` native vs flash when
flash-attn is installed; `model.compile_blocks` off/on), after 2 warm-up steps, over 3 timed steps
(CUDA-synchronised wall time between step starts):
  step time; tokens/s, noisy and history; achieved TFLOP/s (torch FlopCounterMode on a step) and MFU
  against the device's dense bf16 peak (detected from its name); peak allocated memory next to the
  planner's figure and the dry run's (the same step on fake tensors, helios_train/planning/dry_run.py).
Then the cost of the DMD stage's low-VRAM offload (stage.dmd.low_vram): the measured pinned host→device
bandwidth and the seconds it adds to a 14B DMD step.
Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GB = 1e9
GEOMETRIES = {
    "wan-1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "14b-width": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
    "toy": dict(num_attention_heads=2, attention_head_dim=128, ffn_dim=692, num_layers=2, text_dim=64),  # --allow-cpu
}
# Dense bf16 TFLOP/s (no sparsity) by device-name fragment, most specific first.
PEAK_BF16 = (("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0),
             ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10G", 70.0),
             ("RTX 6000 Ada", 364.0), ("RTX 4090", 165.0))


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16 if k in name), None)


def model_dir(root: Path, geometry: dict) -> Path:
    """A diffusers-layout folder with only transformer/config.json: the source of the architecture."""
    config = {"_class_name": "HeliosTransformer3DModel", **geometry}  # other keys: the class defaults (14B)
    path = root / "transformer"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return root


def compose_config(folder: Path, device: str, attention: str, compile_blocks: bool, hw: tuple[int, int]):
    from hydra import compose, initialize_config_dir

    from helios_train.config import CONF_DIR, register_configs
    from helios_train.runtime.precision import resolve_precision

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=stage_1_init", "model=helios_14b", f"model.path={folder}", "data=webdataset",
            f"data.latent_height={hw[0]}", f"data.latent_width={hw[1]}", f"trainer.device={device}",
            f"model.attention_backend={attention}", f"model.compile_blocks={compile_blocks}", "plan_gpus=1"])
    resolve_precision(cfg, torch.device(device))
    return cfg


def fitting_blocks(folder: Path, budget_gb: float, hw) -> int:
    """The most 14B blocks whose planned single-GPU step fits `budget_gb`."""
    from helios_train.planning.plan import plan

    cfg = compose_config(folder, "cpu", "native", False, hw)
    lo, hi = 1, 40  # memory grows with depth: bisect
    while lo < hi:
        mid = (lo + hi + 1) // 2
        cfg.model.transformer_overrides = {"num_layers": mid}
        lo, hi = (mid, hi) if plan(cfg, "single")["total"] / GB <= budget_gb else (lo, mid - 1)
    return lo


def measure_variant(cfg, steps: int = 3, warmup: int = 2) -> dict:
    from helios_train.planning import dry_run as D
    from helios_train.model.fake_weights import RandomWeights, transformer_config
    from helios_train.model.loading import use_weights_source
    from helios_train.training.callbacks.throughput import ThroughputCallback
    from helios_train.training.trainer import Trainer

    device = torch.device(cfg.trainer.device)
    dcfg = D.dry_run_config(cfg)
    dcfg.trainer.device = cfg.trainer.device
    dcfg.trainer.perf.count_flops = True  # FlopCounterMode on each kind of step's first occurrence (warm-up)
    tcfg = transformer_config(dcfg.model)
    with use_weights_source(RandomWeights(device)), tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(dcfg, Path(tmp), [], None, {})
        batch = D.synthetic_batch(dcfg, int(tcfg.get("in_channels", 16)), int(tcfg.get("text_dim", 4096)))
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for _ in range(warmup):
            trainer.run_step([batch])
            trainer.step += 1
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        meter = trainer.callback(ThroughputCallback).meter
        meter.cfg.count_flops = False  # no counting inside the timed steps
        starts, counted = [time.perf_counter()], []
        for _ in range(steps):
            trainer.run_step([batch])
            trainer.step += 1
            sync()
            starts.append(time.perf_counter())
            counted.append(meter.step_flops)  # None: a kind of step the warm-up did not count
        step_s = (starts[-1] - starts[0]) / steps
        known = [(f, b - a) for f, a, b in zip(counted, starts, starts[1:]) if f is not None]
        tokens = trainer.stage.tokens_per_sample(trainer.stage.prepare_batch(batch))
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
        trainer.close()
    b = int(cfg.data.batch_size)
    tflops = sum(f for f, _ in known) / sum(dt for _, dt in known) / 1e12 if known else float("nan")
    return {"step_s": step_s, "noisy_tok_s": tokens["noisy"] * b / step_s, "history_tok_s": tokens["history"] * b / step_s,
            "tflops": tflops, "peak_gb": peak / GB}


def offload_cost(device: str, gb_per_base: float, switches: int = 6) -> dict:
    """stage.dmd.low_vram's cost on this machine: host→device onload bandwidth of FrozenBaseResidency (pinned
    copies, helios_train/model/low_vram.py) on two bases of `gb_per_base` frozen bf16 tensors (256 MB each), and what
    that adds to a 14B DMD step: a generator-update step moves 4 bases (28.68 GB each), a critic-only step 2,
    so 2.4 bases per step on average at the official 5:1 ratio."""
    from helios_train.model.low_vram import FrozenBaseResidency

    per = int(min(gb_per_base, 0.256) * GB) // 2
    count = max(1, int(gb_per_base * GB) // (per * 2))
    bases = {}
    for name in ("generator", "critic"):
        m = torch.nn.Module()
        for i in range(count):
            m.register_parameter(f"w{i}", torch.nn.Parameter(torch.randn(per, dtype=torch.bfloat16), requires_grad=False))
        bases[name] = m
    r = FrozenBaseResidency(bases, torch.device(device))
    r.use("generator")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    r.take_onloaded_bytes()
    t = time.perf_counter()
    for i in range(switches):
        r.use("critic" if i % 2 == 0 else "generator")
    sync()
    seconds = time.perf_counter() - t
    gbps = r.take_onloaded_bytes() / GB / seconds
    return {"onload_gb_per_s": gbps, "dmd_step_added_s": 2.4 * 28.68 / gbps,
            "generator_step_added_s": 4 * 28.68 / gbps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--allow-cpu", action="store_true", help="run the toy geometry on the CPU (code-path check)")
    ap.add_argument("--budget-s", type=float, default=420, help="skip the remaining variants after this long")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not a.allow_cpu:
        print("gpu_check: no CUDA device on this machine — nothing to measure (run it where a GPU is; "
              "--allow-cpu checks the code path at toy size)")
        return 0
    from helios_train.planning.dry_run import measure
    from helios_train.planning.plan import plan

    t0 = time.perf_counter()
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    total_gb = torch.cuda.get_device_properties(0).total_memory / GB if cuda else float("nan")
    peak = peak_tflops(name)
    hw = (48, 80) if cuda else (8, 16)
    try:
        import flash_attn  # noqa: F401

        attentions = ["native", "flash"]
    except ImportError:
        attentions = ["native"]
    # compile_blocks on a CPU would spend minutes in inductor for a toy: the code-path check skips it
    variants = [(att, False) for att in attentions] + ([("native", True)] if cuda else [])
    geometries = ["wan-1.3b", "14b-width"] if cuda else ["toy"]
    rows = []
    print(f"gpu_check {time.strftime('%Y-%m-%d')} on {name} ({total_gb:.0f} GB), torch {torch.__version__}; "
          f"dense bf16 peak {peak or 'unknown'} TFLOP/s; stage_1_init, batch 2, {hw[0]}×{hw[1]} latents")
    with tempfile.TemporaryDirectory() as tmp:
        for geo in geometries:
            folder = model_dir(Path(tmp) / geo, GEOMETRIES[geo])
            blocks = GEOMETRIES[geo]["num_layers"]
            if geo == "14b-width":
                blocks = fitting_blocks(folder, 0.85 * total_gb, hw)
            for attention, compile_blocks in variants:
                if time.perf_counter() - t0 > a.budget_s:
                    print(f"  (skipped {geo} {attention} compile={compile_blocks}: past --budget-s {a.budget_s:.0f})")
                    continue
                cfg = compose_config(folder, device, attention, compile_blocks, hw)
                cfg.model.transformer_overrides = {"num_layers": blocks} if geo == "14b-width" else {}
                row = {"geometry": geo, "blocks": blocks, "attention": attention, "compile": compile_blocks}
                try:
                    row.update(measure_variant(cfg))
                except Exception as exn:  # a missing kernel or an OOM is a result, not a crash of the check
                    row["error"] = f"{type(exn).__name__}: {str(exn).splitlines()[0][:120]}"
                cpu_cfg = compose_config(folder, "cpu", "native", False, hw)
                cpu_cfg.model.transformer_overrides = cfg.model.transformer_overrides
                row["planned_gb"] = plan(cpu_cfg, "single")["total"] / GB
                if not compile_blocks and attention == "native":
                    row["dry_run_gb"] = max(p["Total"] for p in measure(cpu_cfg)["phases"].values()) / GB
                row["mfu"] = row.get("tflops", float("nan")) / peak if peak else float("nan")
                rows.append(row)
                print(format_row(row), flush=True)
    print(table(rows))
    cost = offload_cost(device, 4.0 if cuda else 0.01)
    print(f"stage.dmd.low_vram: host→device onload {cost['onload_gb_per_s']:.1f} GB/s (pinned); adds "
          f"{cost['dmd_step_added_s']:.2f} s to an average 14B DMD step (2.4 × 28.7 GB), "
          f"{cost['generator_step_added_s']:.2f} s to a generator-update step (4 bases)")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "low_vram": cost}, indent=1))
    return 0


def format_row(r: dict) -> str:
    if "error" in r:
        return f"  {r['geometry']} ×{r['blocks']} {r['attention']} compile={r['compile']}: {r['error']}"
    return (f"  {r['geometry']} ×{r['blocks']} {r['attention']} compile={r['compile']}: {r['step_s']:.3f} s/step, "
            f"{r['tflops']:.1f} TFLOP/s, MFU {r['mfu']:.3f}, peak {r['peak_gb']:.1f} GB (planned {r['planned_gb']:.1f})")


def table(rows: list[dict]) -> str:
    lines = ["| geometry | blocks | attention | compile | step s | noisy tok/s | history tok/s | TFLOP/s | MFU | "
             "peak GB | planned GB | dry run GB |", "|" + "---|" * 12]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['geometry']} | {r['blocks']} | {r['attention']} | {r['compile']} | {r['error']} |")
            continue
        dry = f"{r['dry_run_gb']:.1f}" if "dry_run_gb" in r else "—"
        lines.append(f"| {r['geometry']} | {r['blocks']} | {r['attention']} | {r['compile']} | {r['step_s']:.3f} | "
                     f"{r['noisy_tok_s']:.0f} | {r['history_tok_s']:.0f} | {r['tflops']:.1f} | {r['mfu']:.3f} | "
                     f"{r['peak_gb']:.1f} | {r['planned_gb']:.1f} | {dry} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
