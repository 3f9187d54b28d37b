"""The planner's activation model: peak transient bytes of each phase of a training step, from the
token counts of its forwards and coefficients measured by the dry run (helios_train/planning/dry_run.py).

A phase (one role's losses, backward and optimizer step) runs transformer forwards *with* grad, whose
graphs wait for the phase's backward, forwards *without* grad (DMD's teacher / critic scores), and —
with the GAN — a critic forward backpropagated to its input only inside the loss (L_G). Per token and
hidden unit (D), bf16 activations (fp32: ×2), L blocks:

  saved        OUTSIDE_BLOCKS + SAVED_PER_BLOCK·L   per grad forward with gradient checkpointing (every
               (off: OUTSIDE_BLOCKS + FULL_BLOCK·L)  recipe): each block keeps its bf16 input, plus the
                                                    embedding / time / RoPE tensors outside the blocks
  backward     BACKWARD                             the transient of backpropagating one forward (a block
                                                    recomputed, the gradients flowing through it)
  no-grad      NO_GRAD_BASE + NO_GRAD_PER_BLOCK·L   a forward's transient without grad

The backward visits the graphs in reverse order of creation; the first one visited creates the role's
.grad tensors (G, fp32; 0 under ZeRO, which reduces them into its partition as they arrive). Phase peak =
  max( S_all + B(last)                               start of the backward
       S(g_1..g_j) + B(g_j) + G   for each later g_j  the earlier graphs, after the first visited
       S_all + S_in + B(in)                           the input-only backward inside the loss (GAN L_G)
       S_all + N(largest no-grad forward) )           a score forward while the graphs wait
with S(g) = saved·tokens·batch·D, B(g) = backward·tokens·batch·D, N = no-grad·tokens·batch·D.

Coefficients: dry runs of the 14B geometry at 48×80 latents, bf16: stage_1_init at batch 2 and 1, 40 and
4 blocks, checkpointing on and off; single forwards with and without grad at 4 and 8 blocks. The README's
"Will it fit?" table compares this model with the dry run for every official recipe.

Sequence parallelism (degree N = launcher.ulysses_degree × ring_degree > 1): dry runs of one rank of a
simulated group (stage_1_init, 14B width, 4 and 8 blocks, N = 2, 4, 8, checkpointing on and off). Everything
outside the blocks (embeddings, modulation, RoPE) stays whole on every rank. Per plan:
  split_once   the residual stream is split: saved per block SAVED_PER_BLOCK / N (FULL_BLOCK / N without
               checkpointing; measured 0.99 / 0.53 and 51.8 / 26.3 at N = 2 / 4); a block's backward
               transient SPLIT_ONCE_BACKWARD[N] (measured 91.4 / 57.0 / 46.5 at N = 2 / 4 / 8; linear in
               1/N between the measured degrees, the last segment's slope beyond them)
  per_branch   diffusers' plan splits only inside attn1 / attn2 / FFN: saved block inputs stay whole
               (2.01 per block at every N); backward SP_BACKWARD + SP_BACKWARD_SPLIT / N (measured 115.6 /
               103.3 / 97.7); full block FULL_BLOCK · (SP_FULL_SHARED + (1 − SP_FULL_SHARED) / N)
  no-grad      NO_GRAD_BASE scaled as the backward is — not measured on its own; the DMD dry run at N = 2
               checks the phase peaks it enters
(At N = 1 there are no all-to-all / gather buffers, so its backward is not on either curve.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from helios_train.algorithms.gan import crop_size
from helios_train.config.run import latent_size

OUTSIDE_BLOCKS = 12.2
SAVED_PER_BLOCK = 2.0
FULL_BLOCK = 113.2
BACKWARD = 150.5
NO_GRAD_BASE = 75.0
NO_GRAD_PER_BLOCK = 1.1
SP_BACKWARD = 92.1
SP_BACKWARD_SPLIT = 44.8
SP_FULL_SHARED = 0.564
SPLIT_ONCE_BACKWARD = {2: 91.4, 4: 57.0, 8: 46.5}


@dataclass
class Phase:
    """The forwards of one phase, as (tokens, batch) pairs in creation order, and its role's trainable count."""

    grad: list[tuple[int, int]]
    no_grad: list[tuple[int, int]] = field(default_factory=list)
    input_only: list[tuple[int, int]] = field(default_factory=list)  # backpropagated to their input in the loss
    trainable: int = 0


def latent_hw(cfg) -> tuple[int, int]:
    return latent_size(cfg.data)


def _gan_crop_hw(cfg, model) -> tuple[int, int]:
    """The GAN's spatial crop (helios_train/algorithms/gan.py crop_size) of the full latent size."""
    return crop_size(latent_hw(cfg), float(cfg.stage.gan.crop_fraction), int(model.config.patch_size[1]))


