"""Data pipeline: CLIs (videos → raw shards → latent shards, text → embeddings, stats), loader modes,
rank/worker splitting, exact resume position, bad input skipped and counted per reason."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from conftest import compose, train
from helios_train.data.toy_videos import encode_mp4, render_video
from helios_train.data.shards import ShardSpecError, expand_shards
from helios_train.data.readers import ReaderLayout, choose_layout
from helios_train.data.video_dataset import DataPosition, HistoryShardDataset, TooManyBadSamples, build_loader
from helios_train.algorithms.history import HistoryConfig


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """mp4 clips at 96×160 (the 384×640 aspect) + a toy_filter.json-style caption list."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(1)
    records = []
    for i, (n, h, w, cap) in enumerate([(132, 96, 160, "a red circle"), (110, 96, 160, "a blue square"),
                                        (105, 96, 160, "too short after cut"), (130, 96, 160, None),
                                        (130, 128, 128, "square video")]):
        frames, _ = render_video(rng, n, h, w)
        (root / f"v{i}.mp4").write_bytes(encode_mp4(frames))
        rec = {"path": f"v{i}.mp4", "cut": [0, n - 10 if i == 2 else n], "crop": [0, w, 0, h], "fps": 24.0,
               "cap": [cap] if cap else []}
        records.append(rec)
    (root / "meta.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="module")
def prepared(clip_folder, toy_root, tmp_path_factory):
    from helios_train.data.encode_latents import encode_shards
    from helios_train.data.videos_to_shards import videos_to_shards

    out = tmp_path_factory.mktemp("prepared")
    raw = videos_to_shards(clip_folder, clip_folder / "meta.json", out / "raw", height=192, width=320,
                           min_frames=99, per_shard=2, bucket=(384, 640))
    lat = encode_shards(sorted((out / "raw").glob("raw-*.tar")), out / "latents", toy_root / "model", min_frames=99,
                        text_max_length=64)
    return out, raw, lat


def test_videos_to_shards_filters_and_resizes(prepared, clip_folder):
    out, raw, _ = prepared
    assert raw["samples"] == 2
    assert raw["skipped"] == {"too_short": 1, "missing_caption": 1, "wrong_aspect": 1}
    import decord

    samples = [s for shard in sorted((out / "raw").glob("raw-*.tar")) for s in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False)]
    for s in samples:
        meta = json.loads(s["json"])
        reader = decord.VideoReader(io.BytesIO(s["mp4"]))
        assert reader[0].shape == (192, 320, 3) and len(reader) == meta["num_frames"] >= 99
    # Groups [v0 v1] [v2 v3] [v4]: the last two lose every clip, so they are not written (their manifests are).
    assert raw["shards_written"] == 1 and raw["shards_empty"] == 2 and len(samples) == 2


def _v2s(folder, captions, out):
    from helios_train.data.videos_to_shards import videos_to_shards

    return videos_to_shards(folder, captions, out, height=192, width=320, min_frames=99, per_shard=2, bucket=(384, 640))


