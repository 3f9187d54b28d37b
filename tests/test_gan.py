"""Tests for helios_train.algorithms.gan and helios_train.model.gan_taps: the critic's hierarchical GAN heads (official `Discriminator3DHead`,
helios/modules/transformer_helios.py; GAN losses: `_critic_loss`, `_generator_loss` in utils_helios_post.py)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import HeliosTransformer3DModel

from helios_train.algorithms.gan import (
    Discriminator3DHead, DiscriminatorHeads, GanConfig, approximate_r1, discriminator_gan_loss, gan_active,
    generator_gan_loss, input_gradient_loss, perturb, random_spatial_crop, scaled_blocks,
)
from helios_train.model.gan_taps import attach_gan_heads, critic_gan_logits, tap_noisy_hidden_states
from helios_train.algorithms.history import HistoryConfig
from helios_train.model.inputs import model_inputs

# Toy geometry (helios_train/data/toy_checkpoint.py) with 4 blocks so that all 4 hook heads exist.
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
            freq_dim=32, ffn_dim=64, num_layers=4, rope_dim=(4, 6, 6))
HIST = HistoryConfig(history_sizes=[4, 2, 1], latent_window_size=9)
CFG = GanConfig(enabled=True, head_width=64, groups=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: intra-op threads only add spin/contention (10-100x slower on a busy 2-core box).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(seed=0):
    torch.manual_seed(seed)
    return HeliosTransformer3DModel(**TINY).eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


def inputs(b=2, hw=(8, 16), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 9, *hw, generator=g)
    x0 = torch.randn(b, 4, 1, *hw, generator=g)
    history = torch.randn(b, 4, 7, *hw, generator=g)
    embeds = torch.randn(b, 5, 32, generator=g)
    t = torch.full((b,), 500.0)
    return x, x0, history, t, embeds


def caller(model, x0, history, t, embeds):
    def call(x):
        return model(**model_inputs(x, x0, history, t, embeds, HIST), return_dict=False)[0]
    return call


def test_scaled_blocks():
    assert scaled_blocks([5, 15, 25, 35], 40, 40) == [5, 15, 25, 35]
    assert scaled_blocks([5, 15, 25, 35], 4, 40) == [0, 1, 2, 3]
    assert scaled_blocks([5, 15, 25, 35], 8, 40) == [1, 3, 5, 7]  # same relative depth
    assert scaled_blocks([5, 15, 25, 35], 6, 40) == [0, 2, 3, 5]  # nearest block centre
    assert scaled_blocks([5, 15, 25, 35], 2, 40) == [0, 1]
    assert scaled_blocks([5, 15, 25, 35], 1, 40) == [0]
    for n in range(4, 41):
        idx = scaled_blocks([5, 15, 25, 35], n, 40)
        assert len(set(idx)) == 4 and idx == sorted(idx) and 0 <= idx[0] and idx[-1] < n
    # collisions are spread, not dropped
    assert scaled_blocks([38, 39], 4, 40) == [2, 3]
    with pytest.raises(ValueError):
        scaled_blocks([40], 4, 40)


def test_gan_active_gate():
    assert not gan_active(GanConfig(), 5000)  # disabled by default
    assert not gan_active(GanConfig(enabled=True), 999) and gan_active(GanConfig(enabled=True), 1000)


def test_head_shapes_tiny_and_14b():
    head = Discriminator3DHead(32, width=64, groups=8)
    assert head(torch.randn(3, 32, 9, 2, 4)).shape == (3,)  # toy tokens after a 50% crop
    assert head(torch.randn(1, 32, 1, 1, 1)).shape == (1,)  # degenerate sizes still work
    with pytest.raises(ValueError):
        Discriminator3DHead(32, width=60, groups=8)
    # 14B geometry on meta tensors: 5120-wide features of a 24×40 crop (12×20 tokens), 16-channel output.
    with torch.device("meta"):
        big = HeliosTransformer3DModel()
        heads = DiscriminatorHeads.for_transformer(big, GanConfig())
        assert heads.block_indices == [5, 15, 25, 35]
        feats = [torch.empty(1, 5120, 9, 12, 20) for _ in range(4)]
        assert heads(feats, torch.empty(1, 16, 9, 24, 40)).shape == (1, 5)
        assert heads.final_head.linear.in_features == 768


def test_tap_equals_manual_block_run_and_keeps_output(model):
    x, x0, history, t, embeds = inputs()
    call = caller(model, x0, history, t, embeds)
    with torch.no_grad():
        ref = call(x)
        # block 0's real arguments, then run the blocks by hand
        seen = {}
        handle = model.blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("args", a))
        try:
            with tap_noisy_hidden_states(model, [0, 1, 2, 3]) as tap:
                out = call(x)
        finally:
            handle.remove()
        assert torch.equal(out, ref)  # hooks do not change the velocity
        assert tap.grid == (9, 4, 8)  # 8×16 latents, patch (1, 2, 2)
        hidden, text, temb, rope, n_noisy = seen["args"]
        assert n_noisy == 9 * 4 * 8 and hidden.shape[1] > n_noisy  # history tokens present too
        # layout: the block input's last n_noisy tokens are exactly patch_embedding(x), t-h-w order
        grid = model.patch_embedding(x)
        assert torch.equal(hidden[:, -n_noisy:].reshape(2, 9, 4, 8, -1).permute(0, 4, 1, 2, 3), grid)
        h = hidden
        for i, block in enumerate(model.blocks):
            h = block(h, text, temb, rope, n_noisy)
            expect = h[:, -n_noisy:].reshape(2, 9, 4, 8, -1).permute(0, 4, 1, 2, 3)
            assert tap.features[i].shape == (2, 32, 9, 4, 8)
            torch.testing.assert_close(tap.features[i], expect, rtol=0, atol=0)
        # other history → other features, same shape
        with tap_noisy_hidden_states(model, [1]) as tap2:
            caller(model, x0, history + 1.0, t, embeds)(x)
        assert tap2.features[0].shape == tap.features[1].shape
        assert not torch.allclose(tap2.features[0], tap.features[1])
    assert not model.blocks[1]._forward_pre_hooks and not model.norm_out._forward_pre_hooks  # removed


def test_tap_works_with_gradient_checkpointing():
    model = make_model()
    model.enable_gradient_checkpointing()
    heads = DiscriminatorHeads.for_transformer(model, CFG)
    x, x0, history, t, embeds = inputs(b=1)
    x.requires_grad_(True)
    logits = critic_gan_logits(model, heads, caller(model, x0, history, t, embeds), x)
    logits[:, 0].sum().backward()  # head 0 only sees block 0's features: gradient must reach x through them
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_logits_and_gradients_through_wrapped_critic():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    critic = make_model()
    heads = attach_gan_heads(critic, CFG)
    critic.requires_grad_(True)  # base + heads trainable, as a worst case for leaks below
    x, x0, history, t, embeds = inputs()
    x, hist_c, x0_c = random_spatial_crop([x, history, x0], 0.5, torch.Generator().manual_seed(0))
    assert x.shape[-2:] == (4, 8)

    # --- discriminator side, called through a real (1-process gloo) DDP wrapper: hooks on the inner
    # blocks fire, logits are [B, 4 hooks + final], and L_D reaches the heads.
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(critic, find_unused_parameters=True)
        logits = critic_gan_logits(ddp, None, caller(ddp, x0_c, hist_c, t, embeds), x)
        assert logits.shape == (2, 5)
        discriminator_gan_loss(logits, -logits.detach(), CFG).backward()
    finally:
        if owns_group:
            dist.destroy_process_group()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters() if p.dim() > 1)

    # --- generator side: ∂L_G/∂x reaches the generator's tensor; nothing lands in the critic.
    critic.zero_grad(set_to_none=True)
    gen_param = torch.nn.Parameter(x.clone())

    def l_g(z):
        return generator_gan_loss(critic_gan_logits(critic, None, caller(critic, x0_c, hist_c, t, embeds), z), CFG)

    loss = input_gradient_loss(l_g, gen_param * 1.0)
    torch.testing.assert_close(loss, l_g(gen_param).detach())
    loss.backward()
    assert all(p.grad is None for p in critic.parameters())  # heads, base: no leak into the critic
    direct = torch.autograd.grad(l_g(gen_param), gen_param)[0]
    torch.testing.assert_close(gen_param.grad, direct)
    assert gen_param.grad.abs().sum() > 0
    # and it needs no trainable critic parameter at all
    critic.requires_grad_(False)
    assert torch.autograd.grad(l_g(gen_param), gen_param)[0].abs().sum() > 0


def test_discriminator_sign_and_generator_direction(model):
    torch.manual_seed(0)
    heads = DiscriminatorHeads(4, 32, 4, CFG)
    g = torch.Generator().manual_seed(3)

    def feats(shift):
        return ([torch.randn(4, 32, 9, 2, 4, generator=g) + shift for _ in heads.block_heads],
                torch.randn(4, 4, 9, 4, 8, generator=g) + shift)

    fake, real = feats(1.0), feats(-1.0)
    opt = torch.optim.SGD(heads.parameters(), lr=1.0)
    first = None
    for _ in range(20):
        loss = discriminator_gan_loss(heads(*fake), heads(*real), CFG)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        lf, lr_ = heads(*fake), heads(*real)
        assert float(discriminator_gan_loss(lf, lr_, CFG)) < first
        # logit = fakeness → "realness" score = −logit
        assert (-lr_).mean() > (-lf).mean()
        assert (lf > 0).float().mean() > 0.5 and (lr_ < 0).float().mean() > 0.5

    # L_G: a small step of the fake input against ∂L_G/∂x lowers the fake logits (towards "real")
    x, x0, history, t, embeds = inputs(hw=(4, 8))
    critic_heads = DiscriminatorHeads.for_transformer(model, CFG)
    call = caller(model, x0, history, t, embeds)
    x = x.requires_grad_(True)
    logits = critic_gan_logits(model, critic_heads, call, x)
    (grad,) = torch.autograd.grad(generator_gan_loss(logits, CFG), x, retain_graph=True)
    with torch.no_grad():
        stepped = critic_gan_logits(model, critic_heads, call, x - 0.05 * grad / grad.norm())
    assert stepped.mean() < logits.mean()
    assert float(generator_gan_loss(stepped, CFG)) < float(generator_gan_loss(logits.detach(), CFG))
    # L_G and L_D's fake term pull in opposite directions
    d_grad = torch.autograd.grad(discriminator_gan_loss(logits, torch.zeros_like(logits), CFG), x)[0]
    assert float((d_grad * grad).sum()) < 0


def test_approximate_r1(model):
    heads = DiscriminatorHeads.for_transformer(model, CFG)
    x, x0, history, t, embeds = inputs(b=1, hw=(4, 8))
    rep = lambda z: torch.cat([z, z], dim=0)  # noqa: E731
    call = caller(model, rep(x0), rep(history), rep(t), rep(embeds))  # batched [real, perturbed]
    r1 = {}
    with torch.no_grad():
        for sigma in (0.005, 0.01):
            pert = perturb(x, sigma, torch.Generator().manual_seed(0))  # the same ε for both σ
            logits = critic_gan_logits(model, heads, call, torch.cat([x, pert]))
            r1[sigma] = float(approximate_r1(logits[:1], logits[1:], GanConfig(r1_sigma=sigma)))
    # A finite-difference penalty, r1_weight · mean|logit(x + σε) − logit(x)|² ≈ r1_weight · σ²|Jε|²: doubling σ
    # quadruples it (1 if σ were ignored, 0 if the heads did not see the perturbed input).
    assert r1[0.005] > 0 and 3.5 < r1[0.01] / r1[0.005] < 4.5


def test_random_spatial_crop():
    a = torch.arange(2 * 3 * 48 * 80, dtype=torch.float32).reshape(2, 3, 1, 48, 80)
    b, c = a + 0.5, -a
    out1 = random_spatial_crop([a, b, c], 0.5, torch.Generator().manual_seed(7))
    out2 = random_spatial_crop([a, b, c], 0.5, torch.Generator().manual_seed(7))
    assert [o.shape[-2:] for o in out1] == [(24, 40)] * 3
    assert torch.equal(out1[1], out1[0] + 0.5) and torch.equal(out1[2], -out1[0])  # one box for all
    assert all(torch.equal(p, q) for p, q in zip(out1, out2))  # deterministic for a seeded generator
    boxes = {float(random_spatial_crop([a], 0.5, torch.Generator().manual_seed(s))[0].flatten()[0]) for s in range(8)}
    assert len(boxes) > 1  # the box does move
    assert random_spatial_crop([torch.zeros(1, 1, 1, 5, 3)], 0.5, torch.Generator())[0].shape[-2:] == (2, 1)
    assert random_spatial_crop([torch.zeros(1, 1, 1, 1, 1)], 0.5, torch.Generator())[0].shape[-2:] == (1, 1)
    assert random_spatial_crop([torch.zeros(1, 1, 1, 9, 10)], 0.5, torch.Generator(), multiple=2)[0].shape[-2:] == (4, 4)
    with pytest.raises(ValueError):
        random_spatial_crop([a, torch.zeros(1, 1, 1, 8, 8)], 0.5, torch.Generator())


def test_heads_survive_peft_and_are_trainable():
    from peft import LoraConfig

    critic = make_model()
    critic.requires_grad_(False)
    critic.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k"]))
    heads = attach_gan_heads(critic, CFG)
    assert critic.gan_heads is heads and all(p.dtype == torch.float32 for p in heads.parameters())
    names = [n for n, p in critic.named_parameters() if p.requires_grad]
    assert any(n.startswith("gan_heads.block_heads.0.") for n in names)
    assert any(n.startswith("gan_heads.final_head.") for n in names)
    assert any("lora" in n for n in names)
    assert not any("lora" in n for n in names if n.startswith("gan_heads"))

    x, x0, history, t, embeds = inputs(b=1, hw=(4, 8))
    call = caller(critic, x0, history, t, embeds)
    with torch.no_grad():
        before = critic_gan_logits(critic, None, call, x)
        critic.disable_adapters()
        try:
            assert all(p.requires_grad for p in heads.parameters())
            teacher = critic_gan_logits(critic, None, call, x)
        finally:
            critic.enable_adapters()
        after = critic_gan_logits(critic, None, call, x)
    assert teacher.shape == before.shape == (1, 5)
    torch.testing.assert_close(after, before)
    assert all(p.requires_grad for p in heads.parameters())
    with pytest.raises(ValueError):
        attach_gan_heads(critic, CFG)


@pytest.mark.parametrize("fp32_heads,expected", [(True, torch.float32), (False, torch.bfloat16)])
def test_heads_compute_in_fp32_inside_bf16_autocast_unless_official(fp32_heads, expected):
    """stage.gan.fp32_heads: the heads' convolutions run in fp32 inside the stage's bf16 autocast (default),
    or under that autocast as the official accelerate mixed precision does (false)."""
    head = Discriminator3DHead(32, width=64, groups=8, fp32=fp32_heads)
    seen = []
    head.convs[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logit = head(torch.randn(2, 32, 9, 8, 8, dtype=torch.bfloat16))
    assert seen == [expected] and logit.shape == (2,)
