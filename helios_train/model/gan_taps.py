"""Where the GAN discriminator reads the critic (official `stage_3_post_gan_version.yaml`, `_critic_loss` /
`_generator_loss`): the heads (helios_train/algorithms/gan.py) attached to the Helios transformer, the
hidden states of its noisy tokens tapped after chosen blocks, and one critic forward that returns the logits.

Noisy-token layout in diffusers' ``HeliosTransformer3DModel.forward`` (diffusers 0.42): the noisy chunk
is patch-embedded and flattened first (``hidden_states.flatten(2).transpose(1, 2)``, so token order is
t-major, then h, then w), then each history term is *prepended*
(``torch.cat([latents_history_short, hidden_states], dim=1)``, then mid, then long), giving
``[long | mid | short | noisy]``; every block gets ``original_context_length`` = the noisy token count,
and ``HeliosOutputNorm`` keeps ``hidden_states[:, -original_context_length:]``. So the noisy tokens are
the *last* ``original_context_length`` tokens of every block's output, on the grid of the
``patch_embedding`` output [B, D, T', h', w'].
"""
from __future__ import annotations

import torch
from torch import nn

from helios_train.algorithms.gan import DiscriminatorHeads, GanConfig
from helios_train.model.fake_weights import same_mode_as


def unwrap(model: nn.Module) -> nn.Module:
    """The transformer inside a DDP / DeepSpeed-engine wrapper (both keep it as `.module`)."""
    # A registered submodule named "module" (not attribute lookup: DeepSpeedEngine forwards unknown
    # attributes such as `blocks` to the wrapped model).
    while isinstance(model._modules.get("module"), nn.Module):
        model = model._modules["module"]
    return model


def attach_gan_heads(transformer: nn.Module, cfg: GanConfig) -> DiscriminatorHeads:
    """Create the heads (fp32, trainable) and register them as `transformer.gan_heads`.

    Being a submodule, they are part of the critic's `parameters()` / `named_parameters()` — the
    optimizer, DDP/DeepSpeed and the by-name checkpoint of trainables pick them up — and they move
    with `.to(device)`. The stock forward never calls them, so the normal velocity is unchanged.
    Call AFTER the critic's LoRA is added (`apply_trainable_policy`): that policy freezes the whole
    module and LoRA-wraps every Linear it finds, which must not include the heads. Plain Conv/Linear
    modules are not PEFT tuner layers, so `disable_adapters()` (the teacher pass) leaves them alone.
    """
    model = unwrap(transformer)
    if hasattr(model, "gan_heads"):
        raise ValueError("the transformer already has gan_heads")
    ref = next(model.parameters())
    with same_mode_as(model):  # fake heads on a fake (dry-run) critic
        heads = DiscriminatorHeads.for_transformer(model, cfg).to(device=ref.device, dtype=torch.float32)
    heads.requires_grad_(True)
    model.add_module("gan_heads", heads)
    return heads


