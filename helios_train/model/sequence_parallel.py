"""Sequence parallelism of the Helios transformer (Ulysses / ring attention) through diffusers' context-parallel
machinery, with gradients exact for training. The trainer applies it to every role's transformer when
`launcher.ulysses_degree` × `launcher.ring_degree` > 1 (helios_train/backends/sequence_groups.py forms the mesh);
`launcher.sequence_plan` picks where the sequence is split:

- `split_once` (default): each rank holds its share of the history tokens and its share of the noisy tokens
  from the first block to the last — [history_r | noisy_r], so the block's own history / noisy split, its
  cross-attention on the noisy tokens and `is_amplify_history`'s key scaling stay local — and attention
  runs Ulysses / ring through diffusers' attention dispatch (the processors' `_parallel_config`, as
  `enable_parallelism` sets it). The last block's output is gathered back to the model's order for
  `norm_out` / `proj_out`. So the residual stream, and with it the block inputs gradient checkpointing
  saves, is divided by the degree (the same idea as vllm-omni's Helios USP for inference).
- `per_branch`: diffusers' own `HeliosTransformer3DModel._cp_plan`, which splits the sequence on the way into
  every block's attn1, attn2 and ffn and gathers it on the way out; the residual stream stays whole on every
  rank (less memory saved, three gathers a block more traffic). Kept for comparison with diffusers' inference
  plan. Two things stop that plan from training as shipped (diffusers 0.42), both fixed here: its gather's
  backward returns the local slice of the incoming gradient (`AllGatherFunction`,
  diffusers/hooks/context_parallel.py), so no sum or mean over the sequence ranks recovers the gradients of
  the parameters between branches (patch embedding, condition embedder, modulation tables, norms); and its
  output entries name blocks 0..39, so another depth fails (fewer) or breaks (more).

Every gather here is `ExactAllGather`, whose backward is the adjoint reduce-scatter (sum): every rank
back-propagates the same loss through an exact distributed graph, the sequence ranks' gradients sum to
degree × the one-process gradient, and a mean over all data × sequence ranks (plain DDP / ZeRO on the world
group) is the one-process data-parallel mean (tests/test_sequence_parallel.py). On CPU-only torch
`enable_parallelism` divides by the accelerator count (0), so its set-up is done here directly. Ring attention
needs an attention kernel that returns the log-sum-exp: on CUDA the flash / cuDNN backends (`model.attention_backend`),
on CPU torch's CPU flash kernel behind the native backend (helios_train/model/cpu_ring_attention.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.context_parallel import apply_context_parallel
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

from helios_train.config.errors import UserError

GATHER_HOOK = "helios_sequence_gather"
SPLIT_HOOK = "helios_sequence_split_once"
PLANS = ("split_once", "per_branch")
# torch 2.13 renamed the tensor collectives (the old names warn on every call); older torch has only the old ones
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class ExactAllGather(torch.autograd.Function):
    """All-gather along `dim` over `group`; backward = reduce-scatter (sum) of the gradient, its adjoint."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        world = dist.get_world_size(group)
        moved = tensor.movedim(dim, 0).contiguous()
        out = moved.new_empty((world * moved.shape[0], *moved.shape[1:]))
        _all_gather(out, moved, group=group)
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        moved = grad.movedim(ctx.dim, 0).contiguous()
        out = moved.new_empty((moved.shape[0] // world, *moved.shape[1:]))
        _reduce_scatter(out, moved, op=dist.ReduceOp.SUM, group=ctx.group)
        return out.movedim(0, ctx.dim), None, None


class SequenceLengthError(UserError, ValueError):
    pass


class ExactGatherHook(ModelHook):
    """Gathers a module's (sequence-split) output with `ExactAllGather` (diffusers' hook registry). Registered
    after diffusers' split hook, so it runs first: a length the degree does not divide is refused here with
    its module and numbers (diffusers' split only asserts, and the assert vanishes under `python -O`)."""

    def __init__(self, name: str, dim: int, group):
        super().__init__()
        self.name, self.dim, self.group = name, dim, group

    def pre_forward(self, module, *args, **kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        n = dist.get_world_size(self.group)
        if hidden.shape[self.dim] % n:
            raise SequenceLengthError(
                f"{self.name}: a sequence of {hidden.shape[self.dim]} tokens cannot be split over {n} ranks "
                f"(launcher.ulysses_degree x launcher.ring_degree); choose a degree that divides every forward's "
                "token counts (the start-up check names the forwards), or another resolution / history layout")
        return args, kwargs

    def post_forward(self, module, output):
        return ExactAllGather.apply(output, self.dim, self.group)


def _modules(root: torch.nn.Module, key: str) -> list[torch.nn.Module]:
    """The modules a plan key names; one `*` stands for every entry of a ModuleList."""
    if "*" not in key:
        return [root.get_submodule(key)]
    head, tail = (part.strip(".") for part in key.split("*", 1))
    return [m.get_submodule(tail) if tail else m for m in root.get_submodule(head)]


def split_plan(transformer: torch.nn.Module) -> dict:
    """The input-splitting entries of the model's own context-parallel plan (the gathers are ours)."""
    plan = getattr(type(transformer), "_cp_plan", None)
    if not plan:
        raise ValueError(f"{type(transformer).__name__} has no context-parallel plan (_cp_plan)")
    return {key: spec for key, spec in plan.items() if isinstance(spec, dict)}


class HistoryNoisyLayout:
    """Rank r's tokens under `split_once`: the r-th N-th of the history tokens, then the r-th N-th of the noisy
    ones (the model's sequence is [history | noisy], `original_context_length` = noisy tokens)."""

    def __init__(self, group):
        self.group, self.n, self.rank = group, dist.get_world_size(group), dist.get_rank(group)

    def check(self, where: str, total: int, noisy: int) -> None:
        if (total - noisy) % self.n or noisy % self.n:
            raise SequenceLengthError(
                f"{where}: {total} tokens ({total - noisy} history, {noisy} noisy) cannot be split over {self.n} "
                "ranks (launcher.ulysses_degree x launcher.ring_degree); choose a degree that divides both, or "
                "another resolution / history layout")

    def local(self, x: torch.Tensor, noisy: int, dim: int = 1) -> torch.Tensor:
        history = x.shape[dim] - noisy
        h, c = history // self.n, noisy // self.n
        return torch.cat([x.narrow(dim, self.rank * h, h), x.narrow(dim, history + self.rank * c, c)], dim)

    def full(self, x: torch.Tensor, noisy: int, dim: int = 1) -> torch.Tensor:
        """Every rank's [history_r | noisy_r] gathered (exact backward) back into [history | noisy]."""
        c = noisy // self.n
        h = x.shape[dim] - c
        parts = ExactAllGather.apply(x, dim, self.group).split(h + c, dim)
        return torch.cat([p.narrow(dim, 0, h) for p in parts] + [p.narrow(dim, h, c) for p in parts], dim)


class SplitOnceBlockHook(ModelHook):
    """On every block: its inputs cut to this rank's tokens (the hidden states only where they arrive whole, i.e.
    block 0; the per-token modulation and RoPE, which the forward loop hands every block whole, each time,
    inside the block so a checkpointed block saves no copy); the last block's output gathered back."""

    def __init__(self, layout: HistoryNoisyLayout, index: int, last: bool):
        super().__init__()
        self.layout, self.index, self.last = layout, index, last
        self._noisy: int | None = None

    def pre_forward(self, module, hidden, text, temb, rotary, noisy, *rest, **kwargs):
        total = rotary.shape[1]
        if hidden.shape[1] == total:
            self.layout.check(f"blocks.{self.index}", total, noisy)
            hidden = self.layout.local(hidden, noisy)
        temb = self.layout.local(temb, noisy) if temb.ndim == 4 else temb  # [B, S, 6, D] per token
        self._noisy = noisy
        return (hidden, text, temb, self.layout.local(rotary, noisy), noisy // self.layout.n, *rest), kwargs

    def post_forward(self, module, output):
        return self.layout.full(output, self._noisy) if self.last else output


def full_sequence(transformer: torch.nn.Module, hidden: torch.Tensor, noisy: int) -> torch.Tensor:
    """A block's hidden states in the model's whole order, whatever the split (for taps on intermediate blocks,
    e.g. the GAN's discriminator features): gathered under `split_once`, as they are otherwise."""
    layout = getattr(transformer, "_helios_sequence_layout", None)
    return layout.full(hidden, noisy) if layout is not None else hidden


def check_model(transformer: torch.nn.Module, ring: int, ulysses: int, plan: str = "split_once") -> None:
    """What the model itself must allow for the degrees (token counts are checked per forward, above)."""
    config = transformer.config
    heads = int(config.num_attention_heads)
    if heads % ulysses:
        divisors = [d for d in range(2, heads + 1) if heads % d == 0]
        raise ValueError(f"launcher.ulysses_degree={ulysses}: Ulysses gives each rank a whole number of the "
                         f"model's {heads} attention heads; use one of {divisors}")
    if plan not in PLANS:
        raise ValueError(f"launcher.sequence_plan={plan!r}: expected one of {list(PLANS)}")
    if plan == "per_branch" and getattr(config, "is_amplify_history", False):
        # its attention processor takes the history length from the local (split) sequence
        raise ValueError("launcher.sequence_plan=per_branch with a model whose is_amplify_history=true: its "
                         "attention would scale the wrong keys; use launcher.sequence_plan=split_once")
    if getattr(transformer, "_parallel_config", None) is not None:
        raise ValueError(f"{type(transformer).__name__} is already split over a sequence group")


def enable_sequence_parallel(transformer: torch.nn.Module, mesh, device: torch.device,
                             plan: str = "split_once") -> ContextParallelConfig:
    """Split `transformer`'s token sequence over the mesh's ("ring", "ulysses") dimensions (other mesh dimensions,
    e.g. "dp", are left to the caller) with `plan` (module docstring); returns the context-parallel config in use."""
    check_model(transformer, mesh["ring"].size(), mesh["ulysses"].size(), plan)
    if mesh["ring"].size() > 1 and device.type == "cpu":
        from helios_train.model.cpu_ring_attention import install

        install()
    cp = ContextParallelConfig(ring_degree=mesh["ring"].size(), ulysses_degree=mesh["ulysses"].size(), mesh=mesh)
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=mesh)
    transformer._parallel_config = config
    for module in transformer.modules():  # what enable_parallelism tells every attention processor
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    group = cp._flattened_mesh.get_group()
    if plan == "split_once":
        layout = HistoryNoisyLayout(group)
        transformer._helios_sequence_layout = layout
        last = len(transformer.blocks) - 1
        for i, block in enumerate(transformer.blocks):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(
                SplitOnceBlockHook(layout, i, i == last), SPLIT_HOOK)
        return cp
    splits = split_plan(transformer)
    apply_context_parallel(transformer, cp, splits)
    for key, spec in splits.items():
        dim = spec["hidden_states"].split_dim
        for i, module in enumerate(_modules(transformer, key)):
            hook = ExactGatherHook(key.replace("*", str(i)), dim, group)
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, GATHER_HOOK)
    return cp
