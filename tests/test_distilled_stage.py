"""Distilled (DMD) stage: teacher/critic sharing, 5:1 update ratio, exact resume mid-cycle, DeepSpeed."""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import REPO, compose, run_pooled, train
from helios_train.training.tracking import read_metrics


def dmd_overrides(toy_root, export):
    return [f"toy_root={toy_root}", "stage=distilled", f"model.path={export}", "model.build_toy=false",
            f"stage.dmd.real_score_path={export}", "stage.trainables.lora.rank=8", "stage.dmd.critic_lora_rank=8",
            "trainer.optim.lr=1e-4", "stage.dmd.critic_lr=1e-4", "data.num_workers=0"]


def test_critic_equals_teacher_at_init_and_teacher_ignores_critic_updates(toy_root, base_export):
    from helios_train.algorithms.history import HistoryConfig
    from helios_train.model.inputs import model_inputs
    from helios_train.stages.dmd import DmdStage

    stage = DmdStage(compose(dmd_overrides(toy_root, base_export)), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    inp = model_inputs(torch.randn(1, 4, 9, 8, 16, generator=g), torch.randn(1, 4, 1, 8, 16, generator=g),
                       torch.randn(1, 4, 19, 8, 16, generator=g), torch.tensor([500.0]),
                       torch.randn(1, 16, 32, generator=g), HistoryConfig())

    stage.residency.use("critic")  # stage.dmd.low_vram (default): the critic's base onto the device

    def out(adapters: bool):
        (stage.critic.enable_adapters if adapters else stage.critic.disable_adapters)()
        with torch.no_grad():
            y = stage.critic(**inp, return_dict=False)[0]
        stage.critic.enable_adapters()
        return y

    teacher0 = out(False)
    torch.testing.assert_close(out(True), teacher0)  # LoRA B = 0: critic == teacher at init
    with torch.no_grad():  # an arbitrary critic update
        for n, p in stage.critic.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(out(True), teacher0)
    torch.testing.assert_close(out(False), teacher0)  # the teacher is untouched


def test_update_ratio_and_exact_resume_mid_cycle(toy_root, base_export, tmp_path):
    common = dmd_overrides(toy_root, base_export)[1:] + ["trainer.checkpoint_every=3", "stage.ema.update_after_step=2"]
    train(toy_root, tmp_path, common + ["trainer.max_steps=8", "run_name=straight"])
    train(toy_root, tmp_path, common + ["trainer.max_steps=3", "run_name=split"])
    train(toy_root, tmp_path, common + ["trainer.max_steps=8", "run_name=split"])
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    gen_steps = [m["step"] for m in a if "generator/loss" in m]
    assert gen_steps == [1, 6]  # 0-indexed steps 0 and 5: one generator update per 5 critic updates
    assert all("critic/loss" in m for m in a)
    for key in ("critic/loss", "generator/loss"):
        np.testing.assert_allclose([m.get(key, 0.0) for m in a], [m.get(key, 0.0) for m in b], rtol=0, atol=1e-6)
    # EMA: copied on every step up to its start, then averaged on generator-update steps; saved and resumed.
    assert [m["step"] for m in a if "ema_decay" in m] == [1, 2, 3, 6]
    from safetensors.torch import load_file

    ea = load_file(str(tmp_path / "straight/checkpoint-8/generator.ema.safetensors"))
    eb = load_file(str(tmp_path / "split/checkpoint-8/generator.ema.safetensors"))
    live = load_file(str(tmp_path / "straight/checkpoint-8/generator.trainable.safetensors"))
    assert ea.keys() == live.keys()
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=0, atol=1e-6)
    assert any(not torch.equal(ea[k], live[k]) for k in ea)  # the average lags the live weights
    from helios_train.sampling.export import export

    out = export(tmp_path / "straight", tmp_path / "ema_export", use_ema=True)
    import json

    assert json.loads((out / "helios_export.json").read_text())["ema"] is True
    from diffusers import HeliosTransformer3DModel

    plain = export(tmp_path / "straight", tmp_path / "plain_export")
    w_ema = HeliosTransformer3DModel.from_pretrained(out, subfolder="transformer").blocks[0].attn1.to_q.weight
    w_live = HeliosTransformer3DModel.from_pretrained(plain, subfolder="transformer").blocks[0].attn1.to_q.weight
    assert not torch.equal(w_ema, w_live)  # the EMA export fused the averaged LoRA, not the live one


