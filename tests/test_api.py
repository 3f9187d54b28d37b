"""helios-train from Python without Hydra's command line (helios_train/api.py): `train` takes the Config dataclass
the command line would compose, a hand-built one, or overrides, and runs the same code as `python -m helios_train`;
`infer` renders a trained run."""
from __future__ import annotations

import json

import pytest

import helios_train
from helios_train.config import BaseStageConfig, Config, DataConfig, ModelConfig, TrackerConfig, ValidationConfig, load
from helios_train.training.tracking import read_metrics


def test_train_a_loaded_dataclass_then_infer_from_python(toy_root, tmp_path):
    config = load(["stage=base", f"toy_root={toy_root}", f"output_root={tmp_path}", "validation.every=0",
                   "data.num_workers=0", "trainer.max_steps=2", "trainer.checkpoint_every=2"])
    assert type(config).__name__ == "Config" and type(config.stage) is BaseStageConfig
    config.trainer.optim.lr = 2e-4  # a dataclass field, changed in Python
    result = helios_train.train(config)
    assert result["step"] == 2 and result["lr"] == pytest.approx(2e-4)
    run = tmp_path / config.run_name
    assert [m["step"] for m in read_metrics(run)] == [1, 2]
    videos = helios_train.infer(run, "a red circle moves", num_frames=33, height=64, width=128, steps=2,
                                out=str(tmp_path / "videos"))
    assert [v.name for v in videos] == ["000_a_red_circle_moves.mp4"] and videos[0].stat().st_size > 0
    settings = json.loads(videos[0].with_suffix(".json").read_text())
    assert (settings["variant"], settings["frames"], settings["num_inference_steps"]) == ("base", 33, 2)


def test_a_hand_built_config_trains_like_the_composed_one(toy_root, tmp_path):
    """The same run from a Config written field by field and from the command line's composition: same losses."""
    data = DataConfig(name="toy", shards=f"{toy_root}/latents/latent-{{000000..000007}}.tar", latent_height=8,
                      latent_width=16, shuffle_buffer=8)
    config = Config(stage=BaseStageConfig(), model=ModelConfig(name="toy", path=str(toy_root / "model")), data=data,
                    tracker=TrackerConfig(mode="offline"), validation=ValidationConfig(every=0), run_name="by_hand",
                    output_root=str(tmp_path))
    config.stage.trainables.lora.rank = 8
    config.trainer.max_steps = config.trainer.checkpoint_every = 2
    config.trainer.optim.lr = 1e-3
    helios_train.train(config)
    helios_train.train([f"toy_root={toy_root}", f"output_root={tmp_path}", "run_name=composed", "validation.every=0",
                        "trainer.max_steps=2", "trainer.checkpoint_every=2", "data.num_workers=0",
                        "stage.trainables.lora.rank=8"])
    by_hand, composed = read_metrics(tmp_path / "by_hand"), read_metrics(tmp_path / "composed")
    assert [m["loss"] for m in by_hand] == pytest.approx([m["loss"] for m in composed], rel=1e-6)


def test_train_refuses_what_is_not_a_config():
    with pytest.raises(TypeError, match="helios_train.config.Config"):
        helios_train.train({"stage": "base"})
