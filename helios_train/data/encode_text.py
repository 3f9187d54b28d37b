"""Text prompts → prompt-embedding shards (official tools/offload_data/get_text-embedding.py), for text-only data.

    python -m data_prep.encode_text --prompts prompts.txt --out text/ --model /weights/helios [--per-shard 1000]

One prompt per line; sample key `<txt stem>_<line:05d>`; members `prompt_embed.npy` float32
[L, D] (zero rows after the prompt) and `json` {"caption"}. Shards are written by helios_train/data/shard_writer.py:
a re-run keeps a shard only while its prompts, the text encoder and the options are unchanged.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from helios_train.data.encode_latents import _npy
from helios_train.data.shard_writer import ShardWriter, folder_fingerprint, run_tool, text_fingerprint


def encode_text(prompts_file, out_dir, model_dir, per_shard=1000, batch_size=16, device="cpu",
                text_max_length=512) -> dict:
    from transformers import AutoTokenizer, UMT5EncoderModel

    from helios_train.model.text_codec import encode_prompts
    from helios_train.runtime.prompt_file import read_prompt_lines

    prompts_file = Path(prompts_file)
    lines = read_prompt_lines(prompts_file, "--prompts")  # fails naming the file before any model loads
    items = [(f"{prompts_file.stem}_{i:05d}", p) for i, p in lines]
    groups = [items[i : i + per_shard] for i in range(0, len(items), per_shard)]
    options = {"per_shard": per_shard, "text_max_length": text_max_length,
               "model": folder_fingerprint(Path(model_dir) / "text_encoder")}
    writer = ShardWriter(out_dir, "encode_text", options)
    tok = enc = None
    bar = tqdm(total=len(items), desc="prompts", unit="prompt")
    for index, group in enumerate(groups):
        name, inputs = f"text-{index:06d}.tar", text_fingerprint(group)  # the shard's keys and prompt text
        if writer.up_to_date(name, inputs):
            bar.update(len(group))
            continue
        if enc is None:
            tok = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
            enc = UMT5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder").to(device).eval()
        with writer.shard(name, inputs) as sink:
            for i in range(0, len(group), batch_size):
                part = group[i : i + batch_size]
                embeds = encode_prompts(tok, enc, [p for _, p in part], max_length=text_max_length, device=device)
                for (key, prompt), emb in zip(part, embeds):
                    sink.write({"__key__": key, "prompt_embed.npy": _npy(emb.cpu().numpy().astype(np.float32)),
                                "json": json.dumps({"caption": prompt}).encode()})
                bar.update(len(part))
    bar.close()
    total_lines = len(prompts_file.read_text().splitlines())
    return {**writer.finish(), "blank_lines": total_lines - len(items)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", required=True, help="diffusers-layout folder with text_encoder/ and tokenizer/")
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--text-max-length", type=int, default=512)
    a = ap.parse_args(argv)
    run_tool(lambda: encode_text(a.prompts, a.out, a.model, a.per_shard, device=a.device,
                                 text_max_length=a.text_max_length))


if __name__ == "__main__":
    main()
