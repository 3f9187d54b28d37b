"""One rank of a Ulysses / ring check (tests/test_sequence_parallel.py): the toy Helios transformer's loss and
every parameter gradient with the sequence split over the ranks (helios_train/model/sequence_parallel.py),
averaged over ranks as DDP does, against the same step in one process (a copy made before hooking).

    torchrun --nproc_per_node=4 tests/sequence_parallel_worker.py OUT.json MODEL_DIR split_once,per_branch,ring,ring_ulysses,stock

`split_once` / `per_branch`: launcher.sequence_plan's two plans over Ulysses; `ring`: split_once over ring attention
(on CPU through torch's CPU flash kernel, helios_train/model/cpu_ring_attention.py); `ring_ulysses` (4 ranks):
split_once over 2 ring x 2 Ulysses; `stock` = per_branch with
diffusers' own gather (`EquipartitionSharder.unshard`, whose backward keeps the local slice): the negative
control. Also recorded:
the token count block 1 receives and every attention module's query length (what each rank really holds).
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]  # this checkout's helios_train


def main() -> None:
    import torch
    import torch.distributed as dist
    from diffusers import HeliosTransformer3DModel
    from torch.distributed.device_mesh import init_device_mesh

    from helios_train.algorithms.history import HistoryConfig
    from helios_train.model.inputs import model_inputs
    from helios_train.model import sequence_parallel as sp

    out, model_dir, modes = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    pristine = HeliosTransformer3DModel.from_pretrained(model_dir, subfolder="transformer", torch_dtype=torch.float32)
    pristine.requires_grad_(True)
    reference = copy.deepcopy(pristine)
    g = torch.Generator().manual_seed(0)  # the same batch on every rank, as a sequence group sees it
    inputs = model_inputs(torch.randn(1, 4, 9, 8, 16, generator=g), torch.randn(1, 4, 1, 8, 16, generator=g),
                          torch.randn(1, 4, 19, 8, 16, generator=g), torch.tensor([700.0]),
                          torch.randn(1, 16, 32, generator=g), HistoryConfig())
    target = torch.randn(1, 4, 9, 8, 16, generator=g)

    def step(m):
        loss = torch.nn.functional.mse_loss(m(**inputs, return_dict=False)[0].float(), target)
        loss.backward()
        return float(loss)

    ref_loss = step(reference)
    # Sequence degree 2 (Ulysses or ring); with 4 ranks two data-parallel slots of it (each sees the same batch, so the
    # world mean is still the one-process gradient) and `ring_ulysses`, 2 ring x 2 Ulysses (diffusers' unified attention).
    dims = ("dp", "ring", "ulysses")
    mesh = init_device_mesh("cpu", (world // 2, 1, 2), mesh_dim_names=dims)
    meshes = {"ring": init_device_mesh("cpu", (world // 2, 2, 1), mesh_dim_names=dims)}
    if world == 4:
        meshes["ring_ulysses"] = init_device_mesh("cpu", (1, 2, 2), mesh_dim_names=dims)
    results = {}
    for mode in modes:  # (stock last: it swaps the gather hook's method)
        model = copy.deepcopy(pristine)  # a fresh copy per plan: a model is split once
        if mode == "stock":
            from diffusers.hooks.context_parallel import EquipartitionSharder

            flat = mesh["ring", "ulysses"]._flatten()  # this rank's sequence group
            sp.ExactGatherHook.post_forward = lambda self, module, output: EquipartitionSharder.unshard(output, self.dim,
                                                                                                      flat)
        seen = {"block1": [], "attn1_rows": []}
        model.blocks[1].register_forward_pre_hook(lambda m, args: seen["block1"].append(args[0].shape[1]))
        model.blocks[1].attn1.to_q.register_forward_hook(lambda m, args, out: seen["attn1_rows"].append(out.shape[1]))
        sp.enable_sequence_parallel(model, meshes.get(mode, mesh), torch.device("cpu"),
                                    "per_branch" if mode in ("per_branch", "stock") else "split_once")
        loss = step(model)
        errors = {}
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            grad = p.grad.clone()
            dist.all_reduce(grad)
            grad /= world  # DDP's mean over the world group
            errors[name] = float((grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-30))
        results[mode] = {"loss": loss, "reference_loss": ref_loss, "relative_grad_error": errors, **seen}
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    dist.barrier()
    from helios_train.runtime.process_guard import exit_process

    exit_process(0)


if __name__ == "__main__":
    main()
