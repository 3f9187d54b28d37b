"""The toy pipeline check chains stages through exports and manifests."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_toy_pipeline_base_to_mid(toy_root, tmp_path):
    from helios_train.pipeline_check import main

    done = main(["--out", str(tmp_path), "--toy-root", str(toy_root), "--steps", "6"])
    assert [m["stage"] for m in done] == ["base", "mid"]
    base, mid = done
    assert mid["started_from"] == base["export"]
    assert all(m["frames"] == 65 for m in done)
    manifest = json.loads((tmp_path / "mid/manifest.json").read_text())
    assert manifest["step"] == 6 and len(manifest["config_hash"]) == 16
    # Restart the chain at Mid from the Base manifest.
    again = main(["--out", str(tmp_path / "again"), "--toy-root", str(toy_root), "--steps", "2", "--skip", "base",
                  "--from-manifest", str(tmp_path / "base/manifest.json")])
    assert [m["stage"] for m in again] == ["mid"] and again[0]["started_from"] == base["export"]
