#!/usr/bin/env bash
# Single node, one process per GPU, torchrun's standalone rendezvous.
#   GPUS_PER_NODE=8 launch/single_node.sh stage=base model=helios_14b model.path=/weights/Wan2.1-T2V-14B-Diffusers
# Extra arguments are Hydra overrides. Variables (defaults): GPUS_PER_NODE (visible GPUs, or 1 without
# CUDA), LAUNCHER (ddp | deepspeed_zero2 | deepspeed_zero3; see launch/deepspeed.sh), OMP_NUM_THREADS (1).
# Without GPUs the same command runs GPUS_PER_NODE CPU processes on gloo.
# Preemption: torchrun forwards SIGTERM and SIGUSR1 to the workers, which finish the step, write a
# checkpoint and exit 0; torchrun waits 30 s for them (fixed in torch) before SIGKILL.
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
exec torchrun --standalone --nnodes=1 --nproc_per_node="$GPUS_PER_NODE" \
  -m helios_train launcher="${LAUNCHER:-ddp}" "$@"
