"""Loaded files never execute code; shard decoders never unpickle; secrets never reach written files."""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, train
from helios_train.runtime import checkpoint as ckpt
from helios_train.data.decoding import BadSample, decode_npy


class Payload:
    """Unpickling this would create a marker file: the classic pickle code-execution payload."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_loader_refuses_pickle_payload(tmp_path):
    marker = tmp_path / "pwned"
    Payload.marker = str(marker)
    torch.save({"state": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_torch(tmp_path / "evil.pt")
    assert not marker.exists()


def test_npy_member_with_pickled_objects_is_rejected(tmp_path):
    marker = tmp_path / "pwned"
    Payload.marker = str(marker)
    buf = io.BytesIO()
    np.save(buf, np.array([Payload()], dtype=object), allow_pickle=True)
    with pytest.raises(BadSample) as err:
        decode_npy(buf.getvalue(), "k.latents.npy")
    assert err.value.reason == "bad_array"
    assert not marker.exists()


def test_every_torch_load_in_the_code_is_weights_only():
    offenders = []
    for path in list((REPO / "helios_train").rglob("*.py")) + list((REPO / "data_prep").rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start() : m.start() + 300].split("\n\n")[0]  # the call and its arguments
            if "weights_only=True" not in call:
                offenders.append(f"{path.relative_to(REPO)}: {call.splitlines()[0]}")
    assert not offenders, offenders


def test_unknown_shard_members_are_never_decoded(toy_root, tmp_path):
    """A .pyd/.pickle member next to a valid sample is ignored, not unpickled."""
    import webdataset as wds

    marker = tmp_path / "pwned"
    Payload.marker = str(marker)
    src = list(wds.WebDataset(str(toy_root / "latents/latent-000000.tar"), shardshuffle=False))
    with wds.TarWriter(str(tmp_path / "evil.tar")) as sink:
        for s in src:
            s = {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
            s["pyd"] = pickle.dumps(Payload())
            s["pickle"] = pickle.dumps(Payload())
            sink.write(s)
    train(toy_root, tmp_path, [f"data.shards={tmp_path}/evil.tar", "trainer.max_steps=2", "run_name=evil",
                               "data.num_workers=0"])
    assert not marker.exists()


def test_secrets_never_written(toy_root, tmp_path, monkeypatch):
    secret = "sk-test-" + "9f3b2c1d" * 4
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    train(toy_root, tmp_path, ["trainer.max_steps=2", "trainer.checkpoint_every=2", "run_name=sec"])
    hits = []
    for path in (tmp_path / "sec").rglob("*"):
        if path.is_file() and secret.encode() in path.read_bytes():
            hits.append(str(path))
    assert not hits, hits


def test_redact_hides_credential_keys():
    from helios_train.training.tracking import redact

    out = redact({"tracker": {"api_key": "x", "project": "p"}, "hub": {"HF_TOKEN": "y"}, "lr": 1})
    assert out == {"tracker": {"api_key": "<redacted>", "project": "p"}, "hub": {"HF_TOKEN": "<redacted>"}, "lr": 1}


def test_deepspeed_checkpoint_files_load_weights_only(tmp_path):
    """DeepSpeed's own engine unpickles its ZeRO files (weights_only=False); ours loads them weights-only with its
    classes allow-listed: a ZeRO-like optimizer file loads, a planted payload is refused without running."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from helios_train.backends.weights_only_checkpoint import WeightsOnlyCheckpointEngine

    engine = WeightsOnlyCheckpointEngine()
    state = {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                      "fp32_flat_groups": [torch.ones(3)]}, "ds_version": "0.19"}
    torch.save(state, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    loaded = engine.load(str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert loaded["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.gradients
    assert torch.equal(loaded["optimizer_state_dict"]["fp32_flat_groups"][0], torch.ones(3))
    marker = tmp_path / "pwned"
    Payload.marker = str(marker)
    torch.save({"optimizer_state_dict": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        engine.load(str(tmp_path / "evil.pt"))
    assert not marker.exists()
