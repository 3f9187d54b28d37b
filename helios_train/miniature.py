"""`python -m helios_train miniature`: the whole Helios recipe on a laptop, on data whose future is known, measured
against ground truth.

    python -m helios_train miniature [--out checkpoints/_miniature_run] [--size full|ci] [--skip-eval]
                                     [--ablation anti_drift_off ...]

Chain (each stage through the ordinary stage code, from the previous stage's export):

    assets (clips → raw shards → VAE trained here → latent shards; helios_train/data/miniature_assets.py)
    t2v   bidirectional text-to-video on single chunks (stage=t2v: the Wan2.1-T2V analogue, trained from scratch)
    base  history injection, memory patches (initialised from the T2V patch embedding), anti-drift (stage=base)
    mid   PUPC (stage=mid)  →  ode_pairs (Mid teacher, [20,20,20] CFG 5)  →  ode (stage_3_ode)
    dmd   DMD + hierarchical GAN, teacher/critic = the Base export (stage=distilled)
    evaluate   every export on the held-out clips (python -m helios_train evaluate), plus the untrained Base

Every stage writes `<out>/<stage>/manifest.json` (export, step, losses, seconds) when it is done; a rerun skips the
stages that have one and resumes a stage that was killed from its last checkpoint (its run folder is kept), so the
chain resumes after a kill at any point. `--ablation NAME` reruns the chain from the stage it changes with the
ablation's overrides, into `<out>/ablations/NAME/`, reusing the main chain's earlier exports.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from helios_train.training.tracking import read_metrics

STAGES = ("t2v", "base", "mid", "ode_pairs", "ode", "dmd")
# Steps per stage, and the ODE-pair prompt count, per size: `full` is the README's run, `ci` the suite's.
STEPS = {"full": {"t2v": 600, "base": 600, "mid": 300, "ode_pairs": 16, "ode": 300, "dmd": 200},
         "ci": {"t2v": 150, "base": 150, "mid": 40, "ode_pairs": 4, "ode": 60, "dmd": 20}}
LORA = ["stage.trainables.lora.rank=64", "stage.trainables.lora.alpha=64"]
STAGE_OVERRIDES = {
    "t2v": ["stage=t2v", "trainer.optim.lr=5e-4"],
    "base": ["stage=base", *LORA, "trainer.optim.lr=5e-4"],
    "mid": ["stage=mid", *LORA, "trainer.optim.lr=2e-4", "trainer.optim.warmup_steps=0"],
    "ode": ["experiment=stage_3_ode", "model=miniature", "data=ode_pairs", "data.latent_height=8", "data.latent_width=8",
            "data.num_workers=0", *LORA, "trainer.optim.lr=1e-4", "stage.ema.update_after_step=0"],
    "dmd": ["stage=distilled", *LORA, "stage.dmd.critic_lora_rank=64", "stage.dmd.critic_lr=1e-4",
            "trainer.optim.lr=2e-5", "stage.ema.update_after_step=0", "stage.gan.enabled=true", "stage.gan.head_width=32",
            "stage.gan.groups=8"],
}
# name → (first stage it changes, {stage: extra overrides}); the evaluation then scores that stage's export.
ABLATIONS = {
    "anti_drift_off": ("base", {"base": ["stage.anti_drift.corrupt_history=false"]}),
    "memory_patches_frozen": ("base", {"base": ["stage.trainables.memory_patches=frozen"]}),
    "ode_skipped": ("dmd", {}),  # DMD straight from the Mid export
    "gan_off": ("dmd", {"dmd": ["stage.gan.enabled=false"]}),
    "rollout_111": ("dmd", {"dmd": ["stage.dmd.rollout_steps=[1,1,1]"]}),
}
TEACHER = {"steps": [20, 20, 20], "guidance": 5.0, "chunks": 3}


def _common(out: Path, run: str, size: str, toy_root: str, steps: int) -> list[str]:
    return [f"output_root={out}", f"run_name={run}", f"toy_root={toy_root}", "model=miniature",
            f"data.toy.miniature_size={size}", f"trainer.max_steps={steps}",
            f"trainer.checkpoint_every={max(1, steps // 4)}", "validation.every=0"]


def train_and_export(stage: str, out: Path, size: str, toy_root: str, start: str | None, extra: list[str],
                     teacher: str | None = None, ode_shards: str | None = None) -> dict:
    """Train one stage (resuming its run folder when it exists) and export it; returns its manifest."""
    from helios_train.api import train
    from helios_train.sampling.export import export

    steps = STEPS[size][stage]
    overrides = _common(out, stage, size, toy_root, steps) + STAGE_OVERRIDES[stage] + extra
    if start:
        overrides += [f"model.path={start}", "model.build_toy=false"]
    if stage == "ode":
        overrides.append(f"data.shards={ode_shards}/ode-*.tar")
    if stage == "dmd":
        overrides += [f"stage.dmd.real_score_path={teacher}", f"stage.gan.start_step={steps // 2}"]
    began = time.perf_counter()
    train(overrides)
    exported = export(out / stage, out / "exports" / stage, use_ema=stage in ("ode", "dmd"))
    losses = {k: [v[0], v[-1]] for k, v in _loss_curves(read_metrics(out / stage)).items()}
    return {"stage": stage, "export": str(exported), "steps": steps, "losses": losses, "started_from": start,
            "overrides": overrides, "seconds": round(time.perf_counter() - began, 1)}


def _loss_curves(rows: list[dict]) -> dict[str, list[float]]:
    keys = sorted({k for r in rows for k in r if k == "loss" or k.endswith("/loss")})
    return {k: [r[k] for r in rows if k in r] for k in keys}


def ode_pairs(out: Path, size: str, mid_export: str, prompt_lines: list[str]) -> dict:
    from helios_train.sampling.ode_pair_capture import make_ode_pairs

    began = time.perf_counter()
    folder = out / "ode_pairs"
    folder.mkdir(parents=True, exist_ok=True)
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(prompt_lines[: STEPS[size]["ode_pairs"]]) + "\n")
    summary = make_ode_pairs(mid_export, prompts, folder / "shards", num_chunks=TEACHER["chunks"], height=64, width=64,
                             steps=TEACHER["steps"], guidance=TEACHER["guidance"], per_shard=100, max_length=32)
    return {"stage": "ode_pairs", "export": mid_export, "shards": str(folder / "shards"), "samples": summary["samples"],
            "seconds": round(time.perf_counter() - began, 1)}


def _manifest_path(out: Path, stage: str) -> Path:
    return out / stage / "manifest.json"


def run_chain(out: Path, size: str, toy_root: str, assets, first: str = "t2v", last: str = "dmd",
              given: dict | None = None, extra: dict | None = None) -> dict[str, dict]:
    """Run the stages `first`..`last` (earlier stages' manifests in `given`), skipping those already done."""
    done = dict(given or {})
    extra = extra or {}
    train_captions = captions(assets, "train")
    for stage in STAGES[STAGES.index(first):STAGES.index(last) + 1]:
        path = _manifest_path(out, stage)
        if path.is_file():
            done[stage] = json.loads(path.read_text())
            continue
        if stage == "ode_pairs":
            manifest = ode_pairs(out, size, done["mid"]["export"], train_captions)
        else:
            start = {"t2v": None, "base": done.get("t2v", {}).get("export"), "mid": done.get("base", {}).get("export"),
                     "ode": done.get("mid", {}).get("export"),
                     "dmd": done.get("ode", done.get("mid", {})).get("export")}[stage]
            manifest = train_and_export(stage, out, size, toy_root, start, extra.get(stage, []),
                                        teacher=done.get("base", {}).get("export"),
                                        ode_shards=done.get("ode_pairs", {}).get("shards"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=2))
        done[stage] = manifest
        print(f"[helios-train] miniature: {stage} done in {manifest['seconds']} s -> {manifest['export']}", flush=True)
    return done


def captions(assets, split: str) -> list[str]:
    """The captions of a split, in clip order (the world's captions.jsonl: no video is decoded for them)."""
    rows = (assets.root / "clips" / split / "captions.jsonl").read_text().splitlines()
    return [json.loads(row)["caption"] for row in rows]


def evaluate_chain(out: Path, exports: dict[str, str], assets, size: str) -> dict:
    """Score exports {label: folder} on the held-out clips (python -m helios_train evaluate) into <out>/evaluation."""
    from helios_train.evaluation.evaluate import main as evaluate

    exports = [f"{label}={folder}" for label, folder in exports.items()]
    # Sampler steps below the official 50 / [20,20,20]: on a CPU the evaluation would otherwise outlast the chain.
    chunks, clips, steps, pyramid = (11, 8, 25, 10) if size == "full" else (4, 2, 10, 4)
    argv = [x for e in exports for x in ("--export", e)] + [
        "--data", ",".join(str(p) for p in assets.raw_heldout), "--out", str(out / "evaluation"), "--chunks",
        str(chunks), "--clips", str(clips), "--t2v-clips", "4" if size == "full" else "1", "--steps", str(steps),
        "--pyramid-steps", *[str(pyramid)] * 3]
    return evaluate(argv)


def distillation(out: Path, done: dict, assets, size: str) -> dict:
    """The few-step student's distance to the Mid teacher before distillation, after ODE and after DMD, on held-out
    captions (helios_train/evaluation/distillation.py)."""
    from helios_train.evaluation.distillation import distance_to_teacher

    prompts = captions(assets, "heldout")[: 4 if size == "full" else 2]
    students = {"before (Mid weights)": done["mid"]["export"], "after ODE": done["ode"]["export"],
                "after DMD": done["dmd"]["export"]}
    dist = distance_to_teacher(done["mid"]["export"], students, prompts, 64, 64, TEACHER["steps"], TEACHER["guidance"])
    (out / "distance_to_teacher.json").write_text(json.dumps(dist, indent=2))
    return dist


MAIN_EXPORTS = {"t2v": "T2V, no history", "base": "Base", "mid": "Mid", "dmd": "Distilled"}


def main(argv=None) -> dict:
    from helios_train.data.toy_assets import ensure_toy_assets

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="checkpoints/_miniature_run")
    ap.add_argument("--toy-root", default="checkpoints/_toy", help="assets under <toy-root>/miniature")
    ap.add_argument("--size", choices=sorted(STEPS), default="full")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--ablation", action="append", default=[], choices=sorted(ABLATIONS))
    a = ap.parse_args(argv)
    out = Path(a.out)
    began = time.perf_counter()
    assets = ensure_toy_assets(a.toy_root, spec="miniature", miniature_size=a.size)
    done = run_chain(out, a.size, a.toy_root, assets)
    results = {"chain": done, "seconds": round(time.perf_counter() - began, 1)}
    if not a.skip_eval:
        from helios_train.sampling.export import export_initial

        untrained = out / "exports" / "base_untrained"
        if not (untrained / "helios_export.json").is_file():
            export_initial(done["t2v"]["export"], untrained, "base")  # what stage=base starts from
        exports = {"Base before training": str(untrained), **{label: done[s]["export"] for s, label in MAIN_EXPORTS.items()}}
        results["evaluation"] = evaluate_chain(out, exports, assets, a.size)
        results["distillation"] = distillation(out, done, assets, a.size)
    for name in a.ablation:
        first, extra = ABLATIONS[name]
        folder = out / "ablations" / name
        given = {s: m for s, m in done.items() if STAGES.index(s) < STAGES.index(first)}
        if name == "ode_skipped":
            given.pop("ode", None)
        abl = run_chain(folder, a.size, a.toy_root, assets, first, first, given, extra)
        if not a.skip_eval:
            label = f"{MAIN_EXPORTS[first]}, {name}"
            results.setdefault("ablations", {})[name] = evaluate_chain(
                folder, {MAIN_EXPORTS[first]: done[first]["export"], label: abl[first]["export"]}, assets, a.size)
    (out / "summary.json").write_text(json.dumps({k: v for k, v in results.items() if k != "evaluation"}, indent=2))
    return results
