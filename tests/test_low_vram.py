"""stage.dmd.low_vram (helios_train/model/low_vram.py): one frozen base on the device at a time, numbers unchanged;
and the GAN's L_G keeps only ∂L_G/∂x, never the critic's graph, through the generator backward."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from conftest import compose, train
from helios_train.training.tracking import read_metrics
from test_distilled_stage import GAN, dmd_overrides


def _lora_like(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    m[0].weight.requires_grad_(False)
    m[0].bias.requires_grad_(False)  # frozen "base"; m[1] is the trainable part
    return m


def test_one_base_resident_values_round_trip_and_an_offloaded_base_cannot_run():
    from helios_train.model.low_vram import FrozenBaseResidency

    a, b = _lora_like(0), _lora_like(1)
    frozen_a = [p.detach().clone() for p in a[0].parameters()]
    trainable_b = b[1].weight
    r = FrozenBaseResidency({"a": a, "b": b}, torch.device("cpu"))
    assert r.resident == set() and r.bytes == {"a": (32 + 8) * 4, "b": (32 + 8) * 4}
    r.use("a")
    x = torch.randn(3, 4)
    a(x)  # resident: runs
    assert b[0].weight.numel() == 0  # offloaded: an empty tensor, not a silent host copy
    with pytest.raises(RuntimeError):
        b(x)
    r.use("b")
    assert a[0].weight.numel() == 0 and r.resident == {"b"}
    r.use("a")
    for p, ref in zip(a[0].parameters(), frozen_a):
        assert torch.equal(p, ref)  # the base came back bit-exact
    assert b[1].weight is trainable_b and trainable_b.numel() == 16  # trainables never move
    assert r.take_onloaded_bytes() == 3 * 40 * 4 and r.take_onloaded_bytes() == 0
    r.use("a")  # already resident: nothing moves
    assert r.onloaded_bytes == 0


@pytest.mark.slow
def test_toy_dmd_gan_with_low_vram_equals_the_run_without_it(toy_root, base_export, tmp_path):
    """DMD + GAN (active from step 2) + EMA, 6 steps: the same losses, gradient norms, trained tensors and EMA
    bit for bit; a generator-update step moves 4 bases (critic in, generator back for the backward, critic for
    the critic phase, generator for the next step), a critic-only step 2."""
    from safetensors.torch import load_file

    from helios_train.stages.dmd import DmdStage

    common = dmd_overrides(toy_root, base_export)[1:] + GAN + ["stage.ema.update_after_step=1", "trainer.max_steps=6",
                                                               "trainer.checkpoint_every=6"]
    train(toy_root, tmp_path, common + ["stage.dmd.low_vram=true", "run_name=on"])
    train(toy_root, tmp_path, common + ["stage.dmd.low_vram=false", "run_name=off"])
    on, off = read_metrics(tmp_path / "on"), read_metrics(tmp_path / "off")
    assert len(on) == len(off) == 6
    for m_on, m_off in zip(on, off):
        for k, v in m_off.items():
            if k.endswith(("loss", "grad_norm", "gan/r1", "ema_decay")):
                assert m_on[k] == v, (m_on["step"], k)
    for f in ("generator.trainable", "critic.trainable", "generator.ema"):
        a, b = (load_file(str(tmp_path / run / "checkpoint-6" / f"{f}.safetensors")) for run in ("on", "off"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    stage = DmdStage(compose(dmd_overrides(toy_root, base_export) + GAN), torch.device("cpu"))
    gb = {k: v / 1e9 for k, v in stage.residency.bytes.items()}
    per_step = [m["low_vram/onloaded_gb"] for m in on]
    expected = [2 * gb["generator"] + 2 * gb["critic"] if m["step"] % 5 == 1 else gb["generator"] + gb["critic"]
                for m in on]  # steps 1 and 6 (0-indexed 0 and 5) update the generator
    assert per_step == pytest.approx(expected, rel=1e-6)
    assert "low_vram/onloaded_gb" not in off[0]


def test_gan_generator_loss_keeps_only_the_input_gradient(toy_root, base_export):
    """Official is_gan_low_vram_mode: the critic's graph of L_G is differentiated at once and freed; what stays
    alive for the generator backward is one tensor the size of the GAN crop (∂L_G/∂x). Measured with autograd's
    saved-tensor hooks: everything the L_G computation saved, and what of it is still alive when it returns."""
    from helios_train.stages.dmd import DmdStage

    cfg = compose(dmd_overrides(toy_root, base_export) + GAN + ["stage.gan.start_step=0"])
    stage = DmdStage(cfg, torch.device("cpu"))
    from helios_train.runtime.roles import FrozenRole

    stage.bind({name: _Prepared(spec.module) if spec.trainable else FrozenRole(name, spec.module, spec.adapters)
                for name, spec in stage.role_specs().items()})
    saved, existing = [], set()

    def pack(t):  # tensors that existed before L_G (weights, inputs) are alive anyway: not L_G's cost
        # What the graph keeps is the packed object: a detached alias (returning `t` itself would tie a
        # saved output to its own grad_fn in a reference cycle and keep every graph alive).
        d = t.detach()
        if t.untyped_storage().data_ptr() not in existing:
            saved.append((weakref.ref(d), t.numel() * t.element_size()))
        return d

    original = stage._gan_generator_loss

    def watched(batch, x0_gen, *args):
        before = [*stage.critic.parameters(), *stage.critic.buffers(), *stage.transformer.parameters(),
                  *stage.transformer.buffers(), x0_gen, *[v for v in [*batch.values(), *args] if torch.is_tensor(v)]]
        existing.update(t.untyped_storage().data_ptr() for t in before)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda d: d):
            loss = original(batch, x0_gen, *args)
        watched.crop_bytes = x0_gen.numel() * 4 * cfg.stage.gan.crop_fraction ** 2
        return loss

    stage._gan_generator_loss = watched
    batch = _toy_batch(stage)
    loss, logs = stage.loss("generator", batch, 0, torch.Generator().manual_seed(0))
    assert "gan/g_loss" in logs
    gc.collect()
    total = sum(n for _, n in saved)
    alive = sum(n for ref, n in saved if ref() is not None)
    assert total > 50 * watched.crop_bytes  # the critic forward with grad saved its activations …
    assert alive <= 1.01 * watched.crop_bytes  # … and only ∂L_G/∂x (one crop-sized tensor) outlives it
    loss.backward()
    assert all(p.grad is None for p in stage.critic.parameters())  # the critic gets no gradient from L_G
    assert any(p.grad is not None for p in stage.transformer.parameters() if p.requires_grad)


class _Prepared:
    """What the stage reads of a prepared role: the module it calls (single process: the module itself)."""

    def __init__(self, module):
        self.module = self.model = module


def _toy_batch(stage) -> dict:
    from helios_train.data.shards import expand_shards
    from helios_train.data.video_dataset import DataPosition, build_loader

    cfg = stage.cfg
    loader = build_loader(expand_shards(cfg.data.shards), cfg.data, cfg.stage.history, 0, DataPosition())
    return stage.prepare_batch(next(iter(loader)))
