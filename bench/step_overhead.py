"""Framework overhead of a Base-stage training step vs a bare PyTorch loop, measured side by side.

Both sides use the same diffusers HeliosTransformer3DModel weights, LoRA policy, batch shapes, AdamW
and clipping. Ours runs through the real entry (`helios_train.api.run`, what `python -m helios_train` runs:
shard loader, stage, backend, logging, throughput metrics, checkpoint-free); the bare loop is the minimal hand-written
step on pre-loaded batches. Degradations/task dropout are switched off on our side so both do the
same maths. Goal: ours / bare ≤ 1.05 at sizes where compute dominates.

Both sides are timed the same way: wall time between consecutive step starts. For ours that is the
whole loop iteration (next batch from the loader, the step, metrics and their collectives, the
validation and stop checks, the checkpoint check); for the bare loop its whole iteration (noise,
forward, loss, backward, clipping, AdamW).

    python bench/step_overhead.py [--steps 30] [--sizes toy,small]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "disabled")

SIZES = {
    # name: (transformer kwargs, latent h, w)
    "toy": (dict(num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                 rope_dim=(4, 6, 6)), 8, 16),
    "small": (dict(num_attention_heads=8, attention_head_dim=64, text_dim=64, freq_dim=64, ffn_dim=1024, num_layers=4,
                   rope_dim=(20, 22, 22)), 16, 32),
}


def make_assets(root: Path, kwargs: dict, h: int, w: int, text_dim: int) -> None:
    import webdataset as wds
    from diffusers import HeliosTransformer3DModel

    torch.manual_seed(0)
    HeliosTransformer3DModel(in_channels=4, out_channels=4, **kwargs).save_pretrained(root / "model/transformer")
    (root / "shards").mkdir(parents=True)
    rng = np.random.default_rng(0)

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()

    for s in range(2):
        with wds.TarWriter(str(root / f"shards/latent-{s:06d}.tar")) as sink:
            for v in range(8):
                sink.write({"__key__": f"v{s}_{v}", "latents.npy": npy(rng.standard_normal((4, 4, 9, h, w), np.float32)),
                            "prompt_embed.npy": npy(rng.standard_normal((64, text_dim), np.float32)),
                            "json": json.dumps({"caption": "bench"}).encode()})


def ours(root: Path, steps: int, h: int, w: int) -> list[float]:
    sys.argv = sys.argv[:1]
    from helios_train.config import compose

    from helios_train.api import run

    cfg = compose([
        f"model.path={root}/model", "model.build_toy=false", "data.build_toy=false",
        f"data.shards={root}/shards/latent-*.tar", f"data.latent_height={h}", f"data.latent_width={w}",
        f"output_root={root}/runs", f"run_name=r{time.time_ns()}", "tracker.mode=disabled",
        f"trainer.max_steps={steps}", f"trainer.checkpoint_every={steps * 10}", "trainer.perf.count_flops=false",
        "stage.anti_drift.corrupt_history=false", "stage.task_dropout.enabled=false", "data.batch_size=2",
        "validation.every=0",
    ])
    cfg.trainer.checkpoint_every = 10**9
    from helios_train.training.trainer import Trainer

    starts, run_step = [], Trainer.run_step

    def timed(self, batches):  # called once per loop iteration, after the batch was read
        starts.append(time.perf_counter())
        return run_step(self, batches)

    Trainer.run_step = timed
    try:
        run(cfg)
    finally:
        Trainer.run_step = run_step
    import shutil

    for d in (root / "runs").iterdir():
        shutil.rmtree(d)
    return [b - a for a, b in zip(starts, starts[1:])]  # start to start: the whole iteration


def bare(root: Path, steps: int, h: int, w: int, text_dim: int) -> list[float]:
    """Minimal loop: same model class, LoRA targets, inputs, loss, AdamW and clipping."""
    from diffusers import HeliosTransformer3DModel
    from peft import LoraConfig

    from helios_train.algorithms.history import HistoryConfig
    from helios_train.model.inputs import model_inputs

    model = HeliosTransformer3DModel.from_pretrained(root / "model", subfolder="transformer")
    model.requires_grad_(False)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "norm" not in n]
    model.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets + ["patch_embedding"]))
    for name in ("patch_short", "patch_mid", "patch_long"):
        getattr(model, name).requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    hcfg = HistoryConfig()
    b = 2
    x0, hist, tgt = torch.randn(b, 4, 1, h, w), torch.randn(b, 4, 19, h, w), torch.randn(b, 4, 9, h, w)
    emb = torch.randn(b, 64, text_dim)
    starts = []
    for _ in range(steps):
        starts.append(time.perf_counter())
        sigma = torch.sigmoid(torch.randn(b, generator=g))
        noise = torch.randn(tgt.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1, 1)
        noisy = (1 - s) * tgt + s * noise
        pred = model(**model_inputs(noisy, x0, hist, sigma * 1000, emb, hcfg), return_dict=False)[0]
        loss = ((pred.float() - (noise - tgt)) ** 2).flatten(1).mean(1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [b - a for a, b in zip(starts, starts[1:])]  # start to start, as for ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2, help="alternate ours/bare this many times")
    ap.add_argument("--sizes", default="toy,small")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for size in args.sizes.split(","):
        kwargs, h, w = SIZES[size]
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_assets(root, kwargs, h, w, kwargs["text_dim"])
            a, b = [], []
            for _ in range(args.rounds):  # interleaved so drift in machine load hits both sides
                a += ours(root, args.steps, h, w)[3:]
                b += bare(root, args.steps, h, w, kwargs["text_dim"])[3:]
        ma, mb = statistics.median(a), statistics.median(b)
        rows.append((size, h, w, ma * 1e3, mb * 1e3, ma / mb))
    print("\nmedian wall time between consecutive step starts (goal ours/bare <= 1.05)")
    print("  ours: loader + step + metrics/collectives + validation/stop/checkpoint checks; bare: the step alone")
    print(f"{'size':<6} {'latent':>8} {'ours ms':>9} {'bare ms':>9} {'ours/bare':>10}")
    for size, h, w, ma, mb, r in rows:
        print(f"{size:<6} {f'{h}x{w}':>8} {ma:9.1f} {mb:9.1f} {r:10.3f}")


if __name__ == "__main__":
    main()
