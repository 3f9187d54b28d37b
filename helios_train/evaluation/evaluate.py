"""`python -m helios_train evaluate`: score exports on held-out clips — continuation against ground truth, drift,
prompt adherence, cost — and write a JSON, a markdown table, plots and a side-by-side video grid.

    python -m helios_train evaluate --export base=exports/base --export mid=exports/mid \\
        --data 'checkpoints/_toy/miniature/raw/heldout/raw-*.tar' --out eval/ [--chunks 11] [--clips 16]

`--export NAME=FOLDER[:VARIANT]`: a diffusers-layout folder (our export or an official Helios download; the variant
— t2v | base | mid | distilled — is read from it unless given). `--data`: raw mp4 shards of held-out clips
(`python -m data_prep.videos_to_shards`), each at least 1 + `--chunks` chunks of 33 frames long; the same command
scores a 14B export on real clips (captions of the miniature's grammar add the tracker's prompt adherence).
Baselines always in the table: copy-last-frame (the last given frame held still) and the ground truth's own
distribution numbers. Sampler settings: each variant's defaults (helios_train/model/variants.py) unless
`--steps` (t2v / base), `--pyramid-steps` (mid) or `--distilled-steps` say otherwise.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from helios_train.data.miniature_world import CHUNK_FRAMES
from helios_train.evaluation.continuation import Cost, ForwardCounter, copy_last_frame, rollout
from helios_train.evaluation.scores import (adherence_scores, continuation_scores, distribution_scores,
                                            heliosbench_scores, mean_curves)

log = logging.getLogger(__name__)


def parse_export(text: str) -> tuple[str, str, str | None]:
    """"name=folder[:variant]" → (name, folder, variant or None)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--export {text!r}: expected NAME=FOLDER[:VARIANT]")
    from helios_train.model.variants import VARIANTS

    name, _, folder = text.partition("=")
    variant = None
    head, _, tail = folder.rpartition(":")
    if head and tail in VARIANTS:
        folder, variant = head, tail
    if not (Path(folder) / "model_index.json").is_file():
        raise argparse.ArgumentTypeError(f"--export {name}={folder}: no model_index.json there (not a diffusers folder)")
    return name, folder, variant


def load_clips(pattern: str, chunks: int, limit: int | None) -> list[tuple[str, str, np.ndarray]]:
    """(key, caption, frames) of held-out clips long enough for 1 + `chunks` chunks, checked before any model loads."""
    from helios_train.data.raw_clips import decoded_clips
    from helios_train.data.shards import expand_shards

    need = (chunks + 1) * CHUNK_FRAMES
    clips = decoded_clips(expand_shards(pattern))
    long_enough = [c for c in clips if len(c[2]) >= need]
    if not long_enough:
        raise SystemExit(f"--data {pattern}: no clip has the {need} frames that 1 given + {chunks} generated chunks "
                         f"need ({len(clips)} clips read); lower --chunks")
    if len(long_enough) < len(clips):
        log.warning("%d of %d clips are shorter than %d frames and are left out", len(clips) - len(long_enough),
                    len(clips), need)
    return long_enough[:limit] if limit else long_enough


def sampler_settings(variant: str, args):
    from helios_train.model.variants import DEFAULTS, SINGLE_LEVEL, SamplerSettings

    s = SamplerSettings(**asdict(DEFAULTS[variant]))
    if variant in SINGLE_LEVEL and args.steps:
        s.num_inference_steps = args.steps
    if variant == "mid" and args.pyramid_steps:
        s.pyramid_steps = list(args.pyramid_steps)
    if variant == "distilled" and args.distilled_steps:
        s.pyramid_steps = list(args.distilled_steps)
    return s


