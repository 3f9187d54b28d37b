"""Transformer FLOPs to generate one 33-frame chunk, per variant, counted by torch's FlopCounterMode.

    python bench/compute_per_chunk.py

One forward per (level, resolution) is counted — on the toy model and on the 14B geometry built on
the meta device (no weights, shapes only) — and multiplied by the sampler's forward count:
- Base: 50 steps × CFG (2 forwards) at full resolution with 2400 history tokens;
- Mid: [20, 20, 20] pyramid steps × CFG over the three levels (540 / 2160 / 8640 noisy tokens at 384×640);
- Distilled: add a row with `distilled_row` ([2, 2, 2] without CFG, 12 NFE for the first chunk).
Also compares the Mid training step's three execution modes (separate / batch_levels / packed):
tokens per step, forward FLOPs and median step time on the toy and a small model, and forward
FLOPs of one 14B micro-batch.
Last, the peak memory of one Distilled (DMD) training step vs one Base step on the toy model, each in
a fresh subprocess (bench/peak_memory.py), next to the 14B planner's Base / DMD per-GPU totals.

    python bench/compute_per_chunk.py --only memory      # sections: flops, wall, mid, memory
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from helios_train.algorithms.history import HistoryConfig  # noqa: E402
from helios_train.model.inputs import model_inputs  # noqa: E402

TOY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32, freq_dim=32,
           ffn_dim=64, num_layers=2, rope_dim=(4, 6, 6))


def forward_flops(model, latent_hw, level_hw, channels: int, text_dim: int, device) -> float:
    h, w = latent_hw
    lh, lw = level_hw
    inp = model_inputs(torch.zeros(1, channels, 9, lh, lw, device=device), torch.zeros(1, channels, 1, h, w, device=device),
                       torch.zeros(1, channels, 19, h, w, device=device), torch.tensor([500.0], device=device),
                       torch.zeros(1, 512, text_dim, device=device), HistoryConfig())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inp, return_dict=False)
    return float(counter.get_total_flops())


def base_row(model, hw, c, d, dev) -> float:
    return 50 * 2 * forward_flops(model, hw, hw, c, d, dev)


def mid_row(model, hw, c, d, dev) -> float:
    h, w = hw
    return sum(20 * 2 * forward_flops(model, hw, (h // f, w // f), c, d, dev) for f in (4, 2, 1))


def distilled_row(model, hw, c, d, dev, steps=(2, 2, 2), first_chunk=False) -> float:
    """Pyramid x0 sampler without CFG; the first chunk doubles the steps per level (amplified)."""
    h, w = hw
    mult = 2 if first_chunk else 1
    return sum(n * mult * forward_flops(model, hw, (h // f, w // f), c, d, dev) for n, f in zip(steps, (4, 2, 1)))


MID_MODES = ("separate", "batch_levels", "packed")
# Sizes for the Mid training-step comparison: (transformer kwargs, latent h, w, text dim).
STEP_SIZES = {
    "toy": (TOY, 8, 16, 32),
    "small": (dict(num_attention_heads=8, attention_head_dim=64, in_channels=4, out_channels=4, text_dim=64,
                   freq_dim=64, ffn_dim=1024, num_layers=4, rope_dim=(20, 22, 22)), 16, 32, 64),
}


def mid_forward_flops(model, hw, c, d, dev, mode: str, ratios=(1, 2, 1)) -> float:
    """Forward FLOPs of one Mid training micro-batch (batch 1, one segment per draw) by execution mode."""
    from helios_train.model.packed_forward import packed_forward

    h, w = hw
    shapes = [(h // f, w // f) for f, r in zip((4, 2, 1), ratios) for _ in range(r)]
    x0, hist = torch.zeros(1, c, 1, h, w, device=dev), torch.zeros(1, c, 19, h, w, device=dev)
    embeds, t = torch.zeros(1, 512, d, device=dev), torch.tensor([500.0], device=dev)
    xs = [torch.zeros(1, c, 9, lh, lw, device=dev) for lh, lw in shapes]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if mode == "packed":
            packed_forward(model, xs, [t] * len(xs), x0, hist, embeds, HistoryConfig())
        elif mode == "separate":
            for x in xs:
                model(**model_inputs(x, x0, hist, t, embeds, HistoryConfig()), return_dict=False)
        else:
            for lv in sorted(set(shapes)):
                n = shapes.count(lv)
                model(**model_inputs(torch.cat([x for x in xs if x.shape[-2:] == lv]), x0.repeat(n, 1, 1, 1, 1),
                                     hist.repeat(n, 1, 1, 1, 1), t.repeat(n), embeds.repeat(n, 1, 1),
                                     HistoryConfig()), return_dict=False)
    return float(counter.get_total_flops())


def mid_step_times(toy_root: Path, size: str, n: int = 10) -> dict[str, tuple[float, int, float]]:
    """Median fwd+bwd time of one Mid training micro-batch (2-init [1,2,1], batch 1, LoRA r8) per
    execution mode, with tokens per step and forward FLOPs; same draws for every mode."""
    import tempfile

    from diffusers import HeliosTransformer3DModel
    from helios_train.config import compose

    from helios_train.stages.mid import MidStage

    kwargs, h, w, d = STEP_SIZES[size]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        HeliosTransformer3DModel(**kwargs).save_pretrained(f"{tmp}/transformer")
        g = torch.Generator().manual_seed(0)
        batch = {"x0": torch.randn(1, 4, 1, h, w, generator=g), "history": torch.randn(1, 4, 19, h, w, generator=g),
                 "target": torch.randn(1, 4, 9, h, w, generator=g),
                 "prompt_embeds": torch.randn(1, 512, d, generator=g)}
        for mode in MID_MODES:
            cfg = compose([f"toy_root={toy_root}", "stage=mid", "stage.trainables.lora.rank=8",
                           f"model.transformer_path={tmp}/transformer", f"stage.pyramid.execution={mode}"])
            stage = MidStage(cfg, torch.device("cpu"))
            stage.bind({"generator": type("R", (), {"model": stage.transformer, "module": stage.transformer})()})
            times = []
            for i in range(n + 2):  # 2 warm-up steps
                t0 = time.perf_counter()
                loss, _ = stage.loss("generator", batch, 0, torch.Generator().manual_seed(i))
                loss.backward()
                times.append(time.perf_counter() - t0)
            tokens = sum(stage.tokens_per_sample(batch).values())
            flops = mid_forward_flops(stage.transformer, (h, w), 4, d, "cpu", mode)
            out[mode] = (statistics.median(times[2:]), tokens, flops)
    return out


def wall_time_per_chunk(model_dir: Path, repeats: int = 2) -> dict[str, float]:
    """Seconds to generate one 33-frame chunk (latent output, toy 64×128) with diffusers' pipelines:
    Base 50 steps × CFG 5, Mid [20,20,20] × CFG-Zero*, Distilled [2,2,2] without CFG (chunk 0 is
    amplified to 12 NFE, so a 2-chunk run is timed and the first chunk subtracted)."""
    from diffusers import AutoencoderKLWan, HeliosTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    from helios_train.model.variants import DEFAULTS, build_pipeline, call_kwargs

    parts = (HeliosTransformer3DModel.from_pretrained(model_dir, subfolder="transformer"),
             AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae"),
             UMT5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder"),
             AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer"))
    out = {}
    for variant in ("base", "mid", "distilled"):
        pipe = build_pipeline(variant, *parts)
        pipe.set_progress_bar_config(disable=True)
        embeds = pipe.encode_prompt("a red circle", do_classifier_free_guidance=True, max_sequence_length=512)
        kwargs = dict(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=64, width=128,
                      output_type="latent", **call_kwargs(variant, DEFAULTS[variant]))

        def run(frames):
            t0 = time.perf_counter()
            with torch.no_grad():
                pipe(num_frames=frames, generator=torch.Generator().manual_seed(0), **kwargs)
            return time.perf_counter() - t0

        one = statistics.median(run(33) for _ in range(repeats))
        two = statistics.median(run(66) for _ in range(repeats))
        out[variant] = two - one  # a steady-state (non-first) chunk
    return out


SECTIONS = ("flops", "wall", "mid", "memory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        ap.error(f"--only: unknown section(s) {sorted(only - set(SECTIONS))}; expected {SECTIONS}")
    from helios_train.data.toy_assets import ensure_toy_assets

    assets = ensure_toy_assets(REPO / "checkpoints/_toy")
    if "flops" in only:
        flops_table()
    if "wall" in only:
        wall = wall_time_per_chunk(assets.model_dir)
        print(f"\n{'wall time per chunk (toy, CPU)':<32} {'seconds':>8} {'vs Base':>8}")
        for variant, secs in wall.items():
            print(f"{variant:<32} {secs:8.3f} {secs / wall['base']:8.3f}")
    if "mid" in only:
        mid_tables(assets.model_dir.parent)
    if "memory" in only:
        from bench.peak_memory import run as peak_memory

        print(peak_memory(assets.model_dir.parent.resolve()))


def flops_table() -> None:
    from diffusers import HeliosTransformer3DModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    toy = HeliosTransformer3DModel(**TOY).eval()

    # 14B geometry under FakeTensorMode: shapes only, no memory, no weights (the rotary embedding's
    # autocast guard rejects the meta device, fake CPU tensors pass).
    with FakeTensorMode(allow_non_fake_inputs=True):
        big = HeliosTransformer3DModel().eval()
        rows_big = [base_row(big, (48, 80), 16, 4096, "cpu"), mid_row(big, (48, 80), 16, 4096, "cpu"),
                    distilled_row(big, (48, 80), 16, 4096, "cpu"),
                    distilled_row(big, (48, 80), 16, 4096, "cpu", first_chunk=True)]
    toy_rows = [base_row(toy, (8, 16), 4, 32, "cpu"), mid_row(toy, (8, 16), 4, 32, "cpu"),
                distilled_row(toy, (8, 16), 4, 32, "cpu"), distilled_row(toy, (8, 16), 4, 32, "cpu", first_chunk=True)]
    rows = [("toy (8x16 latents)", *toy_rows), ("14B (48x80 latents)", *rows_big)]
    print(f"\n{'model':<20} {'Base 50xCFG':>14} {'Mid [20]*3xCFG':>15} {'Mid/Base':>9} {'Distilled':>12} "
          f"{'Dist/Base':>10} {'Dist chunk0':>12}   (TFLOPs per chunk)")
    for name, b, m, dist, dist0 in rows:
        print(f"{name:<20} {b / 1e12:14.3f} {m / 1e12:15.3f} {m / b:9.3f} {dist / 1e12:12.4f} {dist / b:10.4f} "
              f"{dist0 / 1e12:12.4f}")


def mid_tables(toy_root: Path) -> None:
    from diffusers import HeliosTransformer3DModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    print(f"\n{'Mid step, 2-init [1,2,1], batch 1':<36} {'tokens/step':>11} {'fwd GFLOPs':>11} "
          f"{'median ms':>10} {'vs separate':>12}   (fwd+bwd, CPU, median of 10)")
    for size in STEP_SIZES:
        times = mid_step_times(toy_root, size)
        for mode, (t, tok, flops) in times.items():
            print(f"{size + ' ' + mode:<36} {tok:11d} {flops / 1e9:11.3f} {t * 1e3:10.1f} "
                  f"{t / times['separate'][0]:12.3f}")
    with FakeTensorMode(allow_non_fake_inputs=True):
        big = HeliosTransformer3DModel().eval()
        big_flops = {m: mid_forward_flops(big, (48, 80), 16, 4096, "cpu", m) for m in MID_MODES}
    print(f"\n{'14B Mid micro-batch fwd (48x80)':<36} {'TFLOPs':>11}   (23100 tokens: 540 + 2x2160 + 8640 + 4x2400)")
    for mode, flops in big_flops.items():
        print(f"{mode:<36} {flops / 1e12:11.2f}")


if __name__ == "__main__":
    main()
