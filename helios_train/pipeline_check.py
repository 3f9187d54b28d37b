"""One-command toy pipeline check: the whole Helios recipe, each stage starting from the previous one's export.

    python -m helios_train pipeline-check [--out checkpoints/_pipeline] [--steps 20] [--skip base ...]
                                          [--from-manifest M] [--base-manifest B]

Chain (toy data, CPU, a few minutes):

    base ──export──▶ mid ──export──▶ ode_pairs (Mid teacher, [20,20,20] CFG 5) ──▶ ode (stage_3_ode)
      │                                                                            │ export
      └──────────── real score (teacher + critic) ─────────────▶ distilled (DMD) ◀─┘

Hand-off between stages is a small manifest (`<out>/<stage>/manifest.json`: export path, config hash,
step, first/final loss, video) so any stage can be re-run or started from any manifest:
`--skip base --skip mid --from-manifest <out>/mid/manifest.json` starts at ODE pairs. The DMD stage
also needs the Base export (its teacher/critic): `--base-manifest`, default `<out>/base/manifest.json`.

Ends with one mp4 per trained variant, a summary table, and the distillation check: the latent
distance of the few-step student ([2, 2, 2], no guidance) to the Mid teacher's [20, 20, 20] CFG samples
on fixed prompts and seeds — before distillation (the Mid weights with the few-step sampler), after
the ODE phase and after DMD. It passes when the ODE phase brought the one-jump ([1,1,1]) and the
two-step ([2,2,2]) students at least `--max-ratio` (0.8) of the way: distance after ODE ≤ 0.8 × distance
before, on both schedules; otherwise the command exits with status 1 and says which schedule failed.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from helios_train.evaluation.distillation import distance_to_teacher
from helios_train.training.tracking import read_metrics

STAGES = ("base", "mid", "ode_pairs", "ode", "distilled")
# The prompts of the ODE pairs and of the distance check (the toy videos' vocabulary).
PROMPTS = ["a red circle moves left to right on a dark blue background",
           "a green square moves up and down on a black background",
           "a yellow circle grows on a gray background",
           "a blue square moves diagonally on a white background"]
VIDEO_PROMPT = PROMPTS[0]
TEACHER_STEPS = [20, 20, 20]
TEACHER_GUIDANCE = 5.0
HEIGHT, WIDTH = 64, 128


def _train(out: Path, stage_dir: str, overrides: list[str]):
    from helios_train.api import train

    train([f"output_root={out}", f"run_name={stage_dir}", "validation.every=0", *overrides])


def _toy_overrides(steps: int, toy_root: str) -> list[str]:
    return [f"toy_root={toy_root}", f"trainer.max_steps={steps}", f"trainer.checkpoint_every={steps}",
            "trainer.optim.warmup_steps=0", "stage.trainables.lora.rank=8", "stage.trainables.lora.alpha=8",
            "trainer.optim.lr=1e-3"]


def _render(export: Path, variant: str, path: Path) -> int:
    from helios_train.sampling.infer import generate, load_pipeline, write_mp4
    from helios_train.model.variants import DEFAULTS, SamplerSettings

    pipe, variant = load_pipeline(export, variant)
    settings = SamplerSettings(**DEFAULTS[variant].__dict__)
    if variant == "base":
        settings.num_inference_steps = 4  # toy: the video proves the path, not the quality
    elif variant == "mid":
        settings.pyramid_steps = [2, 2, 2]
    frames = generate(pipe, variant, VIDEO_PROMPT, settings, 66, HEIGHT, WIDTH, seed=0)
    write_mp4(frames, path)
    return int(frames.shape[0])


def _losses(hist: list[dict]) -> dict[str, list[float]]:
    """First and final value of every loss the stage logged ("loss"; DMD: "generator/loss", "critic/loss")."""
    out = {}
    for key in sorted({k for row in hist for k in row if k == "loss" or k.endswith("/loss")}):
        values = [row[key] for row in hist if key in row]
        out[key] = [values[0], values[-1]]
    return out


def _manifest(out: Path, stage: str, exported: Path, started_from: str | None, **extra) -> dict:
    hist = read_metrics(out / stage)
    export_manifest = json.loads((exported / "helios_export.json").read_text())
    m = {"stage": stage, "export": str(exported), "config_hash": export_manifest["config_hash"],
         "step": export_manifest["step"], "losses": _losses(hist), "started_from": started_from, **extra}
    variant = export_manifest["variant"]
    video = out / f"{stage}.mp4"
    m.update(video=str(video), frames=_render(exported, variant, video), variant=variant)
    return m


def run_stage(stage: str, out: Path, start_from: str | None, steps: int, toy_root: str,
              manifests: dict[str, dict], ode_steps: int | None = None) -> dict:
    from helios_train.sampling.export import export

    model = [f"model.path={start_from}", "model.build_toy=false"] if start_from else []
    if stage in ("base", "mid"):
        _train(out, stage, [f"stage={stage}", *_toy_overrides(steps, toy_root), *model])
        return _manifest(out, stage, export(out / stage, out / f"{stage}_export"), start_from)
    if stage == "ode_pairs":
        from helios_train.sampling.ode_pair_capture import make_ode_pairs

        if not start_from:
            raise ValueError("ode_pairs needs a Mid export: run mid first or give --from-manifest <mid manifest>")
        prompts = out / "ode_pairs" / "prompts.txt"
        prompts.parent.mkdir(parents=True, exist_ok=True)
        prompts.write_text("\n".join(PROMPTS) + "\n")
        summary = make_ode_pairs(start_from, prompts, out / "ode_pairs" / "shards", num_chunks=3, height=HEIGHT,
                                 width=WIDTH, steps=TEACHER_STEPS, guidance=TEACHER_GUIDANCE, per_shard=len(PROMPTS))
        # The ODE stage starts from the teacher's weights: the hand-off export is the Mid export.
        return {"stage": stage, "export": start_from, "shards": str(out / "ode_pairs" / "shards"),
                "samples": summary["samples"], "started_from": start_from, "step": 0}
    if stage == "ode":
        shards = manifests.get("ode_pairs", {}).get("shards") or str(out / "ode_pairs" / "shards")
        _train(out, stage, ["experiment=stage_3_ode", "model=toy", "data=toy_ode", f"data.shards={shards}/ode-*.tar",
                            "stage.ema.update_after_step=0", *_toy_overrides(ode_steps or steps, toy_root), *model])
        return _manifest(out, stage, export(out / stage, out / f"{stage}_export"), start_from)
    if stage == "distilled":
        base = manifests.get("base")
        if base is None:
            raise ValueError("distilled needs the Base export as teacher/critic: run base or give --base-manifest")
        # DMD + hierarchical GAN (official gan version), the GAN switching on half-way through.
        gan = ["stage.gan.enabled=true", f"stage.gan.start_step={steps // 2}", "stage.gan.head_width=32",
               "stage.gan.groups=8"]
        _train(out, stage, ["stage=distilled", f"stage.dmd.real_score_path={base['export']}", *gan,
                            "stage.dmd.critic_lora_rank=8", "stage.dmd.critic_lr=1e-4", "stage.ema.update_after_step=0",
                            *_toy_overrides(steps, toy_root), "trainer.optim.lr=1e-4", *model])
        return _manifest(out, stage, export(out / stage, out / f"{stage}_export"), start_from)
    raise ValueError(f"unknown stage {stage!r}")


# The pass criterion's schedules: the ones the ODE pairs train directly. The amplified first-chunk schedule
# is reported, not judged (on the toy it moves away, see README "pipeline check").
JUDGED = ("[1,1,1]", "[2,2,2]")


def distillation_failures(dist: dict[str, dict[str, float]], max_ratio: float) -> list[str]:
    """The pass/fail rule: for each judged schedule, after-ODE distance ≤ max_ratio × before-distance."""
    failures = []
    for name in JUDGED:
        before, after = dist[name]["before (Mid weights)"], dist[name]["after ODE"]
        if not after <= max_ratio * before:
            failures.append(f"{name}: after ODE {after:.4f} > {max_ratio} x before {before:.4f}")
    return failures


class DistillationCheckFailed(RuntimeError):
    pass


def _manifests(out: Path, base_manifest: str | None, from_manifest: str | None) -> dict[str, dict]:
    """Earlier runs' manifests in this --out (for stages skipped now), then the ones given on the command line."""
    manifests: dict[str, dict] = {}
    for stage in STAGES:
        path = out / stage / "manifest.json"
        if path.is_file():
            manifests[stage] = json.loads(path.read_text())
    if base_manifest:
        manifests["base"] = json.loads(Path(base_manifest).read_text())
    if from_manifest:
        given = json.loads(Path(from_manifest).read_text())
        manifests[given["stage"]] = given
    return manifests