GAN = ["stage.gan.enabled=true", "stage.gan.start_step=2", "stage.gan.head_width=32", "stage.gan.groups=8"]


@pytest.mark.slow
def test_gan_only_from_start_step_runs_past_it_and_resumes_exactly(toy_root, base_export, tmp_path):
    """The official gan-version config crashes when its GAN starts (train_helios.py reads
    `is_gan_aprox_grad`, absent from helios/utils/train_config.py); ours runs past it.
    Before start_step nothing GAN-related runs and the heads do not move; from it the critic adds
    L_D + R1, generator steps add L_G; 3 + 3 resumed steps equal 6 straight (heads and critic state)."""
    from safetensors.torch import load_file

    common = dmd_overrides(toy_root, base_export)[1:] + GAN + ["trainer.checkpoint_every=2"]
    train(toy_root, tmp_path, common + ["trainer.max_steps=6", "stage.dmd.update_ratio=3", "run_name=straight"])
    train(toy_root, tmp_path, common + ["trainer.max_steps=3", "stage.dmd.update_ratio=3", "run_name=split"])
    train(toy_root, tmp_path, common + ["trainer.max_steps=6", "stage.dmd.update_ratio=3", "run_name=split"])
    hist = read_metrics(tmp_path / "straight")
    assert [m["critic/gan/active"] for m in hist] == [0, 0, 1, 1, 1, 1]  # step index 2 = logged step 3
    assert [m["step"] for m in hist if "critic/gan/d_loss" in m] == [3, 4, 5, 6]
    assert [m["step"] for m in hist if "generator/gan/g_loss" in m] == [4]  # generator steps: 1, 4 (ratio 3)
    assert all(np.isfinite(m["critic/loss"]) and m["critic/gan/r1"] >= 0 for m in hist if "critic/gan/r1" in m)
    heads = lambda step: {k: v for k, v in load_file(str(tmp_path / f"straight/checkpoint-{step}/critic.trainable.safetensors")).items()
                          if k.startswith("gan_heads.")}  # noqa: E731
    h2, h4 = heads(2), heads(4)
    assert h2 and any(not torch.equal(h2[k], h4[k]) for k in h2)  # trained once active
    split = read_metrics(tmp_path / "split")
    # The resumed run keeps the checkpointed FLOP counts (helios_train/training/callbacks/throughput.py): it counts exactly the steps
    # the uninterrupted run counted (a count perturbs that step's kernels, which would break the exact resume
    # below) and logs the same per-step FLOPs.
    assert [m.get("perf/step_tflop") for m in split[3:]] == [m.get("perf/step_tflop") for m in hist[3:]]
    assert any("perf/step_tflop" in m for m in split[3:])
    for key in ("critic/loss", "critic/gan/d_loss", "generator/gan/g_loss"):
        a = [m[key] for m in hist if key in m]
        b = [m[key] for m in split if key in m]
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), key
    sa = load_file(str(tmp_path / "straight/checkpoint-6/critic.trainable.safetensors"))
    sb = load_file(str(tmp_path / "split/checkpoint-6/critic.trainable.safetensors"))
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6)


def test_gan_heads_are_untouched_before_start(toy_root, base_export):
    from helios_train.stages.dmd import DmdStage

    stage = DmdStage(compose(dmd_overrides(toy_root, base_export) + GAN), torch.device("cpu"))
    names = [n for n, p in stage.critic.named_parameters() if p.requires_grad]
    assert any(n.startswith("gan_heads.") for n in names) and any("lora" in n for n in names)
    assert not any("lora" in n for n in names if n.startswith("gan_heads."))  # heads are plain, not LoRA-wrapped
    from helios_train.runtime.roles import Calls

    assert stage.role_specs()["critic"].calls == Calls.SEVERAL  # two forwards with grad per critic loss


