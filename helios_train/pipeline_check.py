"""One-command toy pipeline check: each stage starts from the previous stage's export.

    python -m helios_train.pipeline_check [--out checkpoints/_pipeline] [--steps 20] [--from-manifest M] [--skip base]

Runs Base → export → Mid → export on the toy data, renders one mp4 per variant with diffusers'
pipelines, and prints a summary table. Hand-off between stages is a small manifest
(`<out>/<stage>/manifest.json`: export path, config hash, step, final loss) so a stage can be
re-run or started from any manifest. The Distilled stages (ODE pairs, ODE regression, DMD) join
this chain when they land; until then the check ends at Mid and says so.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from helios_train.tracking import read_metrics

STAGES = ("base", "mid")
NOT_YET = ("ode_pairs", "distilled")


def run_stage(stage: str, out: Path, start_from: str | None, steps: int, toy_root: str) -> dict:
    from helios_train.__main__ import CONF_DIR, run
    from helios_train.export import export
    from helios_train.infer import generate, load_pipeline
    from helios_train.variants import DEFAULTS, SamplerSettings

    from hydra import compose, initialize_config_dir

    overrides = [f"stage={stage}", f"output_root={out}", f"toy_root={toy_root}", f"run_name={stage}",
                 f"trainer.max_steps={steps}", f"trainer.checkpoint_every={steps}", "validation.every=0",
                 "trainer.optim.warmup_steps=0", "stage.trainables.lora.rank=8", "trainer.optim.lr=1e-3"]
    if start_from:
        overrides += [f"model.path={start_from}", "model.build_toy=false"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    run(cfg)
    exported = export(out / stage, out / f"{stage}_export")
    pipe, variant = load_pipeline(exported)
    settings = SamplerSettings(**DEFAULTS[variant].__dict__)
    settings.num_inference_steps, settings.pyramid_steps = 4, [2, 2, 2]
    frames = generate(pipe, variant, "a red circle moves left to right on a dark blue background", settings,
                      66, 64, 128, seed=0)
    from helios_train.infer import write_mp4

    video = out / f"{stage}.mp4"
    write_mp4(frames, video)
    hist = read_metrics(out / stage)
    export_manifest = json.loads((exported / "helios_export.json").read_text())
    manifest = {"stage": stage, "export": str(exported), "config_hash": export_manifest["config_hash"],
                "step": export_manifest["step"], "first_loss": hist[0]["loss"], "final_loss": hist[-1]["loss"],
                "video": str(video), "frames": int(frames.shape[0]), "started_from": start_from}
    (out / stage / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="checkpoints/_pipeline")
    ap.add_argument("--toy-root", default="checkpoints/_toy")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip", action="append", default=[], choices=STAGES, help="stages to skip")
    ap.add_argument("--from-manifest", help="start the first non-skipped stage from this manifest's export")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from data_prep.toy_data import ensure_toy_assets

    ensure_toy_assets(Path(a.toy_root))
    start = json.loads(Path(a.from_manifest).read_text())["export"] if a.from_manifest else None
    done = []
    for stage in STAGES:
        if stage in a.skip:
            continue
        manifest = run_stage(stage, out, start, a.steps, a.toy_root)
        start = manifest["export"]
        done.append(manifest)
    print(f"\n{'stage':<8} {'steps':>5} {'loss first→final':>20} {'frames':>6}  video")
    for m in done:
        print(f"{m['stage']:<8} {m['step']:>5} {m['first_loss']:>9.4f} → {m['final_loss']:<8.4f} {m['frames']:>6}  {m['video']}")
    print(f"not yet in the chain (their stages have not landed): {', '.join(NOT_YET)}")
    return done


if __name__ == "__main__":
    main()
