"""Progress for the long sampling phases: one bar step per generated 33-frame chunk.

The Helios pipelines (diffusers `HeliosPipeline` / `HeliosPyramidPipeline`) show a bar for each chunk's
denoising steps, then decode that chunk with the VAE without a word — about 90 s per prompt at
384×640 on a CPU, minutes for a long video. `chunk_progress` counts the chunks by watching the VAE's
`decode` (the pipeline calls it once per chunk, after the chunk's last step) and names the decode on the
bar while it runs, so a validation or inference run always shows where it is and how much is left.
"""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def chunk_progress(vae, bar):
    """While active, every `vae.decode` call shows "VAE decode" on `bar` and advances it by one chunk."""
    had_own = "decode" in vae.__dict__  # an instance-level decode (a hook) is put back as it was
    original = vae.decode

    def decode(*args, **kwargs):
        bar.set_postfix_str("VAE decode", refresh=True)
        out = original(*args, **kwargs)
        bar.set_postfix_str("", refresh=False)
        bar.update(1)
        return out

    vae.decode = decode
    try:
        yield bar
    finally:
        if had_own:
            vae.decode = original
        else:
            del vae.decode
