#!/usr/bin/env bash
# One node, NGPU processes (default: every GPU; 2 processes on a CPU-only machine).
#   NGPU=8 launch/torchrun.sh recipes/8gpu-1m.yaml [--a.b=value ...]     train
#   NGPU=2 launch/torchrun.sh eval needle runs/2gpu-128k [--lengths ...]  evaluate (moba-cp eval ...)
# torchrun through moba_cp.train.launch: the recipe, data and run directory are checked once
# before any worker starts, and failures end in one readable line instead of a traceback.
set -euo pipefail
source "$(dirname "$0")/_python.sh"
if [ -z "${NGPU:-}" ]; then
  NGPU=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
if [ "${1:-}" = "eval" ]; then program=(-m moba_cp.cli); else program=(-m moba_cp.train); fi
exec "$PYTHON" -m moba_cp.train.launch --standalone --nnodes 1 --nproc_per_node "$NGPU" \
  "${program[@]}" "$@"
