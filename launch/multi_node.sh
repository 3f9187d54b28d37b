#!/usr/bin/env bash
# Multi-node torchrun with a c10d rendezvous. Run the same command on every node:
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0 host> MASTER_PORT=29500 GPUS_PER_NODE=8 \
#     launch/multi_node.sh stage=base model=helios_14b data=webdataset data.shards=...
# Extra arguments are Hydra overrides. Variables (defaults): NNODES (1), NODE_RANK (0), MASTER_ADDR
# (127.0.0.1), MASTER_PORT (29500), GPUS_PER_NODE (visible GPUs, or 1 without CUDA), RDZV_ID (helios),
# LAUNCHER (ddp | deepspeed_zero2 | deepspeed_zero3), OMP_NUM_THREADS (1).
# No cluster-specific variables are read; SLURM users see launch/slurm.sbatch. Without GPUs it runs on
# CPU with gloo (a 2-node rehearsal on one machine: tests/test_ddp.py).
# Preemption: SIGUSR1 or SIGTERM to this script goes to the workers (each finishes its step, checkpoints and
# exits 0), and torchrun ends with their status. torchrun itself ignores SIGUSR1 (started with it ignored, and
# not in PET_SIGNALS_TO_HANDLE): SLURM signals every process of a step, and a torchrun that took SIGUSR1 raised
# SignalException, printed a traceback and exited 1 for a clean stop. SIGTERM sent to torchrun itself (scancel,
# scontrol requeue) it forwards to the workers and waits 30 s, fixed in torch, before SIGKILL; it exits 1 then.
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT}
trap '' USR1  # inherited by torchrun (ignored there); the workers install their own handler at start
torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-helios}" \
  -m helios_train launcher="${LAUNCHER:-ddp}" "$@" &
torchrun_pid=$!
forward() { pkill "-$1" -P "$torchrun_pid" || true; }  # torchrun's children: the workers
trap 'forward USR1' USR1
trap 'forward TERM' TERM
status=0
while kill -0 "$torchrun_pid" 2>/dev/null; do
  wait "$torchrun_pid" && status=0 || status=$?  # returns early (>128) when a trap runs
done
wait "$torchrun_pid" 2>/dev/null && status=0 || status=$?
exit "$status"
