#!/usr/bin/env bash
# The main job on a fresh machine: set up, then train the quickstart recipe (a MoBA GPT, CP=2 over
# two gloo processes, the built-in corpus) and plot its loss curve. A few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/moba-cp selfcheck --tokens 1024
rm -rf runs/quickstart
NGPU=2 launch/torchrun.sh recipes/quickstart.yaml "$@"
.venv/bin/moba-cp plot runs/quickstart --out runs/quickstart/plots
echo "quickstart done: logs in runs/quickstart (metrics.jsonl, tensorboard/), loss curve in runs/quickstart/plots/loss_curves.png"
