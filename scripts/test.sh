#!/usr/bin/env bash
# Set up (if needed) and run the CPU test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# lm-evaluation-harness (the 'lmeval' extra), for the test of the exported model's lm-eval needle task
if ! .venv/bin/python -c "import lm_eval, accelerate" 2>/dev/null; then
  .venv/bin/python -m pip install -q -e ".[lmeval]" > .venv/lmeval-install.log 2>&1 \
    || echo "test: lm-eval is not installable here (.venv/lmeval-install.log); its test will be skipped"
fi
exec .venv/bin/python -m pytest -q "$@"