def evaluate_export(folder: str, variant: str | None, clips, args) -> dict:
    """Every score of one export: continuation per chunk, distribution, T2V adherence, HeliosBench, cost."""
    from helios_train.sampling.infer import load_pipeline

    pipe, variant = load_pipeline(folder, variant)
    pipe.set_progress_bar_config(disable=True)
    size = tuple(clips[0][2].shape[1:3])  # the clips' own resolution
    settings = sampler_settings(variant, args)
    cost, t2v_cost = Cost(), Cost()
    counter = ForwardCounter(pipe.transformer, cost)
    cont, dist, bench, videos = [], [], [], []
    for i, (key, caption, frames) in enumerate(clips):
        log.info("%s: continuing %s (%d/%d)", folder, key, i + 1, len(clips))
        gen = rollout(pipe, variant, settings, caption, args.chunks, args.seed + i, counter, size,
                      given=frames[:CHUNK_FRAMES], count_flops=i == 0)
        cont.append(continuation_scores(gen, frames, args.chunks))
        dist.append(distribution_scores(gen, frames, args.chunks))
        if i < args.bench_clips:  # HeliosBench's flow runs at 640 px wide: ~5 s per 33 frames on a CPU core
            bench.append(heliosbench_scores(gen))
        if not videos:  # only the first clip's rollout goes into the grid: ~270 MB a clip at 384×640
            videos.append(gen)
    counter.cost = t2v_cost
    adherence = []
    for i, (key, caption, frames) in enumerate(clips[: args.t2v_clips]):
        gen = rollout(pipe, variant, settings, caption, args.t2v_chunks, args.seed + 1000 + i, counter, size)
        scored = adherence_scores(gen, caption)
        if scored is not None:
            adherence.append(scored)
    counter.remove()
    return {"variant": variant, "export": str(folder), "settings": asdict(settings), **mean_curves(cont),
            "distribution": mean_curves(dist), "adherence": _adherence_summary(adherence),
            "heliosbench": _bench_summary(bench), "cost": cost.per_chunk(),
            "per_clip_psnr": [c["psnr"] for c in cont], "_videos": videos}


def _adherence_summary(rows: list[dict]) -> dict | None:
    if not rows:
        return None
    per_chunk = [float(np.mean([r["chunks"][k]["score"] for r in rows if len(r["chunks"]) > k]))
                 for k in range(max(len(r["chunks"]) for r in rows))]
    return {"score": float(np.mean([r["score"] for r in rows])), "per_chunk": per_chunk,
            "accuracy": {a: float(np.mean([r["accuracy"][a] for r in rows])) for a in rows[0]["accuracy"]}}


def _bench_summary(rows: list[dict]) -> dict | None:
    if not rows:
        return None
    return {"motion_amplitude": float(np.mean([r["motion_amplitude"] for r in rows])),
            "drifting": {m: float(np.mean([r["drifting"][m]["drift"] for r in rows])) for m in rows[0]["drifting"]}}


def baselines(clips, chunks: int, bench_clips: int) -> dict:
    """Copy-last-frame (continuation and distribution) and the ground truth's own distribution numbers."""
    copy = [copy_last_frame(f[:CHUNK_FRAMES], chunks) for _, _, f in clips]
    truth = [f[CHUNK_FRAMES:(chunks + 1) * CHUNK_FRAMES] for _, _, f in clips]
    return {
        "copy last frame": {"variant": "baseline", **mean_curves([continuation_scores(c, f, chunks)
                                                                  for c, (_, _, f) in zip(copy, clips)]),
                            "distribution": mean_curves([distribution_scores(c, f, chunks)
                                                         for c, (_, _, f) in zip(copy, clips)])},
        "ground truth": {"variant": "data", "distribution": mean_curves([distribution_scores(t, f, chunks)
                                                                         for t, (_, _, f) in zip(truth, clips)]),
                         "heliosbench": _bench_summary([heliosbench_scores(t) for t in truth[:bench_clips]]),
                         "_videos": truth[:1]},
    }


def run(args) -> dict:
    from helios_train.evaluation.report import write_report

    clips = load_clips(args.data, args.chunks, args.clips)
    results = {"data": args.data, "clips": len(clips), "chunks": args.chunks, "variants": baselines(clips, args.chunks, args.bench_clips)}
    for name, folder, variant in args.export:
        results["variants"][name] = evaluate_export(folder, variant, clips, args)
    return write_report(results, Path(args.out), [k for k, _, _ in clips])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", action="append", type=parse_export, required=True, help="NAME=FOLDER[:VARIANT]")
    ap.add_argument("--data", required=True, help="raw mp4 shards of held-out clips (brace pattern, glob or list)")
    ap.add_argument("--out", default="outputs/evaluate")
    ap.add_argument("--chunks", type=int, default=11, help="chunks to generate after the given one")
    ap.add_argument("--clips", type=int, help="score only the first N clips")
    ap.add_argument("--t2v-clips", type=int, default=4, help="clips whose captions are also rendered T2V (adherence)")
    ap.add_argument("--t2v-chunks", type=int, default=3, help="chunks per T2V adherence rollout")
    ap.add_argument("--steps", type=int, help="t2v / base: denoising steps (default 50)")
    ap.add_argument("--pyramid-steps", type=int, nargs=3, help="mid: steps per pyramid level (default 20 20 20)")
    ap.add_argument("--distilled-steps", type=int, nargs=3, help="distilled: steps per level (default 2 2 2)")
    ap.add_argument("--bench-clips", type=int, default=1,
                    help="clips scored with HeliosBench's motion amplitude / drifting (its optical flow is slow)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    results = run(args)
    print(Path(args.out) / "results.md")
    return results
