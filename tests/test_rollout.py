"""The differentiable few-step pyramid sampler reproduces diffusers' HeliosPyramidPipeline (DMD)."""
from __future__ import annotations

import pytest
import torch

from helios_train.algorithms.history import HistoryConfig
from helios_train.model.inputs import model_inputs
from helios_train.algorithms.rollout import pyramid_rollout
from helios_train.model.variants import build_pipeline


@pytest.fixture(scope="module")
def distilled_pipe(toy_root):
    from diffusers import AutoencoderKLWan, HeliosTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    m = toy_root / "model"
    return build_pipeline("distilled", HeliosTransformer3DModel.from_pretrained(m, subfolder="transformer"),
                          AutoencoderKLWan.from_pretrained(m, subfolder="vae"),
                          UMT5EncoderModel.from_pretrained(m, subfolder="text_encoder"),
                          AutoTokenizer.from_pretrained(m, subfolder="tokenizer"))


def velocity_fn(transformer, embeds, b=1, h=8, w=16, c=4):
    zeros_x0, zeros_hist = torch.zeros(b, c, 1, h, w), torch.zeros(b, c, 19, h, w)

    def fn(x, t):
        return transformer(**model_inputs(x, zeros_x0, zeros_hist, t, embeds, HistoryConfig()), return_dict=False)[0]

    return fn


@pytest.mark.parametrize("steps,amplify", [([2, 2, 2], False), ([1, 1, 1], False), ([2, 2, 2], True)])
def test_rollout_matches_pipeline_first_chunk(distilled_pipe, steps, amplify):
    pipe = distilled_pipe
    prompt = "a red circle moves left to right"
    with torch.no_grad():
        ref = pipe(prompt=prompt, height=64, width=128, num_frames=33, guidance_scale=1.0,
                   pyramid_num_inference_steps_list=steps, is_amplify_first_chunk=amplify,
                   generator=torch.Generator().manual_seed(7), output_type="latent").frames[:, :, -9:]
        embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512)[:2]
        g = torch.Generator().manual_seed(7)
        noise = torch.randn(1, 4, 9, 8, 16, generator=g)
        out = pyramid_rollout(velocity_fn(pipe.transformer, embeds), noise, pipe.scheduler, steps,
                              amplify_first_chunk=amplify, generator=g, mu_from="previous", sampler="pipeline")
    assert out.nfe == sum(steps) * (2 if amplify else 1)
    torch.testing.assert_close(out.x0, ref.float(), rtol=1e-4, atol=1e-4)


