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
# Two workers, each running whole test files (--dist loadfile keeps a file's module fixtures, e.g.
# a trained run, in one process): about half the serial time on 2 cores (12 to 26 minutes measured
# on different days and machines), since the Triton interpreter tests are spread over both workers. TEST_WORKERS=0 runs in this process;
# arguments given here come after, so `-n 0` works too.
workers=(-n "${TEST_WORKERS:-2}" --dist loadfile)
if ! .venv/bin/python -c "import xdist" 2>/dev/null; then
  echo "test: pytest-xdist is not installed; running the suite in one process (~21 minutes on 2 cores)"
  workers=()
fi
exec .venv/bin/python -m pytest -q "${workers[@]}" "$@"
