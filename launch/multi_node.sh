#!/usr/bin/env bash
# Multi-node torchrun with a c10d rendezvous. Run the same command on every node:
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0 host> MASTER_PORT=29500 GPUS_PER_NODE=8 \
#     launch/multi_node.sh stage=base model=helios_14b data=webdataset data.shards=...
# Extra arguments are Hydra overrides. Variables (defaults): NNODES (1), NODE_RANK (0), MASTER_ADDR
# (127.0.0.1), MASTER_PORT (29500), GPUS_PER_NODE (visible GPUs, or 1 without CUDA), RDZV_ID (helios),
# LAUNCHER (ddp | deepspeed_zero2 | deepspeed_zero3), OMP_NUM_THREADS (1).
# No cluster-specific variables are read; SLURM users see launch/slurm.sbatch. Without GPUs it runs on
# CPU with gloo (a 2-node rehearsal on one machine: tests/test_ddp.py).
# Preemption: torchrun forwards SIGTERM and SIGUSR1 to the workers (checkpoint, exit 0) and waits
# 30 s for them (fixed in torch) before SIGKILL.
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-helios}" \
  -m helios_train launcher="${LAUNCHER:-ddp}" "$@"