def phases(cfg, model, trainable: dict[str, int]) -> dict[str, Phase]:
    """The phases of one step of the configured stage (helios_train/stages/), with their forwards."""
    from helios_train.model.inputs import token_counts
    from helios_train.algorithms.pyramid import level_token_counts

    hist_cfg, b = cfg.stage.history, int(cfg.data.batch_size)
    counts = token_counts(model, latent_hw(cfg), hist_cfg)
    hist, full = counts["history"], counts["total"]
    levels = level_token_counts(latent_hw(cfg), int(hist_cfg.latent_window_size),
                                patch=tuple(model.config.patch_size))
    name = cfg.stage.name
    if name == "base":
        return {"generator": Phase([(full, b)], trainable=trainable["generator"])}
    if name == "mid":
        ratios, execution = list(cfg.stage.pyramid.sample_ratios), cfg.stage.pyramid.execution
        if execution == "packed":  # one forward over every segment, each with its own history copy
            grad = [(sum(r * (hist + n) for n, r in zip(levels, ratios)), b)]
        elif execution == "batch_levels":  # same-level segments stacked on the batch axis
            grad = [(hist + n, b * r) for n, r in zip(levels, ratios) if r]
        else:
            grad = [(hist + n, b) for n, r in zip(levels, ratios) for _ in range(r)]
        return {"generator": Phase(grad, trainable=trainable["generator"])}
    if cfg.stage.objective == "ode":  # every (chunk, level) term's forward before one backward
        grad = [(hist + n, b) for _ in range(int(cfg.stage.ode.num_chunks)) for n in levels]
        return {"generator": Phase(grad, trainable=trainable["generator"])}
    rollout = [(hist + n, b) for n in levels]  # one exit forward with grad per pyramid level
    # The generator's teacher / critic scores run without grad while its rollout graph waits; the
    # critic's sample rollout runs without grad before anything is saved (never the peak).
    gen = Phase(rollout, no_grad=[(full, b)], trainable=trainable["generator"])
    critic = Phase([(full, b)], trainable=trainable["critic"])
    if cfg.stage.gan.enabled:
        crop = token_counts(model, _gan_crop_hw(cfg, model), hist_cfg)["total"]
        gen.input_only.append((crop, b))  # L_G through the critic: only ∂L_G/∂x, inside the generator's loss
        critic.grad.append((crop, 3 * b))  # [fake, real, perturbed real] in one forward
    return {"generator": gen, "critic": critic}


def _split_once_backward(n: int) -> float:
    """SPLIT_ONCE_BACKWARD at degree n: linear in 1/n between measured degrees (docstring)."""
    known = sorted(SPLIT_ONCE_BACKWARD)
    if n in SPLIT_ONCE_BACKWARD:
        return SPLIT_ONCE_BACKWARD[n]
    lo, hi = ([k for k in known if k < n][-1], next((k for k in known if k > n), None))
    if hi is None:
        lo, hi = known[-2], known[-1]
    y_lo, y_hi = SPLIT_ONCE_BACKWARD[lo], SPLIT_ONCE_BACKWARD[hi]
    return y_hi + (y_lo - y_hi) * (1 / n - 1 / hi) / (1 / lo - 1 / hi)


def coefficients(checkpointing: bool, sequence_degree: int = 1, plan: str = "split_once") -> tuple[float, float, float]:
    """(saved per block, backward, no-grad base) per token and hidden unit at a sequence degree (docstring)."""
    n = sequence_degree
    if n == 1:
        return (SAVED_PER_BLOCK if checkpointing else FULL_BLOCK), BACKWARD, NO_GRAD_BASE
    if plan == "split_once":
        backward = _split_once_backward(n)
        block = (SAVED_PER_BLOCK if checkpointing else FULL_BLOCK) / n
    else:
        backward = SP_BACKWARD + SP_BACKWARD_SPLIT / n
        block = SAVED_PER_BLOCK if checkpointing else FULL_BLOCK * (SP_FULL_SHARED + (1 - SP_FULL_SHARED) / n)
    return block, backward, NO_GRAD_BASE * backward / BACKWARD


def phase_peak(phase: Phase, model, checkpointing: bool, act_bytes: int = 2,
               grads_transient: bool = True, sequence_degree: int = 1, plan: str = "split_once") -> dict[str, float]:
    """Peak transient bytes of a phase on one rank: {"activations", "gradients"} at the peak (module docstring)."""
    c = model.config
    d, layers = c.num_attention_heads * c.attention_head_dim, c.num_layers
    scale = d * act_bytes / 2
    block, backward_coef, no_grad_base = coefficients(checkpointing, sequence_degree, plan)
    saved_coef = OUTSIDE_BLOCKS + block * layers

    def saved(forwards):
        return scale * saved_coef * sum(t * n for t, n in forwards)

    def backward(forward):
        return scale * backward_coef * forward[0] * forward[1]

    grads = 4.0 * phase.trainable if grads_transient else 0.0
    all_saved = saved(phase.grad)
    candidates = []  # (activations, gradients) at each candidate peak
    alive = all_saved
    for i, g in enumerate(reversed(phase.grad)):
        candidates.append((alive + backward(g), 0.0 if i == 0 else grads))
        alive -= saved([g])
    for g in phase.input_only:
        candidates.append((all_saved + saved([g]) + backward(g), 0.0))
    if phase.no_grad:
        largest = max(t * n for t, n in phase.no_grad)
        candidates.append((all_saved + scale * (no_grad_base + NO_GRAD_PER_BLOCK * layers) * largest, 0.0))
    act, g = max(candidates, key=lambda x: x[0] + x[1])
    return {"activations": act, "gradients": g}
