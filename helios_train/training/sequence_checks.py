"""The sequence-parallel rules checked before any work: the token counts of every transformer forward a run makes,
and whether a sequence degree splits them (the model itself refuses at its first forward, helios_train/model/sequence_parallel.py).

Both plans (helios_train/model/sequence_parallel.py) need the history and the noisy token counts to divide by
ulysses_degree × ring_degree — `split_once` gives each rank an equal share of each, diffusers' `per_branch`
splits the whole sequence (attn1, FFN) and the noisy tokens (attn2) — at every geometry the run meets: the
training latents, each pyramid level (Mid, Distilled), the GAN's crop (DMD) and the validation size. At 48×80 latents with history 16/2/1: 11040 / 8640 tokens at full size, 2940 / 540 at the lowest
pyramid level — 8 divides the first, not the second.
"""
from __future__ import annotations

from helios_train.algorithms.gan import crop_size
from helios_train.algorithms.pyramid import level_token_counts
from helios_train.backends.sequence_groups import check_world, degrees
from helios_train.config.run import latent_size
from helios_train.model import adapter_for

# diffusers attention backends whose context-parallel op cannot return the log-sum-exp on CUDA (on CPU the native
# backend gets it from torch's CPU flash kernel: helios_train/model/cpu_ring_attention.py)
NO_LOG_SUM_EXP = ("native", "_native_math", "_native_efficient")


def _geometries(cfg, model) -> dict[str, tuple[int, int]]:
    """{label: (latent height, width)} of the transformer forwards of the configured stage and validation."""
    out = {"training latents": latent_size(cfg.data)}
    if cfg.stage.name == "distilled" and cfg.stage.objective == "dmd" and cfg.stage.gan.enabled:
        out["GAN crop"] = crop_size(out["training latents"], float(cfg.stage.gan.crop_fraction),
                                    int(model.config.patch_size[1]))
    v = cfg.validation
    if v.every > 0 and v.height and v.width:
        out["validation"] = (int(v.height) // 8, int(v.width) // 8)
    return out


def forward_lengths(cfg, model) -> dict[str, tuple[int, int]]:
    """{forward: (whole sequence, noisy tokens)} for every distinct forward geometry of the run."""
    adapter = adapter_for(cfg.model)
    hist_cfg = cfg.stage.history
    pyramid = cfg.stage.name in ("mid", "distilled")
    out = {}
    for label, hw in _geometries(cfg, model).items():
        counts = adapter.token_counts(model, hw, hist_cfg)
        out[f"{label} {hw[0]}x{hw[1]}"] = (counts["total"], counts["noisy"])
        if pyramid and label != "GAN crop":  # the GAN scores full-level crops
            levels = level_token_counts(hw, int(hist_cfg.latent_window_size), patch=adapter.patch_size(model))
            for k, noisy in enumerate(levels[:-1]):
                out[f"{label} {hw[0]}x{hw[1]}, pyramid level {k}"] = (counts["history"] + noisy, noisy)
    return out


def indivisible(cfg, model, degree: int) -> list[str]:
    """The forwards whose token counts `degree` does not divide, described for an error message."""
    return [f"{name}: {total} tokens ({noisy} noisy)" for name, (total, noisy) in forward_lengths(cfg, model).items()
            if total % degree or noisy % degree]


def check_sequence_split(cfg, world_size: int, device_type: str) -> None:
    """Every rule of `launcher.ulysses_degree` / `ring_degree` that the config, the world size and the model's
    config.json decide (ValueError naming the key, the numbers and the fix); nothing is loaded."""
    from helios_train.model.sequence_parallel import check_model

    check_world(cfg.launcher, world_size, device_type)
    ring, ulysses = degrees(cfg.launcher)
    if ring * ulysses == 1:
        return
    if ring > 1 and device_type == "cuda" and str(cfg.model.attention_backend) in NO_LOG_SUM_EXP:
        raise ValueError(f"launcher.ring_degree={ring} on CUDA with model.attention_backend="
                         f"{cfg.model.attention_backend}: ring attention merges the ranks' partial attention by their "
                         "log-sum-exp, which this backend does not return; set model.attention_backend=flash, "
                         "_flash_3 or _native_cudnn")
    if cfg.stage.name == "mid" and cfg.stage.pyramid.execution == "packed":
        raise ValueError("stage.pyramid.execution=packed with sequence parallelism: the packed forward runs its own "
                         "attention over segment boundaries, which the sequence split does not cover; use "
                         "stage.pyramid.execution=separate or batch_levels")
    model = adapter_for(cfg.model).meta_model(cfg.model)
    check_model(model, ring, ulysses, cfg.launcher.sequence_plan)
    bad = indivisible(cfg, model, ring * ulysses)
    if bad:
        raise ValueError(f"launcher.ulysses_degree={ulysses} x launcher.ring_degree={ring} = {ring * ulysses} does not "
                         f"divide the token counts of these forwards: {'; '.join(bad)}. Choose a degree that "
                         "divides them, or another resolution (data.latent_height/width, validation.height/width)")