def torchrun_dmd(toy_root, export, out, launcher, *overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "helios_train", f"launcher={launcher}",
           f"output_root={out}", "validation.every=0", *dmd_overrides(toy_root, export), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def pooled_dmd_runs(toy_root, export, out, configs: list[list[str]]) -> None:
    """Several 2-process DMD runs in one torchrun launch (tests/matrix_worker.py), one after the other."""
    run_pooled([[f"output_root={out}", "validation.every=0", *dmd_overrides(toy_root, export), *c] for c in configs],
               out, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ddp"])
def test_dmd_runs_on_two_processes(toy_root, base_export, tmp_path, launcher):
    """Multi-role under DDP, the generator's gradients averaged by the backend (its rollout calls the model several
    times before one backward). Two DeepSpeed engines with the GAN: the ZeRO-3 test below (and the recipe matrix's
    ZeRO-2 DMD run), which also checks DeepSpeed's stepping of the idle heads."""
    # DDP runs the non-official option: idle heads untouched before start (DeepSpeed: official only)
    idle = ["stage.gan.idle_head_updates=false"] if launcher == "ddp" else []
    torchrun_dmd(toy_root, base_export, tmp_path, launcher, "trainer.max_steps=6", "trainer.checkpoint_every=2",
                 "run_name=dmdds", *GAN, *idle)
    hist = read_metrics(tmp_path / "dmdds")
    assert [m["step"] for m in hist if "generator/loss" in m] == [1, 6]
    assert [m["step"] for m in hist if "critic/gan/d_loss" in m] == [3, 4, 5, 6]  # GAN heads under this backend too
    assert [m["step"] for m in hist if "generator/gan/g_loss" in m] == [6]
    ckpt = tmp_path / "dmdds/checkpoint-6"
    for role in ("generator", "critic"):
        assert (ckpt / f"{role}.trainable.safetensors").is_file()
        if launcher.startswith("deepspeed"):
            assert (ckpt / f"{role}.deepspeed").is_dir()
    assert (ckpt / "generator.ema.safetensors").is_file()
    # Before stage.gan.start_step no rank gives the heads a gradient. With idle_head_updates=false (DDP
    # here) their grad stays None and AdamW leaves them bit-identical to their init; officially (ZeRO's
    # flat buffers hold zeros) AdamW steps them on zeros: only the weight decay (1e-3 · lr) moves them.
    from safetensors.torch import load_file

    from helios_train.runtime.checkpoint import trainable_state
    from helios_train.stages.dmd import DmdStage

    cfg = compose(dmd_overrides(toy_root, base_export) + GAN)
    torch.manual_seed(cfg.trainer.seed)  # as the trainer does before building the stage
    init = {k: v for k, v in trainable_state(DmdStage(cfg, torch.device("cpu")).critic).items()
            if k.startswith("gan_heads.")}
    before = load_file(str(tmp_path / "dmdds/checkpoint-2/critic.trainable.safetensors"))
    after = load_file(str(ckpt / "critic.trainable.safetensors"))
    assert init and set(init) <= set(before)
    for k, v in init.items():
        if launcher == "ddp":
            assert torch.equal(before[k], v), k
        else:
            torch.testing.assert_close(before[k], v, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(after[k], v) for k, v in init.items())  # and trained once active
    # The same checkpoint-4 resumed on 1 process with accumulation 2 (global batch kept): generator, critic
    # with its GAN heads, the EMA and the 5:1 cycle continue, and steps 5-6 equal the 2-process run's.
    train(toy_root, tmp_path, [*dmd_overrides(toy_root, base_export)[1:], *GAN, *idle, "trainer.max_steps=6",
                               "trainer.checkpoint_every=2", "trainer.grad_accum_steps=2", "trainer.log_every=1",
                               f"resume={tmp_path}/dmdds/checkpoint-4", "run_name=dmd_one"])
    one = read_metrics(tmp_path / "dmd_one")
    assert [m["step"] for m in one] == [5, 6] and one[0]["resume/world_size_before"] == 2
    for key in ("critic/loss", "critic/gan/d_loss", "generator/loss"):
        np.testing.assert_allclose([m[key] for m in one if key in m], [m[key] for m in hist[4:] if key in m],
                                   rtol=1e-5, atol=1e-6, err_msg=key)
    ema_two = load_file(str(ckpt / "generator.ema.safetensors"))
    ema_one = load_file(str(tmp_path / "dmd_one/checkpoint-6/generator.ema.safetensors"))
    for k in ema_two:
        torch.testing.assert_close(ema_one[k], ema_two[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_zero3_dmd_equals_ddp_when_ranks_run_different_samplers(toy_root, base_export, tmp_path):
    """ZeRO-3 gathers weights with collectives inside every forward and backward, so ranks must run
    identical sequences; a rank with a first chunk runs the amplified sampler (4 steps per level, not 2).
    Unpadded, such a step hung in its backward. With helios_train/backends/lockstep.py it runs, and — padding
    being discarded forwards and zero-weighted graphs — it trains exactly like DDP (GAN included).

    The same runs check the generator EMA sharded over the 2 ranks (helios_train/backends/ema_shards.py): under ZeRO-3
    each rank averages its partition of every trainable tensor; gathered into the checkpoint it equals the EMA
    one process computes on whole tensors from the same live weights (recomputed here from every step's
    checkpoint with helios_train/algorithms/ema.py's rule), a ZeRO-3 run resumed at step 2 ends with exactly the same EMA,
    and DDP (whole tensors per rank; stage.dmd.low_vram, the recipes' default, moving the bases — ZeRO-3 does
    not need to) gathers to the same EMA as ZeRO-3."""
    from safetensors.torch import load_file

    from helios_train.algorithms.ema import EMAConfig, ema_decay

    common = ["trainer.max_steps=5", "trainer.checkpoint_every=1", "stage.dmd.update_ratio=1",
              "stage.ema.update_after_step=0", *GAN]
    # One torchrun for the three runs (tests/matrix_worker.py: one process group, a Trainer each); the
    # resumed one continues z3's checkpoint-2 in a run folder of its own.
    pooled_dmd_runs(toy_root, base_export, tmp_path, [
        ["launcher=deepspeed_zero3", *common, "run_name=z3"],
        ["launcher=ddp", *common, "run_name=ddp"],
        ["launcher=deepspeed_zero3", *common, f"resume={tmp_path}/z3/checkpoint-2", "run_name=resumed/z3"]])
    z3, ddp = read_metrics(tmp_path / "z3"), read_metrics(tmp_path / "ddp")
    assert 0.5 in [m["generator/amplified_share"] for m in z3]  # a step where exactly one rank had a first chunk
    assert all(m["low_vram/onloaded_gb"] > 0 for m in ddp) and "low_vram/onloaded_gb" not in z3[0]
    for key in ("generator/loss", "critic/loss", "generator/grad_norm", "critic/grad_norm", "critic/gan/d_loss"):
        a, b = [m[key] for m in z3 if key in m], [m[key] for m in ddp if key in m]
        assert len(a) == len(b) > 0, key
        steps = [m["step"] for m in z3 if key in m]
        # Up to the first GAN step (3) the runs agree to fp32 reduction order (measured ≤ 3.3e-5). From
        # then on the approximate R1 (100 · MSE of two nearly equal logits) amplifies that rounding:
        # measured ≤ 3e-3 two steps later, so later steps are held to 1e-2.
        early = [i for i, s in enumerate(steps) if s <= 3]
        np.testing.assert_allclose([a[i] for i in early], [b[i] for i in early], rtol=1e-4, atol=1e-7, err_msg=key)
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-7, err_msg=key)

    def tensors(run, step, what):
        return load_file(str(tmp_path / run / f"checkpoint-{step}" / f"generator.{what}.safetensors"))

    cfg = EMAConfig(enabled=True, update_after_step=0)
    whole = {}
    for step in range(1, 6):  # the trainer updates the EMA after step s (0-indexed) with ema_decay(s + 1)
        live, d = tensors("z3", step, "trainable"), ema_decay(step, cfg)
        whole = {k: v.clone() if not whole else whole[k] - (1 - d) * (whole[k] - v) for k, v in live.items()}
    gathered, resumed = tensors("z3", 5, "ema"), tensors("resumed/z3", 5, "ema")
    assert gathered.keys() == whole.keys() == resumed.keys()
    for k in whole:
        assert gathered[k].shape == whole[k].shape  # whole tensors, not partitions
        torch.testing.assert_close(gathered[k], whole[k], rtol=1e-6, atol=1e-8, msg=k)
        assert torch.equal(resumed[k], gathered[k]), k
    assert any(not torch.allclose(gathered[k], live[k]) for k in live)  # an average, not the live weights
    # Before stage.gan.start_step (2) no rank gives the heads a gradient; officially (ZeRO's flat buffers hold
    # zeros) AdamW steps them on zeros, so only the weight decay (1e-3 · lr) moves them from their init.
    from helios_train.runtime.checkpoint import trainable_state
    from helios_train.stages.dmd import DmdStage

    cfg = compose(dmd_overrides(toy_root, base_export) + GAN)
    torch.manual_seed(cfg.trainer.seed)  # as the trainer does before building the stage
    init = {k: v for k, v in trainable_state(DmdStage(cfg, torch.device("cpu")).critic).items()
            if k.startswith("gan_heads.")}
    idle = load_file(str(tmp_path / "z3/checkpoint-2/critic.trainable.safetensors"))
    assert init and set(init) <= set(idle)
    for k, v in init.items():
        torch.testing.assert_close(idle[k], v, rtol=1e-5, atol=1e-7, msg=k)
    trained = load_file(str(tmp_path / "z3/checkpoint-5/critic.trainable.safetensors"))
    assert any(not torch.equal(trained[k], v) for k, v in init.items())  # and trained once active
    a, b = tensors("z3", 2, "ema"), tensors("ddp", 2, "ema")  # before the first GAN step: reduction noise only
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_critic_reads_the_secondary_section(toy_root):
    """Stage 3 loader: a second, independently drawn chunk of the same video for the critic (official dataloader_dmd.py
    `return_secondary`)."""
    import webdataset as wds

    from helios_train.data.samples import latent_sample
    from helios_train.algorithms.history import HistoryConfig
    from helios_train.stages.dmd import critic_section

    cfg = compose([f"toy_root={toy_root}", "stage=distilled"])
    assert cfg.data.secondary_section
    shard = sorted((toy_root / "latents").glob("*.tar"))[0]
    raws = list(wds.WebDataset(str(shard), shardshuffle=False))
    samples = [latent_sample(r, cfg.data, HistoryConfig(), epoch) for r in raws for epoch in range(3)]
    assert any(s["secondary_chunk_index"] != s["chunk_index"] for s in samples)
    again = latent_sample(raws[0], cfg.data, HistoryConfig(), 0)
    assert again["secondary_chunk_index"] == samples[0]["secondary_chunk_index"]  # deterministic per (seed, epoch, key)
    s = next(s for s in samples if s["secondary_chunk_index"] != s["chunk_index"])
    view = critic_section(s)
    assert torch.equal(view["target"], s["secondary_target"]) and torch.equal(view["history"], s["secondary_history"])
    assert torch.equal(view["primary_target"], s["target"]) and not torch.equal(view["target"], s["target"])


def test_a_diverging_generator_stops_the_run_while_the_critic_stays_finite(toy_root, base_export, tmp_path):
    """The non-finite guard counts per role: a finite critic phase right after a NaN generator phase must not
    reset the generator's count, or a diverged generator would never stop a DMD run."""
    from helios_train.training.trainer import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite steps of role 'generator'"):
        train(toy_root, tmp_path, dmd_overrides(toy_root, base_export)[1:] + [
            "stage.dmd.update_ratio=1", "trainer.max_steps=6", "trainer.max_consecutive_nonfinite=3",
            "trainer.debug.nonfinite_loss_steps=[0,1,2,3,4,5]", "trainer.debug.nonfinite_roles=[generator]",
            "run_name=diverged"])


def test_flops_are_counted_per_kind_of_step_and_match_each_steps_own_count(toy_root, base_export, tmp_path,
                                                                           monkeypatch):
    """DMD steps differ in work: generator + critic or critic alone, with or without the GAN, the rollout's exit
    steps, the amplified first-chunk sampler. Every step that logs TFLOP/s must log the FLOPs of that very step,
    here checked against a FlopCounterMode wrapped around each phase of every step (the old single step-0 count
    was off on every critic-only and GAN step)."""
    from torch.utils.flop_counter import FlopCounterMode

    from helios_train.training.trainer import Trainer

    truth: dict[int, float] = {}
    update_role = Trainer._update_role

    def counted(self, name, batches, phase=0):
        with FlopCounterMode(display=False) as counter:
            out = update_role(self, name, batches, phase)
        truth[self.step + 1] = truth.get(self.step + 1, 0) + counter.get_total_flops()  # logged 1-indexed
        return out

    monkeypatch.setattr(Trainer, "_update_role", counted)
    train(toy_root, tmp_path, dmd_overrides(toy_root, base_export)[1:] + GAN[:1] + [
        "stage.gan.start_step=3", "stage.gan.head_width=32", "stage.gan.groups=8", "stage.dmd.update_ratio=2",
        "trainer.max_steps=6", "trainer.log_every=1", "run_name=flops"])
    rows = {m["step"]: m for m in read_metrics(tmp_path / "flops") if "critic/loss" in m}
    logged = {s: m["perf/step_tflop"] * 1e12 for s, m in rows.items() if "perf/step_tflop" in m}
    for step, flops in logged.items():
        assert flops == pytest.approx(truth[step], rel=1e-9), step
    critic_only = [s for s in rows if "generator/loss" not in rows[s]]
    with_gan = [s for s in rows if rows[s]["critic/gan/active"] == 1.0]
    assert set(critic_only) & set(logged) and set(with_gan) & set(logged) and set(critic_only) & set(with_gan)
    assert len({truth[s] for s in rows}) >= 3  # the steps really differ in work
    assert logged[max(logged)] == pytest.approx(truth[max(logged)], rel=1e-9)


def test_generator_lr_schedule_spans_its_own_updates(toy_root, base_export, tmp_path):
    """The generator updates once per update_ratio steps: its schedule is laid out over those updates, so a
    linear decay reaches its final LR (0) at the run's last generator update, as the critic's does at the last
    step. stage.dmd.generator_schedule=official keeps the official max_steps-long schedule."""
    from helios_train.stages.dmd import DmdStage

    train(toy_root, tmp_path, dmd_overrides(toy_root, base_export)[1:] + [
        "stage.dmd.update_ratio=3", "trainer.max_steps=6", "trainer.log_every=1", "trainer.optim.lr_scheduler=linear",
        "run_name=sched"])
    rows = read_metrics(tmp_path / "sched")
    gen = [m["generator/lr"] for m in rows if "generator/lr" in m]  # the LR after each update
    critic = [m["critic/lr"] for m in rows if "critic/lr" in m]
    assert gen == pytest.approx([0.5e-4, 0.0]) and len(critic) == 6 and critic[-1] == 0.0
    official = DmdStage(compose(dmd_overrides(toy_root, base_export) + ["stage.dmd.generator_schedule=official",
                                                                             "stage.dmd.update_ratio=3"]),
                              torch.device("cpu"))
    assert official.role_specs()["generator"].update_every == 1


def test_first_chunk_sampler_is_one_decision_per_batch_after_conditioning(toy_root, base_export):
    """Official rule: the amplified sampler only when every history tensor of the batch (anchor included) is zero
    after task dropout and corruption — a batch mixing a T2V sample with a V2V one is not amplified."""
    from helios_train.stages.dmd import DmdStage

    stage = DmdStage(compose(dmd_overrides(toy_root, base_export)), torch.device("cpu"))
    zeros_x0, zeros_h = torch.zeros(2, 4, 1, 8, 16), torch.zeros(2, 4, 19, 8, 16)
    assert stage._amplified(zeros_x0, zeros_h)
    mixed = zeros_h.clone()
    mixed[1, :, -9:] = torch.randn(4, 9, 8, 16)  # sample 1 keeps a video history
    assert not stage._amplified(zeros_x0, mixed)
    anchored = zeros_x0.clone()
    anchored[0] = 1.0  # an I2V anchor
    assert not stage._amplified(anchored, zeros_h)
    balanced = zeros_h.clone()
    balanced[0, 0, -1, 0, :2] = torch.tensor([1.0, -1.0])  # nonzero, sums to 0
    assert not stage._amplified(zeros_x0, balanced)
    stage.cfg.stage.dmd.amplify_first_chunk = False
    assert not stage._amplified(zeros_x0, zeros_h)
