#!/usr/bin/env bash
# Single node, one process per GPU (DDP), torchrun's standalone rendezvous.
#   GPUS_PER_NODE=8 launch/single_node.sh stage=base model=helios_14b model.path=/weights/Wan2.1-T2V-14B-Diffusers
# Extra arguments are Hydra overrides. Without GPUs it runs on CPU with gloo (GPUS_PER_NODE processes).
# LAUNCHER=deepspeed_zero2 switches the backend (see launch/deepspeed.sh).
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nnodes=1 --nproc_per_node="$GPUS_PER_NODE" \
  -m helios_train launcher="${LAUNCHER:-ddp}" "$@"
