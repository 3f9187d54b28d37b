"""helios_train/data/shard_writer.py: a shard is complete or absent, kept only while its manifest matches, and a
run that produces nothing fails naming why."""
from __future__ import annotations

import json

import pytest
import webdataset as wds

from helios_train.data.shard_writer import NoSamplesWritten, ShardWriter


def _build(out, inputs, keys, fail_after=None, options=None):
    writer = ShardWriter(out, "tool", options or {"size": 1})
    if not writer.up_to_date("s-000.tar", inputs):
        with writer.shard("s-000.tar", inputs) as sink:
            for i, key in enumerate(keys):
                if i == fail_after:
                    raise KeyboardInterrupt  # an interrupted run
                sink.write({"__key__": key, "txt": key.encode()})
            sink.skip("input-x", "too_short", "3 frames")
    return writer.finish()


def _keys(path):
    return [s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)]


def test_an_interrupted_shard_leaves_nothing_that_a_rerun_would_trust(tmp_path):
    assert _build(tmp_path, ["a"], ["k0", "k1"])["shards_written"] == 1
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path, ["b"], ["k2", "k3"], fail_after=1)
    assert not list(tmp_path.glob("*.tmp"))
    assert not (tmp_path / "s-000.manifest.json").exists()  # the old shard no longer counts as built ...
    assert _build(tmp_path, ["a"], ["k0", "k1"])["shards_written"] == 1  # ... so even its own inputs rebuild it
    summary = _build(tmp_path, ["b"], ["k2", "k3"])
    assert summary["shards_written"] == 1 and _keys(tmp_path / "s-000.tar") == ["k2", "k3"]
    manifest = json.loads((tmp_path / "s-000.manifest.json").read_text())
    assert manifest["keys"] == ["k2", "k3"] and manifest["skipped"][0]["reason"] == "too_short"


def test_a_truncated_or_replaced_shard_is_rebuilt(tmp_path):
    _build(tmp_path, ["a"], ["k0", "k1"])
    assert _build(tmp_path, ["a"], ["k0", "k1"])["shards_up_to_date"] == 1
    shard = tmp_path / "s-000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert _build(tmp_path, ["a"], ["k0", "k1"])["shards_written"] == 1
    assert _build(tmp_path, ["a"], ["k0", "k1"], options={"size": 2})["shards_written"] == 1  # another option


def test_no_sample_at_all_fails_naming_the_reasons_and_the_list(tmp_path):
    with pytest.raises(NoSamplesWritten, match=r"no sample written .*too_short: 1.*skipped\.jsonl"):
        _build(tmp_path, ["a"], [])
    assert not (tmp_path / "s-000.tar").exists()
    assert json.loads((tmp_path / "skipped.jsonl").read_text())["item"] == "input-x"
    # The same inputs again: the manifest says "nothing to write", and the run still fails.
    with pytest.raises(NoSamplesWritten):
        _build(tmp_path, ["a"], [])