def test_videos_to_shards_reruns_follow_the_inputs(clip_folder, tmp_path, capsys):
    """Wrong folder: exit 1, nothing written, each clip listed. Fixed: samples appear. Unchanged: kept.
    Changed clip or caption: that shard only is rebuilt. A shard without manifest: rebuilt."""
    import shutil

    from helios_train.data.videos_to_shards import main

    clips, out = tmp_path / "clips", tmp_path / "raw"
    shutil.copytree(clip_folder, clips)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["--videos", str(tmp_path / "elsewhere"), "--captions", str(clips / "meta.json"), "--out", str(out),
              "--height", "192", "--width", "320", "--min-frames", "99", "--per-shard", "2", "--bucket", "384x640"])
    assert "no sample written" in str(exit_.value.code) and "missing_file: 5" in str(exit_.value.code)
    assert not list(out.glob("*.tar")) and not list(out.glob("*.tmp"))
    listed = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["reason"] for s in listed] == ["missing_file"] * 5 and "elsewhere/v0.mp4" in listed[0]["detail"]

    first = _v2s(clips, clips / "meta.json", out)
    assert (first["samples"], first["shards_written"], first["shards_empty"]) == (2, 1, 2)
    listed = {s["item"]: s for s in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    assert {k: s["reason"] for k, s in listed.items()} == {"v2.mp4": "too_short", "v3.mp4": "missing_caption",
                                                           "v4.mp4": "wrong_aspect"}
    assert "95 frames in the cut [0, 95)" in listed["v2.mp4"]["detail"] and "v2.mp4: too_short" in " ".join(first["skipped_examples"])
    stamp = (out / "raw-000000.tar").stat().st_mtime_ns

    again = _v2s(clips, clips / "meta.json", out)
    assert (again["shards_up_to_date"], again["samples"], again["samples_in_output"]) == (3, 0, 2)
    assert again["skipped"] == first["skipped"] and (out / "raw-000000.tar").stat().st_mtime_ns == stamp

    # v3 gets a caption (its shard now holds a sample); v0 is replaced by a shorter clip (its shard is rebuilt).
    records = json.loads((clips / "meta.json").read_text())
    records[3]["cap"] = ["a caption after all"]
    records[0]["cut"] = [0, 100]
    (clips / "meta.json").write_text(json.dumps(records))
    changed = _v2s(clips, clips / "meta.json", out)
    assert (changed["shards_written"], changed["shards_up_to_date"], changed["samples_in_output"]) == (2, 1, 3)
    keys = [s["__key__"] for s in wds.WebDataset(str(out / "raw-000000.tar"), shardshuffle=False, empty_check=False)]
    assert keys == ["v0_0-100", "v1_0-110"]

    (out / "raw-000001.manifest.json").unlink()  # a shard of unknown origin is not trusted
    assert _v2s(clips, clips / "meta.json", out)["shards_written"] == 1


def test_caption_file_errors_name_the_file_and_record(tmp_path):
    from helios_train.data.videos_to_shards import read_captions
    from helios_train.runtime.prompt_file import InputError

    cases = {"bad.json": ('[{"path": "a.mp4",}]', "bad.json: not valid JSON at line 1"),
             "obj.json": ('{"path": "a.mp4"}', "expected a JSON list"),
             "rows.jsonl": ('{"path": "a.mp4", "caption": "x"}\n{oops}\n', "rows.jsonl: line 2 is not JSON"),
             "nopath.json": ('[{"caption": "x"}]', "record 0 has no 'path'"),
             "cut.json": ('[{"path": "a.mp4", "cut": [3]}]', "record 0 (a.mp4): 'cut' must be a list of 2"),
             "empty.json": ("[]", "empty.json: no record")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=re.escape(message)):
            read_captions(tmp_path / name)


def test_both_loader_modes_give_the_same_contract(prepared, toy_root):
    from helios_train.data.online_encoding import OnlineEncoder
    from helios_train.model.loading import load_text_stack, load_vae

    out, _, lat = prepared
    assert lat["samples"] == 2
    cfg_lat = compose([f"toy_root={toy_root}", f"data.shards={out}/latents/latent-*.tar", "data.latent_height=24",
                       "data.latent_width=40", "data.batch_size=1", "data.min_chunks=3"])
    cfg_raw = compose([f"toy_root={toy_root}", "data=toy_raw", f"data.shards={out}/raw/raw-*.tar",
                       "data.latent_height=24", "data.latent_width=40", "data.batch_size=1"])
    hist = HistoryConfig()
    shards_lat, shards_raw = expand_shards(cfg_lat.data.shards), expand_shards(cfg_raw.data.shards)
    b_lat = next(iter(build_loader(shards_lat, cfg_lat.data, hist, 0, DataPosition())))
    b_raw = next(iter(build_loader(shards_raw, cfg_raw.data, hist, 0, DataPosition())))
    tok, enc = load_text_stack(cfg_raw.model)
    b_raw = OnlineEncoder(load_vae(cfg_raw.model), tok, enc, hist, 64, torch.device("cpu"))(b_raw)
    for key in ("x0", "history", "target", "prompt_embeds"):
        assert b_lat[key].shape == b_raw[key].shape, key
    assert b_lat["target"].shape == (1, 4, 9, 24, 40) and b_lat["history"].shape == (1, 4, 19, 24, 40)
    assert b_lat["keys"] == b_raw["keys"] and b_lat["chunk_index"].tolist() == b_raw["chunk_index"].tolist()


def test_two_ranks_two_workers_cover_every_sample_once(toy_root):
    cfg = compose([f"toy_root={toy_root}", "data.batch_size=1", "data.num_workers=2"]).data
    shards = [str(p) for p in sorted((toy_root / "latents").glob("latent-*.tar"))]
    all_keys = [s["__key__"] for p in shards for s in wds.WebDataset(p, shardshuffle=False, empty_check=False)]
    layout = ReaderLayout(4, 2, 1)  # 2 ranks x 2 workers
    seen = []
    for rank in (0, 1):
        loader = build_loader(shards, cfg, HistoryConfig(), rank, DataPosition(layout))
        assert loader.num_workers == 2
        in_next_epoch = set()
        for batch in loader:
            if batch["epochs"][0] > 0:
                in_next_epoch.add(batch["_position"]["reader"])
            else:
                seen.extend(batch["keys"])
            if len(in_next_epoch) == 2 or len(seen) > 4 * len(all_keys):
                break
    assert sorted(seen) == sorted(all_keys)  # every sample once: disjoint and complete


def test_resumed_loader_continues_with_identical_batches(toy_root):
    cfg = compose([f"toy_root={toy_root}", "data.batch_size=2", "data.num_workers=2"]).data
    shards = [str(p) for p in sorted((toy_root / "latents").glob("latent-*.tar"))]
    pos = DataPosition(ReaderLayout(2, 1, 1))
    it = iter(build_loader(shards, cfg, HistoryConfig(), 0, pos))
    reference = []
    for i in range(12):
        batch = next(it)
        pos.update(batch) if i < 5 else batch.pop("_position")
        reference.append((batch["keys"], batch["chunk_index"].tolist(), batch["target"]))
    saved = json.loads(json.dumps(pos.state_dict()))  # what a checkpoint stores
    resumed = iter(build_loader(shards, cfg, HistoryConfig(), 0, DataPosition.from_state_dict(saved), first_batch=5))
    for keys, chunks, target in reference[5:]:
        batch = next(resumed)
        assert batch["keys"] == keys and batch["chunk_index"].tolist() == chunks
        assert torch.equal(batch["target"], target)


def _write_bad_shards(toy_root: Path, tmp: Path) -> Path:
    good = list(wds.WebDataset(str(toy_root / "latents/latent-000000.tar"), shardshuffle=False, empty_check=False))
    strip = lambda s: {k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}  # noqa: E731

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()

    bad = {
        "missing_caption": {**strip(good[0]), "__key__": "nocap", "json": b'{"num_frames": 99}'},
        "bad_latent_shape": {**strip(good[0]), "__key__": "shape", "latents.npy": npy(np.zeros((3, 4, 9, 8, 8), np.float32))},
        "too_short": {**strip(good[0]), "__key__": "short", "latents.npy": npy(np.zeros((2, 4, 9, 8, 16), np.float32))},
        "missing_member": {"__key__": "nolat", "json": good[0]["json"]},
    }
    path = tmp / "bad.tar"
    with wds.TarWriter(str(path)) as sink:
        for s in [*bad.values(), *(strip(g) for g in good)]:
            sink.write(s)
    # A truncated copy: the tar ends in the middle of a member.
    data = (toy_root / "latents/latent-000001.tar").read_bytes()
    (tmp / "truncated.tar").write_bytes(data[: len(data) // 2])
    return path


def test_each_bad_input_kind_is_skipped_and_counted(toy_root, tmp_path):
    _write_bad_shards(toy_root, tmp_path)
    cfg = compose([f"toy_root={toy_root}", "data.batch_size=1", "data.shuffle_buffer=1", "data.max_skip_fraction=0.9"]).data
    for shard, expected in ((tmp_path / "bad.tar", {"missing_caption", "bad_latent_shape", "too_short", "missing_member"}),
                            (tmp_path / "truncated.tar", {"unreadable_member"})):
        ds = HistoryShardDataset([str(shard)], cfg, HistoryConfig())
        pos = None
        for batch in ds:
            pos = batch["_position"]
            if pos["epoch"] >= 1:
                break
        assert expected <= {k for k, v in pos["skipped"].items() if v >= 1}, pos["skipped"]


def test_skip_limit_stops_naming_worst_shard(toy_root, tmp_path):
    path = _write_bad_shards(toy_root, tmp_path)
    cfg = compose([f"toy_root={toy_root}", "data.batch_size=1", "data.max_skip_fraction=0.1"]).data
    with pytest.raises(TooManyBadSamples, match="bad.tar"):
        for _ in HistoryShardDataset([str(path)], cfg, HistoryConfig()):
            pass


def test_missing_shard_and_empty_glob_fail_at_startup_naming_path(toy_root, tmp_path):
    with pytest.raises(ShardSpecError, match="nope-000003.tar"):
        expand_shards(f"{toy_root}/latents/latent-000000.tar,{tmp_path}/nope-000003.tar")
    with pytest.raises(ShardSpecError, match=r"empty-\*\.tar"):
        train(toy_root, tmp_path, [f"data.shards={tmp_path}/empty-*.tar", "trainer.max_steps=1"])
    with pytest.raises(ValueError, match=r"1 shard\(s\) cannot feed 2 rank"):
        choose_layout(1, world_size=2, grad_accum=1, num_workers=0, num_readers=None)
    with pytest.raises(ValueError, match="every reader needs a shard"):
        HistoryShardDataset([str(toy_root / "latents/latent-000000.tar")], compose([f"toy_root={toy_root}"]).data,
                            HistoryConfig(), 0, ReaderLayout(2, 2, 1))


def test_text_and_stats_tools(toy_root, tmp_path):
    from helios_train.data.encode_text import encode_text
    from helios_train.data.latent_stats import latent_stats

    (tmp_path / "p.txt").write_text("a red circle\n\nanother blue square on a gray background\n")
    s = encode_text(tmp_path / "p.txt", tmp_path / "text", toy_root / "model", per_shard=1, text_max_length=32)
    assert s["samples"] == 2 and s["shards_written"] == 2 and s["blank_lines"] == 1
    kept = encode_text(tmp_path / "p.txt", tmp_path / "text", toy_root / "model", per_shard=1, text_max_length=32)
    assert (kept["shards_written"], kept["shards_up_to_date"]) == (0, 2)
    # Another embedding length is another output: both shards are rebuilt, not silently kept.
    assert encode_text(tmp_path / "p.txt", tmp_path / "text", toy_root / "model", per_shard=1)["shards_written"] == 2
    (tmp_path / "p.txt").write_text("a red circle\n\nanother prompt\n")  # only the second shard's prompt changed
    edited = encode_text(tmp_path / "p.txt", tmp_path / "text", toy_root / "model", per_shard=1)
    assert (edited["shards_written"], edited["shards_up_to_date"]) == (1, 1)
    sample = next(iter(wds.WebDataset(str(tmp_path / "text/text-000000.tar"), shardshuffle=False, empty_check=False)))
    assert sample["__key__"] == "p_00000"
    # The shard holds what the last run asked for (default length 512), not the first run's 32 rows.
    assert np.load(io.BytesIO(sample["prompt_embed.npy"]), allow_pickle=False).shape == (512, 32)
    shards = [str(p) for p in sorted((toy_root / "latents").glob("latent-*.tar"))]
    stats = latent_stats(shards)
    ref = np.concatenate([np.moveaxis(np.load(io.BytesIO(s["latents.npy"])), 1, 0).reshape(4, -1)
                          for p in shards for s in wds.WebDataset(p, shardshuffle=False, empty_check=False)], axis=1)
    np.testing.assert_allclose(stats["mean"], ref.mean(1), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(stats["std"], ref.std(1), rtol=1e-5)
    assert stats["samples"] == 24


def test_resume_inside_a_damaged_shard_does_not_count_its_bad_member_twice(toy_root, tmp_path):
    """A truncated shard read through a shuffle buffer: its unreadable tail is met while earlier samples still
    wait in the buffer. A resume from any checkpoint replays the shard up to the saved sample; the damaged
    sample is counted exactly once per pass, whichever side of the checkpoint it fell on."""
    good = list(wds.WebDataset(str(toy_root / "latents/latent-000000.tar"), shardshuffle=False, empty_check=False))
    path = tmp_path / "tail.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(7):
            g = good[i % len(good)]
            sink.write({**{k: v for k, v in g.items() if not k.startswith("__")}, "__key__": f"s{i}"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 2 * len(good[0]["latents.npy"]) // 3 - 1024])  # cut inside the last member
    cfg = compose([f"toy_root={toy_root}", "data.batch_size=1", "data.shuffle_buffer=4",
                   "data.max_skip_fraction=0.9"]).data

    def read(positions=None):
        """Batches of epoch 0, then the position at the first batch of epoch 1 (after the whole pass)."""
        out = []
        for batch in HistoryShardDataset([str(path)], cfg, HistoryConfig(), positions=positions):
            pos = batch["_position"]
            if pos["epoch"] >= 1:
                return out, pos
            out.append((batch["keys"], pos))

    straight, after = read()
    # One cut member is one skip per pass (webdataset raises twice for it and yields the half sample after):
    # 7 read in epoch 0 with 1 skip; in epoch 1 every sample read before the first batch beyond it was a skip.
    assert len(straight) == 6
    assert after["skipped"] == {"unreadable_member": 1 + (after["read"] - 7 - 1)}
    for k in range(len(straight)):  # resume from every checkpoint position, before and after the count
        saved = json.loads(json.dumps(straight[k][1]))
        saved.pop("reader")
        resumed, resumed_after = read(positions={0: saved})
        assert [keys for keys, _ in resumed] == [keys for keys, _ in straight[k + 1:]]
        assert (resumed_after["skipped"], resumed_after["read"]) == (after["skipped"], after["read"]), k


def test_webdataset_defaults_fit_the_toy_model_and_wrong_shards_fail_before_the_model_loads(toy_root, tmp_path, capsys):
    """data=webdataset (production defaults: 4 workers) on one toy latent shard with the toy model: the latent
    channels follow the model (no override), the worker count is lowered to what one shard can feed, and the run
    trains. Shards made for another model (16-channel latents, another text width) stop the start-up naming the
    shard and sample, before any model is built or run folder written."""
    import shutil

    one = tmp_path / "one.tar"
    shutil.copy(toy_root / "latents/latent-000000.tar", one)
    result = train(toy_root, tmp_path, ["data=webdataset", f"data.shards={one}", "model=toy", "trainer.max_steps=2",
                                        "run_name=wds"])
    assert result["step"] == 2
    assert "using data.num_workers=1" in capsys.readouterr().out
    good = next(iter(wds.WebDataset(str(one), shardshuffle=False)))
    for name, member, array in (("channels", "latents.npy", np.zeros((3, 16, 9, 8, 16), np.float32)),
                                ("text", "prompt_embed.npy", np.zeros((16, 4096), np.float32))):
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        bad = tmp_path / f"{name}.tar"
        with wds.TarWriter(str(bad)) as sink:
            sink.write({**{k: v for k, v in good.items() if not k.startswith("__")}, "__key__": "other", member: buf.getvalue()})
        with pytest.raises(ValueError, match=rf"{bad.name} sample other has (16-channel latents|4096-wide prompt)"):
            train(toy_root, tmp_path, ["data=webdataset", f"data.shards={bad}", "model=toy", "run_name=bad_" + name])
        assert not (tmp_path / f"bad_{name}").exists()


def test_validation_renders_the_data_unless_told_otherwise(toy_root, tmp_path):
    """Production defaults (validation.prompts/height/width null): the first shard's captions at the data's
    resolution; validation.prompts_file lines instead; a bad prompts file names itself at start-up."""
    from helios_train.training.run_setup import ConfigError, check_data_fits_model, resolve_validation_defaults

    shard = str(toy_root / "latents/latent-000003.tar")
    unset = ["data=webdataset", f"data.shards={shard}", "model=toy", "validation.every=5", "validation.prompts=null",
             "validation.height=null", "validation.width=null", "validation.num_data_prompts=2"]  # (toy preset: 1)

    def resolved(extra=()):
        cfg = compose([f"toy_root={toy_root}", *unset, *extra])
        check_data_fits_model(cfg, [shard])
        resolve_validation_defaults(cfg, [shard])
        return cfg.validation

    first_two = [json.loads(s["json"])["caption"] for s, _ in zip(wds.WebDataset(shard, shardshuffle=False), range(2))]
    v = resolved()
    assert list(v.prompts) == first_two and (v.height, v.width) == (64, 128)  # toy latents 8×16 × VAE stride 8
    (tmp_path / "val.txt").write_text("a green triangle spins\n\na white dot falls\n")
    v = resolved([f"validation.prompts_file={tmp_path / 'val.txt'}", "validation.height=128", "validation.width=256"])
    assert list(v.prompts) == ["a green triangle spins", "a white dot falls"] and (v.height, v.width) == (128, 256)
    (tmp_path / "none.txt").write_text("\n")
    with pytest.raises(ConfigError, match="validation.prompts_file .*none.txt: no prompt"):
        resolved([f"validation.prompts_file={tmp_path / 'none.txt'}"])


def test_resume_from_the_last_batch_of_an_epoch_continues_into_the_next(toy_root):
    """A checkpoint taken on an epoch's last batch (CI met it: a SIGTERM landed on step 24 of the toy's one
    reader) resumes with the next epoch's first batch, not with "read no sample in a whole epoch": the
    resumed pass over the finished epoch reads nothing new, and that is not an empty epoch."""
    cfg = compose([f"toy_root={toy_root}", "data.batch_size=1", "data.num_workers=0"]).data
    shards = [str(p) for p in sorted((toy_root / "latents").glob("latent-*.tar"))]

    def batches(positions=None):
        for batch in HistoryShardDataset(shards, cfg, HistoryConfig(), positions=positions):
            yield batch["keys"], batch.pop("_position")

    straight = batches()
    epoch0 = []
    for keys, pos in straight:
        if pos["epoch"] == 1:
            first_of_epoch1 = keys
            break
        epoch0.append((keys, pos))
    saved = json.loads(json.dumps(epoch0[-1][1]))  # the last batch of epoch 0, as a checkpoint stores it
    saved.pop("reader")
    resumed = batches(positions={0: saved})
    keys, pos = next(resumed)
    assert (keys, pos["epoch"]) == (first_of_epoch1, 1)
    assert next(resumed)[0] == next(straight)[0]
