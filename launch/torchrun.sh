#!/usr/bin/env bash
# One node, NGPU processes (default: every GPU; 2 processes on a CPU-only machine).
#   NGPU=8 launch/torchrun.sh recipes/8gpu-1m.yaml [--a.b=value ...]
set -euo pipefail
source "$(dirname "$0")/_python.sh"
if [ -z "${NGPU:-}" ]; then
  NGPU=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$NGPU" \
  -m moba_cp.train "$@"
