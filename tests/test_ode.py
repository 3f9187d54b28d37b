"""ODE pairs (teacher trajectories at the distilled timesteps) and the ODE-regression phase (official
tools/offload_data/get_ode-pairs.py, `_ode_regression_loss` in helios/utils/utils_helios_post.py)."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from conftest import compose, train
from helios_train.algorithms.history import HistoryConfig
from helios_train.algorithms.sigma_table import sigma_of
from helios_train.sampling.ode_trajectory import recording_scheduler
from helios_train.algorithms.ode_regression import OdeConfig, ode_regression_loss
from helios_train.algorithms.timesteps import calculate_mu
from helios_train.training.tracking import read_metrics

# official get_ode-pairs.py `selected_target_timesteps`: the student's timesteps at 384×640 (level-0 latents 12×20), amplified chunk 0 and later chunks
CHUNK0 = [[998.53, 902.22, 833.96, 783.07], [742.82, 640.00, 547.19, 462.995], [385.41, 328.62, 253.99, 151.53]]
LATER = [[998.53, 833.96], [742.82, 547.19], [385.41, 253.99]]


def drive(scheduler, chunks: int, level0_hw=(12, 20), teacher_steps=20, mu_from_previous=True):
    """Call the recorder the way HeliosPyramidPipeline does (μ from the previous level's tokens)."""
    for _ in range(chunks):
        for k in range(3):
            h, w = level0_hw[0] * 2**k, level0_hw[1] * 2**k
            prev = 9 * (h // 2 if k else h) * (w // 2 if k else w) // 4
            scheduler.set_timesteps(teacher_steps, k, mu=calculate_mu(prev))
            x = torch.randn(1, 4, 9, h, w)
            for t in scheduler.timesteps:
                x = scheduler.step(0.1 * torch.randn_like(x), t, x, return_dict=False)[0]
    return scheduler.chunks


def test_teacher_schedule_passes_through_the_student_timesteps():
    chunks = drive(recording_scheduler(), chunks=2)
    for c, expected in ((0, CHUNK0), (1, LATER)):
        for k in range(3):
            got = chunks[c][k]["timesteps"].tolist()
            assert got == pytest.approx(expected[k], abs=0.02), (c, k, got)
            assert chunks[c][k]["latents"].shape[0] == len(expected[k]) + 1  # + the level's end state
    # The pipeline's own μ (previous level's tokens) gives other timesteps for levels 1-2 (diffusers / official
    # pipeline_helios_diffusers.py stage2_sample).
    previous = drive(recording_scheduler(mu_from="previous"), chunks=1)
    assert previous[0][1]["timesteps"][1] != pytest.approx(CHUNK0[1][1], abs=0.5)
    # σ on the level-local table (the σ_local values of the distilled sampler's timesteps at 384×640)
    mu0, mu2 = calculate_mu(9 * 12 * 20 // 4), calculate_mu(9 * 48 * 80 // 4)
    assert sigma_of(torch.tensor([998.53, 833.96]), 0, mu0).tolist() == pytest.approx([0.998, 0.354], abs=1e-3)
    assert sigma_of(torch.tensor([385.41, 253.99]), 2, mu2).tolist() == pytest.approx([0.9995, 0.657], abs=1e-3)


def test_ode_sigma_is_the_nearest_entry_of_the_levels_shifted_table():
    """Official `_ode_regression_loss`: σ = the level's sigmas_per_stage shifted by μ of x_t's resolution, at
    argmin |t_min + σ·(t_max − t_min) − t| (convert_flow_pred_to_x0) — not the exact inverse of t."""
    from diffusers import HeliosDMDScheduler

    from helios_train.algorithms.sigma_table import PYRAMID

    sch = HeliosDMDScheduler(**PYRAMID)
    for k, hw in enumerate([(12, 20), (24, 40), (48, 80)]):
        mu = calculate_mu(9 * hw[0] * hw[1] // 4)
        stage_t = sch.timesteps_per_stage[k].double().numpy()
        table = sch.sigmas_per_stage[k].double().numpy()
        table = mu * table / (1 + (mu - 1) * table)  # official apply_schedule_shift, linear
        table_t = stage_t.min() + table * (stage_t.max() - stage_t.min())
        t = np.linspace(stage_t.min() + 0.3, stage_t.max() - 0.3, 97)
        expected = table[np.abs(table_t[None] - t[:, None]).argmin(1)]
        got = sigma_of(torch.tensor(t), k, mu, sch).numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
        exact = (t - stage_t.min()) / (stage_t.max() - stage_t.min())
        assert np.abs(got - exact).max() > 1e-5  # the old exact inverse would fail this test


def test_teacher_still_ends_where_the_unrecorded_teacher_ends():
    """Inserting the student's timesteps refines the teacher's ODE path, it must not change where it goes:
    with a constant velocity field the UniPC end state is exact whatever the step sizes."""
    torch.manual_seed(0)
    v = torch.randn(1, 4, 9, 12, 20)
    rec = recording_scheduler()
    rec.set_timesteps(20, 0, mu=calculate_mu(9 * 12 * 20 // 4))
    x = start = torch.randn(1, 4, 9, 12, 20)
    sig = rec.sigmas
    for t in rec.timesteps:
        x = rec.step(v, t, x, return_dict=False)[0]
    expected = start - (sig[0] - sig[-1]) * v
    assert torch.allclose(rec.chunks[0][0]["latents"][-1], expected, atol=1e-4)


@pytest.fixture(scope="module")
def ode_shards(toy_root, tmp_path_factory):
    from helios_train.sampling.ode_pair_capture import make_ode_pairs

    out = tmp_path_factory.mktemp("ode")
    prompts = out / "prompts.txt"
    prompts.write_text("a red circle moves left to right\n\na blue square bounces\n")
    summary = make_ode_pairs(toy_root / "model", prompts, out / "shards", num_chunks=3, height=64, width=128,
                             steps=(4, 4, 4), per_shard=2)
    return out / "shards", summary


def test_ode_pair_shards_hold_the_teacher_trajectory(ode_shards, toy_root):
    shards, summary = ode_shards
    assert (summary["shards_written"], summary["shards_up_to_date"], summary["samples"]) == (1, 0, 2)
    names = tarfile.open(next(shards.glob("*.tar"))).getnames()
    assert not [n for n in names if n.endswith((".pyd", ".pickle", ".pth"))]
    assert "prompts_00002.c2_s2.latents.npy" in names  # line numbers are kept as keys (empty line skipped)

    from helios_train.data.samples import ode_sample

    raw = {"__key__": "prompts_00000"}
    with tarfile.open(next(shards.glob("*.tar"))) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            if key == "prompts_00000":
                raw[ext] = tar.extractfile(m).read()
    cfg = compose([f"toy_root={toy_root}", "data=toy_ode"])
    sample = ode_sample(raw, cfg.data, HistoryConfig(), 0)
    assert sample["ode_c0_s0_latents"].shape == (5, 4, 9, 2, 4)  # 4 states + end, level 0 = latents / 4
    assert sample["ode_c1_s2_latents"].shape == (3, 4, 9, 8, 16)
    assert sample["ode_c0_s1_timesteps"].tolist()[0] > sample["ode_c0_s1_timesteps"].tolist()[1]
    # history source = every chunk's final clean latents (level 2's end state)
    assert torch.equal(sample["ode_clean"][2], sample["ode_c2_s2_latents"][-1])
    # a wrong level shape is a counted bad sample, not a crash later in training
    from helios_train.data.decoding import BadSample

    bad = dict(raw)
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 4, 9, 8, 8), np.float32))
    bad["c1_s2.latents.npy"] = buf.getvalue()
    with pytest.raises(BadSample, match=r"c1_s2.latents.npy has shape \[3, 4, 9, 8, 8\]"):
        ode_sample(bad, cfg.data, HistoryConfig(), 0)


def _fake_batch(chunks=4, b=1, c=4, h=8, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for ci in range(chunks):
        for k in range(3):
            n = 4 if ci == 0 else 2
            s = 2 ** (2 - k)
            batch[f"ode_c{ci}_s{k}_latents"] = torch.randn(b, n + 1, c, 9, h // s, w // s, generator=g)
            batch[f"ode_c{ci}_s{k}_timesteps"] = torch.tensor([CHUNK0[k] if ci == 0 else LATER[k]] * b)
    batch["ode_clean"] = torch.stack([torch.stack([batch[f"ode_c{ci}_s2_latents"][i, -1] for ci in range(chunks)])
                                      for i in range(b)])
    return batch


def test_ode_loss_is_zero_for_the_exact_velocity_and_uses_the_teacher_history():
    batch, hcfg, seen = _fake_batch(), HistoryConfig(), []

    def oracle(x_t, t, x0, history):
        # find which stored state this is, answer v = (x_t − end) / σ(t) so that x̂ = end exactly
        for key, lat in batch.items():
            if key.endswith("_latents") and lat.shape[-3:] == x_t.shape[-3:]:
                for j in range(lat.shape[1] - 1):
                    if torch.equal(lat[:, j], x_t):
                        c, k = int(key.split("_")[1][1:]), int(key.split("_")[2][1:])
                        seen.append((c, k, t.dtype))
                        torch.testing.assert_close(t, batch[f"ode_c{c}_s{k}_timesteps"][:, j].float(), rtol=0, atol=0)
                        if c == 0:
                            assert not x0.any() and not history.any()
                        else:  # the newest history frames are the previous chunk's clean latents
                            assert torch.equal(history[:, :, -9:], batch["ode_clean"][:, c - 1])
                            assert torch.equal(x0, batch["ode_clean"][:, 0, :, :1])
                        mu = calculate_mu(x_t.shape[-3] * x_t.shape[-2] * x_t.shape[-1] // 4)
                        sigma = sigma_of(batch[f"ode_c{c}_s{k}_timesteps"][:, j], k, mu).float().view(-1, 1, 1, 1, 1)
                        return (x_t - lat[:, -1]) / sigma
        raise AssertionError("input is not a stored teacher state")

    loss, logs = ode_regression_loss(oracle, batch, OdeConfig(), hcfg, torch.Generator().manual_seed(1))
    assert float(loss) == pytest.approx(0.0, abs=1e-10)
    assert len(seen) == 9 and len({c for c, _, _ in seen}) == 3  # 3 random chunks × 3 levels
    assert all(dtype == torch.float32 for _, _, dtype in seen)  # the recorded float t, as official (not int64)
    # a velocity that is off by δ gives 0.5·mean((σδ)²)·80, i.e. the regression target really is the level end
    loss_zero_v, _ = ode_regression_loss(lambda x, t, a, b: torch.zeros_like(x), batch, OdeConfig(), hcfg,
                                         torch.Generator().manual_seed(1))
    from helios_train.algorithms.ode_regression import pick

    manual = []
    for c, k, j in pick(batch, OdeConfig(), torch.Generator().manual_seed(1)):
        lat = batch[f"ode_c{c}_s{k}_latents"]
        manual.append(0.5 * torch.mean((lat[:, j] - lat[:, -1]) ** 2))
    assert float(loss_zero_v) == pytest.approx(80 * float(torch.stack(manual).mean()), rel=1e-5)


@pytest.mark.slow
def test_ode_stage_trains_and_resumes_exactly(ode_shards, toy_root, tmp_path):
    shards, _ = ode_shards
    common = ["experiment=stage_3_ode", "model=toy", "data=toy_ode", f"data.shards={shards}/ode-*.tar",
              f"model.path={toy_root}/model", "model.build_toy=false", "stage.trainables.lora.rank=8",
              "stage.trainables.lora.alpha=8", "trainer.optim.lr=1e-3", "stage.ema.update_after_step=1",
              "trainer.checkpoint_every=3"]
    train(toy_root, tmp_path / "a", common + ["trainer.max_steps=6", "run_name=straight"])
    train(toy_root, tmp_path / "b", common + ["trainer.max_steps=3", "run_name=resumed"])
    train(toy_root, tmp_path / "b", common + ["trainer.max_steps=6", "run_name=resumed"])
    straight = read_metrics(tmp_path / "a/straight")
    resumed = read_metrics(tmp_path / "b/resumed")
    assert [r["step"] for r in resumed][-3:] == [4, 5, 6]
    assert [r["loss"] for r in straight][-3:] == pytest.approx([r["loss"] for r in resumed][-3:], rel=1e-5)
    assert all(r["ode_terms"] == 9 for r in straight)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a/straight/checkpoint-6/generator.ema.safetensors"))
    b = load_file(str(tmp_path / "b/resumed/checkpoint-6/generator.ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
