"""What `python -m helios_train evaluate` writes: results.json (every number), results.md (the table), PNG plots
(PSNR per chunk index for each variant — the drift curves —, distribution curves, quality against transformer FLOPs
per chunk) and grid.mp4 (ground truth | each variant side by side, first held-out clip)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


MARKS = (1, 5, 10)  # chunk indices (1 = the first generated chunk) the table shows besides the mean


def _fmt(x, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_table(results: dict) -> str:
    """One row per variant: continuation PSNR at a few chunk indices and over all, SSIM, T2V adherence, drift and
    grid numbers, and cost per chunk."""
    marks = [m for m in MARKS if m <= results["chunks"]]
    head = (["variant"] + [f"PSNR chunk {m}" for m in marks] + ["PSNR mean", "SSIM mean", "T2V adherence",
            "hist. dist. (last)", "grid energy", "boundary jump", "fwd / chunk", "TFLOPs / chunk", "s / chunk"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["variants"].items():
        psnr, ssim, dist = r.get("psnr"), r.get("ssim"), r.get("distribution", {})
        cost, adh = r.get("cost", {}), r.get("adherence")
        row = [name] + [_fmt(psnr[m - 1]) if psnr and len(psnr) >= m else "—" for m in marks]
        row += [_fmt(float(np.mean(psnr))) if psnr else "—", _fmt(float(np.mean(ssim)), 3) if ssim else "—",
                _fmt(adh["score"]) if adh else "—",
                _fmt(dist["histogram_distance"][-1], 3) if dist.get("histogram_distance") else "—",
                _fmt(float(np.mean(dist["grid"])), 4) if dist.get("grid") else "—",
                _fmt(float(np.mean(dist["boundary_jump"]))) if dist.get("boundary_jump") else "—",
                _fmt(cost.get("forwards"), 1), _fmt(cost.get("tflops"), 4), _fmt(cost.get("seconds"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _plot_curves(results: dict, key: str, path: Path, ylabel: str, inside: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, r in results["variants"].items():
        values = (r.get(inside) or {}).get(key) if inside else r.get(key)
        if values:
            ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=name)
    ax.set_xlabel("generated chunk index (33 frames each)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_cost(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in results["variants"].items():
        tflops = (r.get("cost") or {}).get("tflops")
        if r.get("psnr") and tflops and not math.isnan(tflops):
            ax.scatter([tflops], [np.mean(r["psnr"])])
            ax.annotate(name, (tflops, np.mean(r["psnr"])), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("transformer TFLOPs per chunk")
    ax.set_ylabel("continuation PSNR, mean over chunks (dB)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_grid(videos: dict[str, np.ndarray], path: Path) -> None:
    """Side-by-side mp4 of equally long videos (cut to the shortest), named in the JSON next to it."""
    from helios_train.data.video_io import encode_mp4

    n = min(len(v) for v in videos.values())
    grid = np.concatenate([v[:n] for v in videos.values()], axis=2)
    path.write_bytes(encode_mp4(grid, 24))
    path.with_suffix(".json").write_text(json.dumps({"columns": list(videos)}, indent=1))


def write_report(results: dict, out: Path, clip_keys: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    videos = {name: r.pop("_videos")[0] for name, r in results["variants"].items() if r.get("_videos")}
    for r in results["variants"].values():
        r.pop("_videos", None)
    results["clip_keys"] = clip_keys
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(f"held-out clips: {results['clips']}, generated chunks: {results['chunks']} "
                                    f"({results['data']})\n\n" + markdown_table(results))
    _plot_curves(results, "psnr", out / "psnr_per_chunk.png", "PSNR vs ground truth (dB)")
    _plot_curves(results, "ssim", out / "ssim_per_chunk.png", "SSIM vs ground truth")
    for key in ("brightness", "saturation", "histogram_distance", "motion", "grid"):
        _plot_curves(results, key, out / f"{key}_per_chunk.png", key.replace("_", " "), inside="distribution")
    _plot_cost(results, out / "quality_vs_flops.png")
    if videos:
        write_grid(videos, out / "grid.mp4")
    return results
