#!/usr/bin/env bash
# The main job on a fresh machine: set up, then train the quickstart recipe (a MoBA GPT, CP=2 over
# two gloo processes, the built-in corpus) and plot its loss curve. A few minutes on 2 CPU cores.
# Run again, it resumes from the last checkpoint (or says the run is complete).
#   bash scripts/quickstart.sh [--fresh] [--a.b=value ...]    --fresh: delete runs/quickstart first
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fresh" ]; then
  shift
  rm -rf runs/quickstart
fi
bash scripts/setup.sh
.venv/bin/moba-cp selfcheck --tokens 1024
NGPU=2 launch/torchrun.sh recipes/quickstart.yaml "$@"
.venv/bin/moba-cp plot runs/quickstart --out runs/quickstart/plots
echo "quickstart done: logs in runs/quickstart (metrics.jsonl, tensorboard/), loss curve in runs/quickstart/plots/loss_curves.png"