def _print_summary(done: list[dict]) -> None:
    print(f"\n{'stage':<10} {'steps':>5} {'time s':>7}  {'loss first → final':<40} {'frames':>6}  video / output")
    for m in done:
        if "losses" in m:
            losses = ", ".join(f"{k} {a:.4f} → {b:.4f}" for k, (a, b) in m["losses"].items())
            print(f"{m['stage']:<10} {m['step']:>5} {m['seconds']:>7.1f}  {losses:<40} {m['frames']:>6}  {m['video']}")
        else:
            print(f"{m['stage']:<10} {'':>5} {m['seconds']:>7.1f}  {m['samples']} ODE-pair samples → {m['shards']}")


def _distance_check(out: Path, manifests: dict, done: list[dict], max_ratio: float) -> None:
    """The few-step student's latent distance to the Mid teacher before / after ODE / after DMD; fails (exit 1)
    when the ODE phase did not bring it `max_ratio` of the way on the judged schedules."""
    students = {k: manifests[s]["export"] for k, s in (("before (Mid weights)", "mid"), ("after ODE", "ode"),
                                                      ("after DMD", "distilled")) if s in manifests}
    if "mid" not in manifests or len(students) < 2:
        return
    dist = distance_to_teacher(manifests["mid"]["export"], students, PROMPTS, HEIGHT, WIDTH, TEACHER_STEPS,
                               TEACHER_GUIDANCE)
    print("\nfew-step student (no CFG) vs Mid teacher ([20,20,20], CFG 5): RMS latent distance, one chunk")
    print(f"  {'student':<22}" + "".join(f"{name:>20}" for name in dist))
    for student in students:
        print(f"  {student:<22}" + "".join(f"{dist[name][student]:>20.4f}" for name in dist))
    (out / "distance_to_teacher.json").write_text(json.dumps(dist, indent=2))
    for m in done:
        m["distance_to_teacher"] = dist
    if "after ODE" in students:
        failures = distillation_failures(dist, max_ratio)
        if failures:
            raise DistillationCheckFailed("distillation check FAILED: " + "; ".join(failures))
        print(f"distillation check passed: after ODE <= {max_ratio} x before on {', '.join(JUDGED)}")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="checkpoints/_pipeline")
    ap.add_argument("--toy-root", default="checkpoints/_toy")
    ap.add_argument("--steps", type=int, default=20, help="training steps per stage")
    ap.add_argument("--ode-steps", type=int, default=100,
                    help="ODE-regression steps (cheap: one forward per level; the distance check needs ~100 on the toy)")
    ap.add_argument("--skip", action="append", default=[], choices=STAGES, help="stages to skip (repeatable)")
    ap.add_argument("--from-manifest", help="start the first non-skipped stage from this manifest's export")
    ap.add_argument("--base-manifest", help="Base manifest for the DMD teacher/critic (default <out>/base/manifest.json)")
    ap.add_argument("--no-distance", action="store_true", help="skip the distance-to-teacher check")
    ap.add_argument("--max-ratio", type=float, default=0.8,
                    help="pass when distance after ODE <= this x distance before, on [1,1,1] and [2,2,2]")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from helios_train.data.toy_assets import ensure_toy_assets

    ensure_toy_assets(Path(a.toy_root))
    manifests = _manifests(out, a.base_manifest, a.from_manifest)
    start = json.loads(Path(a.from_manifest).read_text())["export"] if a.from_manifest else None
    done = []
    for stage in (s for s in STAGES if s not in a.skip):
        began = time.perf_counter()
        manifest = run_stage(stage, out, start, a.steps, a.toy_root, manifests, a.ode_steps)
        manifest["seconds"] = round(time.perf_counter() - began, 1)
        (out / stage).mkdir(parents=True, exist_ok=True)
        (out / stage / "manifest.json").write_text(json.dumps(manifest, indent=2))
        manifests[stage] = manifest
        start = manifest["export"]
        done.append(manifest)
    _print_summary(done)
    if not a.no_distance:
        _distance_check(out, manifests, done, a.max_ratio)
    return done


if __name__ == "__main__":
    try:
        main()
    except DistillationCheckFailed as failed:
        raise SystemExit(f"[helios-train] {failed}") from None
