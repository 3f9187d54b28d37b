#!/usr/bin/env bash
# DeepSpeed ZeRO variant of the launchers (same torchrun rendezvous; DeepSpeed runs inside our backend).
#   ZERO=2 launch/deepspeed.sh stage=distilled model=helios_14b ...            # single node
#   NNODES=4 NODE_RANK=$k MASTER_ADDR=node0 ZERO=3 launch/deepspeed.sh ...      # multi-node
# ZERO (2 | 3, default 2) picks launcher=deepspeed_zero$ZERO; other variables as in multi_node.sh.
set -euo pipefail
export LAUNCHER="deepspeed_zero${ZERO:-2}"
here="$(cd "$(dirname "$0")" && pwd)"
if [ "${NNODES:-1}" = "1" ]; then exec "$here/single_node.sh" "$@"; fi
exec "$here/multi_node.sh" "$@"
