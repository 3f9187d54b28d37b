"""Build a tiny random Helios checkpoint in diffusers layout, so the 14B loading code runs on a laptop.

    python -m data_prep.toy_checkpoint --out checkpoints/_toy/model [--seed 0] [--spec toy|helios_14b_shape]

Specs (`SPECS`): `toy` — the smallest model that runs every code path (4 latent channels, head_dim 16);
`helios_14b_shape` — the Helios-14B config.json scaled down in width and depth only: the same head_dim
(128) and RoPE split (44, 42, 42), patch (1, 2, 2), memory patches, 16 latent channels, FFN / width
ratio (13824 / 5120 = 2.7) and freq_dim (256); 2 heads, 2 blocks, text_dim 64 (UMT5 width to match), a
16-channel VAE. Production settings that depend on the architecture (patch geometry, RoPE, latent
channels, GAN taps, token counts) are then exercised on CPU at toy cost (`model=helios_14b_shape`).

Writes transformer/, vae/, text_encoder/, tokenizer/, scheduler/ and model_index.json with the real
diffusers/transformers classes at tiny sizes; `HeliosPipeline.from_pretrained(out)` loads it unchanged.
The tokenizer is trained here from local text (toy caption vocabulary + Wan's negative prompt).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from helios_train.model.variants import NEGATIVE_PROMPT

TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
                   freq_dim=32, ffn_dim=64, num_layers=2, rope_dim=(4, 6, 6))
VAE = dict(base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
           latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
SHAPE_14B = dict(num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=64,
                 freq_dim=256, ffn_dim=692, num_layers=2, rope_dim=(44, 42, 42))
# The miniature (helios_train/data/miniature_assets.py): a 7 M-parameter Helios sized to learn in CPU minutes at
# 8×8 latents (64×64 pixels), 16 latent channels as Wan's; no memory patches, like a Wan2.1 folder: stage=t2v
# pretrains it, stage=base then adds them. Its VAE is trained on the miniature's clips after this build.
MINIATURE = dict(num_attention_heads=8, attention_head_dim=32, in_channels=16, out_channels=16, text_dim=64,
                 freq_dim=64, ffn_dim=768, num_layers=6, rope_dim=(8, 12, 12), has_multi_term_memory_patch=False)
SPECS = {
    "toy": {"transformer": TRANSFORMER, "vae": VAE},
    "miniature": {"transformer": MINIATURE,
                  "vae": {**VAE, "z_dim": 16, "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}},
    "helios_14b_shape": {"transformer": SHAPE_14B,
                         "vae": {**VAE, "z_dim": 16, "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}},
}


def build_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   padding_side="right", model_max_length=512)


def build_toy_checkpoint(out_dir, seed: int = 0, spec: str = "toy") -> Path:
    from diffusers import AutoencoderKLWan, HeliosScheduler, HeliosTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from helios_train.data import miniature_world, toy_videos

    if spec not in SPECS:
        raise ValueError(f"toy spec {spec!r}: expected one of {sorted(SPECS)}")
    transformer, vae = SPECS[spec]["transformer"], SPECS[spec]["vae"]
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # fork_rng: seeding here must not reset the caller's global RNG stream (tests, training).
        with torch.random.fork_rng(devices=[]):
            # One seed per component, so adding a component later cannot change the others' weights.
            torch.manual_seed(seed)
            HeliosTransformer3DModel(**transformer).save_pretrained(tmp / "transformer")
            torch.manual_seed(seed + 1)
            AutoencoderKLWan(**vae).save_pretrained(tmp / "vae")
            world = miniature_world if spec == "miniature" else toy_videos  # the captions it will read
            tokenizer = build_tokenizer(world.caption_vocabulary() + [NEGATIVE_PROMPT])
            tokenizer.save_pretrained(tmp / "tokenizer")
            torch.manual_seed(seed + 2)
            # d_model = the DiT's text_dim, as UMT5-XXL's 4096 matches Helios' text_dim.
            text_cfg = UMT5Config(vocab_size=len(tokenizer), d_model=transformer["text_dim"], d_kv=8, d_ff=64,
                                  num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                  decoder_start_token_id=tokenizer.pad_token_id)
            UMT5EncoderModel(text_cfg).save_pretrained(tmp / "text_encoder")
        # Base sampling (official HeliosPipeline.__call__ / HeliosScheduler.set_timesteps in
        # helios/diffusers_version/): HeliosPipeline calls
        # set_timesteps(N, sigmas=linspace(0.999, 0, N+1)[:-1], mu=calculate_shift(L)) without a stage
        # index, which only the single-stage path accepts (stages=1); UniPC; the pipeline's mu is
        # only used with use_dynamic_shifting=True, and Base validation/inference shift exponentially.
        HeliosScheduler(stages=1, stage_range=[0, 1], scheduler_type="unipc", shift=1.0, use_dynamic_shifting=True,
                        time_shift_type="exponential").save_pretrained(tmp / "scheduler")
        index = {
            "_class_name": "HeliosPipeline",
            "_diffusers_version": __import__("diffusers").__version__,
            "scheduler": ["diffusers", "HeliosScheduler"],
            "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "transformer": ["diffusers", "HeliosTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLWan"],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # a half-built folder is never visible under its final name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (diffusers layout)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spec", choices=sorted(SPECS), default="toy")
    args = ap.parse_args()
    print(f"wrote {build_toy_checkpoint(args.out, args.seed, args.spec)}")


if __name__ == "__main__":
    main()