def test_training_sampler_feeds_the_official_float_timesteps_and_table_sigmas(distilled_pipe):
    """The official training rollout (utils_helios_post.py) feeds int64 ones × the float t (998.53, not 998)
    and takes σ of t and of the next t from the level's μ-shifted table (convert_flow_pred_to_x0 / add_noise).
    μ from each level's own resolution: 998.5/834.0, 742.8/547.2, 385.4/254.0 at 48×80."""
    from helios_train.algorithms.timesteps import calculate_mu
    from helios_train.algorithms.sigma_table import level_table, nearest_sigma

    seen, xs = [], []

    def fn(x, t):
        seen.append(t.clone())
        xs.append(x.detach().double().clone())
        return torch.ones_like(x)  # v = 1: x̂0 = x_t − σ(t), so each step reveals the σ it used

    noise = torch.zeros(1, 16, 9, 48, 80)
    out = pyramid_rollout(fn, noise, distilled_pipe.scheduler, [2, 2, 2], generator=torch.Generator().manual_seed(0))
    assert all(t.dtype == torch.float32 for t in seen)
    expected = [998.53, 833.96, 742.82, 547.19, 385.41, 253.99]
    assert [float(t[0]) for t in seen] == pytest.approx(expected, abs=0.02)
    # σ actually used at the first step of each level, from x̂0 = x_t − σ·1 and the level's second input
    # x_1 = (1 − σ_1)·x̂0 + σ_1·start (start = x_0 of the level)
    for k in range(3):
        h, w = 12 * 2**k, 20 * 2**k
        table = level_table(distilled_pipe.scheduler, k, calculate_mu(9 * h * w // 4))
        s0, s1 = nearest_sigma(torch.stack([seen[2 * k][0], seen[2 * k + 1][0]]).double(), *table).tolist()
        start, x1 = xs[2 * k], xs[2 * k + 1]
        torch.testing.assert_close(x1, (1 - s1) * (start - s0) + s1 * start, rtol=0, atol=1e-5)
    # the pipeline sampler (diffusers, inference) truncates to int64 and uses the scheduler's exact σ
    ints = []
    pyramid_rollout(lambda x, t: ints.append(t.clone()) or torch.ones_like(x), noise, distilled_pipe.scheduler,
                    [2, 2, 2], generator=torch.Generator().manual_seed(0), sampler="pipeline")
    assert [t.dtype for t in ints] == [torch.int64] * 6 and int(ints[0][0]) == 998
    assert out.x0.shape == noise.shape


def test_exit_step_gradient_flows_only_through_exit_step(distilled_pipe):
    calls = []

    def fn(x, t):
        calls.append(torch.is_grad_enabled())
        return x * weight

    weight = torch.tensor(0.5, requires_grad=True)
    out = pyramid_rollout(fn, torch.randn(1, 4, 9, 8, 16), distilled_pipe.scheduler, [2, 2, 2],
                          generator=torch.Generator().manual_seed(0), exit_steps=[1, 0, 1])
    # level 0: step 0 no grad, step 1 (exit) grad; level 1: exits at step 0 (grad); level 2: step 0 no grad, 1 grad
    assert calls == [False, True, True, False, True]
    assert out.nfe == 5
    out.x0.sum().backward()
    assert weight.grad is not None and weight.grad != 0


@pytest.mark.parametrize("amplify,exits", [(False, [1, 1, 1]), (True, [3, 2, 3]), (True, [0, 1, 0])])
def test_lockstep_pads_to_one_sequence_and_keeps_values_and_gradients(distilled_pipe, amplify, exits):
    """ZeRO-3 lockstep (helios_train/backends/lockstep.py): with per-level pre-exit counts [3, 2, 3] every rank runs
    3 no-grad forwards then the exit forward per level, and backpropagates through all three exit forwards
    (input requiring grad each time); the chunk and the gradient are those of the plain rollout."""
    def run(lockstep):
        weight = torch.tensor(0.5, requires_grad=True)
        calls, backward_calls = [], []

        def fn(x, t):
            # under no_grad the input's flag changes nothing; with grad it decides which modules backward visits
            calls.append((torch.is_grad_enabled(), x.requires_grad and torch.is_grad_enabled()))
            v = x * weight
            if v.requires_grad:
                v.register_hook(lambda g: backward_calls.append(1))
            return v

        out = pyramid_rollout(fn, torch.randn(1, 4, 9, 8, 16, generator=torch.Generator().manual_seed(1)),
                              distilled_pipe.scheduler, [2, 2, 2], amplify, torch.Generator().manual_seed(0),
                              exit_steps=exits, lockstep=lockstep)
        out.x0.square().sum().backward()
        return out.x0.detach(), weight.grad, calls, len(backward_calls)

    x_plain, g_plain, _, _ = run(None)
    x_lock, g_lock, calls, backward_passes = run([3, 2, 3])
    torch.testing.assert_close(x_lock, x_plain, rtol=0, atol=0)
    torch.testing.assert_close(g_lock, g_plain)
    level = [(False, False)] * 3 + [(True, True)]
    assert calls == level + [(False, False)] * 2 + [(True, True)] + level  # the same on every rank
    assert backward_passes == 3


@pytest.mark.parametrize("amplified", [False, True])
def test_forward_count_is_known_before_the_rollout(amplified):
    """ZeRO-3 lockstep agrees on the count before sampling (helios_train/backends/lockstep.py): it must be the
    number of forwards the rollout then runs (4 per level for the amplified first chunk, else 2)."""
    from helios_train.algorithms.rollout import pyramid_rollout, rollout_forwards
    from helios_train.model.variants import make_scheduler

    scheduler = make_scheduler("distilled")
    planned = rollout_forwards(scheduler, (2, 2, 2), amplified)
    result = pyramid_rollout(lambda x, t: torch.zeros_like(x), torch.randn(1, 4, 9, 16, 32), scheduler, (2, 2, 2),
                             amplified, torch.Generator().manual_seed(0))
    assert planned == result.nfe == (12 if amplified else 6)
