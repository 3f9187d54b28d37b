"""Whole-tensor optimizer state for DeepSpeed ZeRO engines: written next to the ZeRO shards, read into an
engine of any rank count or ZeRO stage (or by DDP / single as a plain torch AdamW state dict).

Why not DeepSpeed's universal checkpoint: it is an offline conversion (ds_to_universal) from ZeRO to
ZeRO only; a DDP run could not read it, and a preempted job would need the conversion before it
restarts. Gathering at save time costs one all-reduce of each trainable tensor per AdamW moment
(the dry run prints the bytes at the recipe's size) and gives one file format for every backend:
`{"state": {i: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}`, i = index among the role's
trainable parameters in `named_parameters` order — what `torch.optim.AdamW.state_dict()` of a DDP
run holds. DeepSpeed's tensor-fragment API (`deepspeed.utils.safe_get/set_full_*`) maps each whole
tensor to and from the flat fp32 partitions of ZeRO-1/2/3.
"""
from __future__ import annotations

import torch
from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_fp32_param, safe_set_full_optimizer_state


def _flat_partitions(ds_optimizer) -> list[torch.Tensor]:
    """The fp32 tensors the client AdamW steps: one flat partition per (sub)group on this rank."""
    if hasattr(ds_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return list(ds_optimizer.fp32_partitioned_groups_flat)
    return list(ds_optimizer.single_partition_of_fp32_groups)  # ZeRO-1/2


def _moment_keys(entry: dict, like: torch.Tensor) -> list[str]:
    return [k for k, v in entry.items() if torch.is_tensor(v) and v.shape == like.shape and v.dim() > 0]


def whole_optimizer_state(ds_optimizer, params: list[torch.nn.Parameter]) -> dict:
    """The role's AdamW state as whole tensors (collective: every rank calls it; the tensors are only kept
    on rank 0). Empty `state` before the role's first optimizer step (AdamW creates it lazily)."""
    base = ds_optimizer.optimizer
    group = {k: v for k, v in base.param_groups[0].items() if k != "params"}
    out = {"state": {}, "param_groups": [{**group, "params": list(range(len(params)))}]}
    flats = _flat_partitions(ds_optimizer)
    if not flats or flats[0] not in base.state:
        return out
    first = base.state[flats[0]]
    moments = _moment_keys(first, flats[0])
    keep = torch.distributed.get_rank() == 0
    for i, p in enumerate(params):
        entry = {k: v.detach().clone() for k, v in first.items() if k not in moments}  # step
        for key in moments:
            whole = safe_get_full_optimizer_state(p, key)
            if keep:
                entry[key] = whole.detach().float().cpu().clone()
        if keep:
            out["state"][i] = entry
    return out


def _write_module_weights(backend, named, weights, chunk_elements: int = 2**27) -> None:
    """Whole values into the module's parameters; under ZeRO-3 through `GatheredParameters` with rank 0 as
    the modifier (DeepSpeed re-partitions on exit), a chunk of parameters at a time."""
    if backend.zero_stage != 3:
        for name, p in named:
            p.data.copy_(weights[name].to(p.device, p.dtype))
        return
    chunk, size = [], 0
    for i, (name, p) in enumerate(named):
        chunk.append((name, p))
        size += p.ds_numel
        if size >= chunk_elements or i == len(named) - 1:
            with backend.deepspeed.zero.GatheredParameters([q for _, q in chunk], modifier_rank=0):
                for n, q in chunk:
                    q.data.copy_(weights[n].to(q.device, q.dtype))
            chunk, size = [], 0


@torch.no_grad()
def load_whole_state(backend, role, weights: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Whole fp32 trainables and AdamW state into the engine's partitions (every rank calls it)."""
    ds_optimizer = role.optimizer
    named = [(n, p) for n, p in role.module.named_parameters() if p.requires_grad]
    missing = [n for n, _ in named if n not in weights]
    if missing or len(weights) != len(named):
        raise ValueError(f"role {role.name}: the checkpoint's trainables do not match this model "
                         f"(missing {missing[:5]}, {len(weights)} saved vs {len(named)} trainable)")
    for name, p in named:
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"role {role.name}: {name} has shape {list(weights[name].shape)} in the checkpoint, "
                             f"{list(shape)} in the model")
    _write_module_weights(backend, named, weights)
    ds_optimizer.refresh_fp32_params()  # the fp32 master partitions from the module weights ...
    for name, p in named:  # ... and exactly, should the module weights be bf16 (a user JSON's bf16 mode)
        safe_set_full_fp32_param(p, weights[name].to(backend.device))
    flats = _flat_partitions(ds_optimizer)
    saved = optimizer_state["state"]
    if not saved:  # written before the role's first optimizer step
        return
    template = next(iter(saved.values()))
    moments = [k for k, v in template.items() if torch.is_tensor(v) and v.dim() > 0]
    step = max(float(entry["step"]) for entry in saved.values())
    base = ds_optimizer.optimizer
    for flat in flats:
        state = base.state.setdefault(flat, {})
        state["step"] = torch.tensor(step, dtype=torch.float32)
        for key in moments:
            state.setdefault(key, torch.zeros_like(flat))
    if hasattr(ds_optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link the new state's fragments
        ds_optimizer._hp_optimizer_states_linked = False
        ds_optimizer._lazy_init_hp_params_optimizer_state()
    for i, (_, p) in enumerate(named):
        entry = saved.get(i)
        for key in moments:
            value = entry[key] if entry is not None else torch.zeros(tuple(getattr(p, "ds_shape", p.shape)))
            safe_set_full_optimizer_state(p, value.to(backend.device), key)
    hyper = {k: v for k, v in optimizer_state["param_groups"][0].items() if k != "params"}
    for group in base.param_groups:
        group.update(hyper)
