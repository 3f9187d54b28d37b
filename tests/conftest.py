"""Shared fixtures: one toy asset build per test session, and in-process training runs."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = str(REPO / "conf")


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """Toy checkpoint + raw and latent shards, built once for the whole session."""
    from helios_train.data.toy_assets import ensure_toy_assets

    root = tmp_path_factory.mktemp("toy")
    ensure_toy_assets(root, seed=0)
    return root


def compose(overrides: list[str]):
    """Compose the real config tree the way `python -m helios_train` does (helios_train.config.compose)."""
    from helios_train.config import compose as compose_config

    return compose_config(overrides)


def train(toy_root: Path, out: Path, overrides: list[str]) -> dict:
    """Run a training job in-process on the session's toy assets; returns the trainer's result."""
    from helios_train.api import run

    # Validation renders videos (seconds each): off unless a test asks for it in `overrides`.
    cfg = compose([f"toy_root={toy_root}", f"output_root={out}", "tracker.mode=offline", "validation.every=0",
                   *overrides])
    return run(cfg)


@pytest.fixture(scope="session")
def base_export(toy_root, tmp_path_factory) -> Path:
    """A 2-step toy Base run exported: the DMD tests' generator and teacher/critic base."""
    from helios_train.sampling.export import export

    out = tmp_path_factory.mktemp("dmd_base")
    train(toy_root, out, ["trainer.max_steps=2", "trainer.checkpoint_every=2", "data.num_workers=0", "run_name=b"])
    return export(out / "b", out / "export")


def run_pooled(configs: list[list[str]], out: Path, timeout: float = 900, nproc: int = 2) -> tuple[list[dict], float]:
    """Several training configs one after the other in ONE `nproc`-process torchrun launch (tests/matrix_worker.py:
    one process group, a Trainer each); returns matrix_worker's per-config results and the launch's seconds."""
    import json
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    results = out / "results.json"
    t0 = time.time()
    proc = subprocess.run(["torchrun", "--standalone", f"--nproc_per_node={nproc}", str(REPO / "tests" / "matrix_worker.py"),
                           str(results), json.dumps(configs)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(results.read_text()), time.time() - t0


def wait_until(ready, proc, what: str, timeout: float = 240) -> None:
    """Poll `ready()` while the subprocess `proc` runs; fail with its output if it ends first, kill it on timeout."""
    end = time.time() + timeout
    while time.time() < end:
        if ready():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc={proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"timeout waiting for {what}")