def noisy_tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Block output [B, L, D] → its last T'·h'·w' (noisy) tokens as [B, D, T', h', w']."""
    t, h, w = grid
    n = t * h * w
    return tokens[:, -n:].unflatten(1, (t, h, w)).permute(0, 4, 1, 2, 3)


class NoisyHiddenStateTap:
    """Collects the noisy-token hidden states after chosen blocks during one transformer forward.

    Why pre-hooks on the *consumer* of block i (block i+1, or `norm_out` after the last block) rather
    than a forward hook on block i: the consumer receives exactly the tensor the forward loop holds,
    i.e. the output of gradient checkpointing, which carries autograd history with either checkpoint
    flavour (inside a reentrant checkpoint a block's own output has none). The noisy grid comes from a
    forward hook on `patch_embedding` (its output is [B, D, T', h', w']), so nothing is hard-coded.
    The first capture of a forward wins: recomputation of checkpointed blocks during a backward that
    runs while the tap is still open does not overwrite it.
    """

    def __init__(self, transformer: nn.Module, block_indices: list[int]):
        self.model = unwrap(transformer)
        self.block_indices = list(block_indices)
        n = len(self.model.blocks)
        if any(i < 0 or i >= n for i in self.block_indices):
            raise ValueError(f"tap blocks {self.block_indices} outside [0, {n - 1}]")
        self.forwards = 0
        self.grid: tuple[int, int, int] | None = None
        self._captured: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def _on_patch(self, module, args, output):
        self.forwards += 1  # patch_embedding runs once per transformer forward, never in a recompute
        self.grid = tuple(int(s) for s in output.shape[2:])
        self._captured = {}

    def _consumer_hook(self, index: int, context_arg: int, between_blocks: bool):
        def hook(module, args, kwargs):
            if index in self._captured or self.grid is None:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            context = args[context_arg] if len(args) > context_arg else kwargs.get("original_context_length")
            t, h, w = self.grid
            if context is not None and int(context) != t * h * w:
                raise RuntimeError(f"noisy token count {int(context)} != patch grid {self.grid}")
            if between_blocks:  # under sequence parallelism a block hands the next only this rank's tokens
                # (imported here: diffusers' hook machinery would load with every `import helios_train.config`)
                from helios_train.model.sequence_parallel import full_sequence

                hidden = full_sequence(self.model, hidden, t * h * w)
            self._captured[index] = noisy_tokens_to_grid(hidden, self.grid)
        return hook

    def __enter__(self) -> "NoisyHiddenStateTap":
        m = self.model
        self._handles.append(m.patch_embedding.register_forward_hook(self._on_patch))
        last = len(m.blocks) - 1
        for i in self.block_indices:
            # block(hidden, text, temb, rotary_emb, original_context_length); norm_out(hidden, temb, context)
            consumer, ctx_arg = (m.blocks[i + 1], 4) if i < last else (m.norm_out, 2)
            self._handles.append(consumer.register_forward_pre_hook(self._consumer_hook(i, ctx_arg, i < last),
                                                                    with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def features(self) -> list[torch.Tensor]:
        missing = [i for i in self.block_indices if i not in self._captured]
        if missing:
            raise RuntimeError(f"no hidden states captured for blocks {missing} (did the forward run?)")
        return [self._captured[i] for i in self.block_indices]


def tap_noisy_hidden_states(transformer: nn.Module, block_indices: list[int]) -> NoisyHiddenStateTap:
    """Context manager: `with tap_noisy_hidden_states(model, idx) as tap: model(...)`; then `tap.features`."""
    return NoisyHiddenStateTap(transformer, block_indices)


def critic_gan_logits(transformer: nn.Module, heads: DiscriminatorHeads | None,
                      call_model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The critic in gan mode: logits [B, n_heads] for the noisy latents `x` [B, C, T, H, W].

    `call_model(x)` runs ONE forward of the critic with `return_dict=False` (history, prompt and
    timestep bound by the caller, possibly through a DDP / DeepSpeed wrapper) and returns its output.
    `heads` defaults to `transformer.gan_heads`.

    Why the heads run in a forward hook of the inner transformer instead of after `call_model`: so
    that they run *inside* the wrapper's forward and their logits are appended to the output tuple
    the wrapper sees. DDP only accepts parameters used in its forward's output graph (a head applied
    outside fails in backward with "marked ready twice" / unused-parameter errors); the extra tuple
    element is ignored by callers that take `[0]`.
    """
    model = unwrap(transformer)
    heads = model.gan_heads if heads is None else heads
    box: dict[str, torch.Tensor] = {}

    def run_heads(module, args, output):
        if "logits" in box:
            return None
        velocity = output[0] if isinstance(output, tuple) else output.sample
        box["logits"] = heads(tap.features, velocity)
        return (*output, box["logits"]) if isinstance(output, tuple) else None

    with tap_noisy_hidden_states(model, heads.block_indices) as tap:
        handle = model.register_forward_hook(run_heads)
        try:
            call_model(x)
        finally:
            handle.remove()
    if tap.forwards != 1 or "logits" not in box:
        raise RuntimeError(f"call_model ran {tap.forwards} transformer forwards; gan mode needs exactly one")
    return box["logits"]
