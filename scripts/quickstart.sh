#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run the quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/moba-cp selfcheck
.venv/bin/moba-cp config recipes/tiny.yaml
