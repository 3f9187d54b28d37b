"""Sequence parallelism of the Helios transformer (Ulysses / ring attention) through diffusers' context-parallel
hooks, with gradients exact for training. The trainer applies it to every role's transformer when
`launcher.ulysses_degree` × `launcher.ring_degree` > 1 (helios_train/backends/sequence_groups.py forms the mesh).

diffusers' `HeliosTransformer3DModel._cp_plan` splits the token sequence on the way into every block's attn1,
attn2 and ffn and all-gathers it on the way out; the residual stream stays whole on every rank. Two things
stop that plan from training as shipped (diffusers 0.42):
- its gather's backward returns the local slice of the incoming gradient (`AllGatherFunction`,
  diffusers/hooks/context_parallel.py). Below the first gather each rank's gradient then lacks the other
  ranks' branch contributions, and no sum or mean over the sequence ranks recovers the gradients of the
  parameters between branches (patch embedding, condition embedder, modulation tables, norms). Here the
  gather's backward is its adjoint, a reduce-scatter (sum): every rank back-propagates the same loss
  through an exact distributed graph, the sequence ranks' gradients sum to degree × the one-process
  gradient, so a mean over all data × sequence ranks (plain DDP on the world group) is the one-process
  data-parallel mean;
- the output entries name blocks 0..39: a model with another depth fails (fewer) or breaks (more). The
  split entries ("blocks.*.attn1", ...) are taken from the model's own plan, the gathers placed on the
  same modules of the real block count.
On CPU-only torch `enable_parallelism` divides by the accelerator count (0), so the set-up it performs is done
here directly. Ring attention needs an attention kernel that returns the log-sum-exp (CUDA only), so CPU runs
Ulysses with the `native` backend.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.context_parallel import apply_context_parallel
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

GATHER_HOOK = "helios_sequence_gather"
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


class SequenceLengthError(ValueError):
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
                f"(launcher.ulysses_degree x launcher.ring_degree); choose a degree that divides the token counts "
                "python -m helios_train ... plan=true lists, or another resolution / history layout")
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


def check_model(transformer: torch.nn.Module, ring: int, ulysses: int) -> None:
    """What the model itself must allow for the degrees (token counts are checked per forward, above)."""
    config = transformer.config
    heads = int(config.num_attention_heads)
    if heads % ulysses:
        divisors = [d for d in range(2, heads + 1) if heads % d == 0]
        raise ValueError(f"launcher.ulysses_degree={ulysses}: Ulysses gives each rank a whole number of the "
                         f"model's {heads} attention heads; use one of {divisors}")
    if getattr(config, "is_amplify_history", False):
        # its attention processor takes the history length from the local (split) sequence
        raise ValueError("sequence parallelism with a model whose is_amplify_history=true is not supported "
                         "(off in every official Helios config)")
    if ring * ulysses > 1 and getattr(transformer, "_parallel_config", None) is not None:
        raise ValueError(f"{type(transformer).__name__} is already split over a sequence group")


def enable_sequence_parallel(transformer: torch.nn.Module, mesh, device: torch.device) -> ContextParallelConfig:
    """Split `transformer`'s attention / FFN sequence over the mesh's ("ring", "ulysses") dimensions (other mesh
    dimensions, e.g. "dp", are left to the caller); returns the context-parallel config in use."""
    check_model(transformer, mesh["ring"].size(), mesh["ulysses"].size())
    cp = ContextParallelConfig(ring_degree=mesh["ring"].size(), ulysses_degree=mesh["ulysses"].size(), mesh=mesh)
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=mesh)
    transformer._parallel_config = config
    for module in transformer.modules():  # what enable_parallelism tells every attention processor
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    splits = split_plan(transformer)
    apply_context_parallel(transformer, cp, splits)
    group = cp._flattened_mesh.get_group()
    for key, spec in splits.items():
        dim = spec["hidden_states"].split_dim
        for i, module in enumerate(_modules(transformer, key)):
            hook = ExactGatherHook(key.replace("*", str(i)), dim, group)
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, GATHER_HOOK)
    return cp
