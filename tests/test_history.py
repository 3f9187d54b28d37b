"""Tests for helios_train.algorithms.history (official helios/dataset/dataloader_history_latents_dist.py:prepare_stage1_latent,
helios/utils/utils_helios_base.py:prepare_stage1_clean_input_from_latents, helios/modules/transformer_helios.py)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import inspect

import pytest
import torch
from diffusers import HeliosTransformer3DModel

from helios_train.algorithms.history import HistoryConfig, assemble_history_sample
from helios_train.model.inputs import frame_indices, model_inputs, split_history, token_counts

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
            freq_dim=32, ffn_dim=64, num_layers=2, rope_dim=(4, 6, 6))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return HeliosTransformer3DModel(**TINY).eval()


def test_frame_index_layout():
    idx = frame_indices(HistoryConfig(), batch=2)
    assert idx["indices_hidden_states"].tolist() == [list(range(20, 29))] * 2
    assert idx["indices_latents_history_short"].tolist() == [[0, 19]] * 2
    assert idx["indices_latents_history_mid"].tolist() == [[17, 18]] * 2
    assert idx["indices_latents_history_long"].tolist() == [list(range(1, 17))] * 2
    # generic in sizes, and the listed order does not matter (sorted like the official code)
    other = frame_indices(HistoryConfig(history_sizes=[1, 8, 4], latent_window_size=5), batch=1)
    assert other["indices_latents_history_long"].tolist() == [list(range(1, 9))]
    assert other["indices_latents_history_mid"].tolist() == [[9, 10, 11, 12]]
    assert other["indices_latents_history_short"].tolist() == [[0, 13]]
    assert other["indices_hidden_states"].tolist() == [[14, 15, 16, 17, 18]]
    no_x0 = frame_indices(HistoryConfig(keep_x0=False), batch=1)
    assert no_x0["indices_latents_history_short"].tolist() == [[19]]


def test_split_history():
    x0 = torch.full((1, 2, 1, 3, 3), -1.0)
    history = torch.arange(19.0).view(1, 1, 19, 1, 1).expand(1, 2, 19, 3, 3)
    short, mid, long_ = split_history(x0, history, HistoryConfig())
    assert short.shape == (1, 2, 2, 3, 3) and mid.shape == (1, 2, 2, 3, 3) and long_.shape == (1, 2, 16, 3, 3)
    assert short[0, 0, :, 0, 0].tolist() == [-1.0, 18.0]
    assert mid[0, 0, :, 0, 0].tolist() == [16.0, 17.0]
    assert long_[0, 0, :, 0, 0].tolist() == [float(i) for i in range(16)]
    with pytest.raises(ValueError):
        split_history(x0, history[:, :, :18], HistoryConfig())


def test_model_inputs_match_forward_signature_and_run(tiny):
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 2, 4, 8, 12
    noisy = torch.randn(b, c, 9, h, w, generator=g)
    x0 = torch.randn(b, c, 1, h, w, generator=g)
    history = torch.randn(b, c, 19, h, w, generator=g)
    prompt = torch.randn(b, 7, 32, generator=g)
    inputs = model_inputs(noisy, x0, history, torch.tensor([500.0, 20.0]), prompt, HistoryConfig())
    params = set(inspect.signature(HeliosTransformer3DModel.forward).parameters) - {"self", "return_dict",
                                                                                   "attention_kwargs"}
    assert set(inputs) == params
    with torch.no_grad():
        out = tiny(**inputs, return_dict=False)[0]
    assert out.shape == (b, c, 9, h, w)
    assert torch.isfinite(out).all()
    # the history really reaches the model: changing it changes the prediction
    inputs2 = model_inputs(noisy, x0, history + 1.0, torch.tensor([500.0, 20.0]), prompt, HistoryConfig())
    with torch.no_grad():
        out2 = tiny(**inputs2, return_dict=False)[0]
    assert not torch.allclose(out, out2)


def test_token_counts_14b_geometry_on_meta():
    with torch.device("meta"):
        model = HeliosTransformer3DModel()  # default config = the 14B geometry (5120 wide, 40 blocks)
    assert model.patch_long.out_channels == 5120
    counts = token_counts(model, (48, 80), HistoryConfig())  # 384×640 pixels
    assert (counts["short"], counts["mid"], counts["long"]) == (1920, 240, 240)
    assert counts["history"] == 2400 and counts["noisy"] == 8640 and counts["total"] == 11040


def test_token_counts_match_the_sequence_the_model_builds(tiny):
    h, w = 10, 14  # not multiples of the mid/long kernels: exercises the replicate padding
    counts = token_counts(tiny, (h, w), HistoryConfig())
    seen = {}

    def grab(module, args):
        seen["n"] = args[0].shape[1]  # hidden_states entering the first block: [B, tokens, dim]

    hook = tiny.blocks[0].register_forward_pre_hook(grab)
    try:
        inputs = model_inputs(torch.zeros(1, 4, 9, h, w), torch.zeros(1, 4, 1, h, w), torch.zeros(1, 4, 19, h, w),
                              torch.tensor([10.0]), torch.zeros(1, 3, 32), HistoryConfig())
        with torch.no_grad():
            tiny(**inputs, return_dict=False)
    finally:
        hook.remove()
    assert seen["n"] == counts["total"]
    assert counts["noisy"] == 9 * 5 * 7 and counts["short"] == 2 * 5 * 7
    assert counts["mid"] == 1 * 3 * 4 and counts["long"] == 4 * 2 * 2  # ceil after padding


def _chunks(s=4, c=2, h=2, w=3):
    # value = 100·chunk + frame, identical over channels and pixels: easy to read back
    v = (100 * torch.arange(s).view(s, 1, 1, 1, 1) + torch.arange(9).view(1, 1, 9, 1, 1)).float()
    return v.expand(s, c, 9, h, w).clone()


def _frames(t):
    return t[0, :, 0, 0].tolist()  # channel 0, pixel (0,0), all frames


def test_assemble_history_sample_chunk0():
    x0, history, target = assemble_history_sample(_chunks(), 0, HistoryConfig())
    assert x0.shape == (2, 1, 2, 3) and history.shape == (2, 19, 2, 3) and target.shape == (2, 9, 2, 3)
    assert torch.count_nonzero(x0) == 0  # c = 0 is exactly T2V: no anchor
    assert torch.count_nonzero(history) == 0
    assert _frames(target) == [float(f) for f in range(9)]


def test_assemble_history_sample_chunk1():
    x0, history, target = assemble_history_sample(_chunks(), 1, HistoryConfig())
    assert x0[0, 0, 0, 0].item() == 0.0 and x0.shape == (2, 1, 2, 3)  # chunk 0 frame 0 = 0·100 + 0
    expected = [0.0] * 10 + [float(f) for f in range(9)]  # 10 zero-pad frames, then chunk 0
    assert _frames(history) == expected
    assert _frames(target) == [100.0 + f for f in range(9)]


def test_assemble_history_sample_chunk3():
    chunks = _chunks()
    chunks[0, :, 0] = 7.0  # make the anchor distinguishable from padding
    x0, history, target = assemble_history_sample(chunks, 3, HistoryConfig())
    assert torch.all(x0 == 7.0)  # anchor = first latent of chunk 0, even for chunk 3
    expected = [8.0] + [100.0 + f for f in range(9)] + [200.0 + f for f in range(9)]
    assert _frames(history) == expected
    assert _frames(target) == [300.0 + f for f in range(9)]
    # outputs do not alias the input
    history.zero_()
    assert chunks.abs().sum() > 0 and chunks[1].min() == 100.0
    with pytest.raises(IndexError):
        assemble_history_sample(chunks, 4, HistoryConfig())
