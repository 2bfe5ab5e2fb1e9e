#!/usr/bin/env bash
# Several nodes meeting through torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=8 NGPU=8 MASTER_ADDR=node0.example MASTER_PORT=29500 launch/multinode.sh recipes/64gpu-4m.yaml
# Environment:
#   NNODES       number of nodes (required)
#   NGPU         processes per node (default: GPUs on this node)
#   MASTER_ADDR  host of the rendezvous (any one of the nodes; required)
#   MASTER_PORT  its port (default 29500)
#   RDZV_ID      job id shared by all nodes (default: moba_cp)
#   RDZV_CONF    extra c10d options, e.g. "join_timeout=900"
# Node ranks are assigned by the rendezvous; nothing else differs between nodes. The first argument
# `eval` runs `moba-cp eval ...` instead of training (as launch/torchrun.sh).
set -euo pipefail
source "$(dirname "$0")/_python.sh"
: "${NNODES:?set NNODES (number of nodes)}"
: "${MASTER_ADDR:?set MASTER_ADDR (host of the rendezvous)}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [ -z "${NGPU:-}" ]; then
  NGPU=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')
fi
if [ "${1:-}" = "eval" ]; then program=(-m moba_cp.cli); else program=(-m moba_cp.train); fi
exec "$PYTHON" -m moba_cp.train.launch --nnodes "$NNODES" --nproc_per_node "$NGPU" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-moba_cp}" \
  ${RDZV_CONF:+--rdzv_conf "$RDZV_CONF"} \
  "${program[@]}" "$@"
