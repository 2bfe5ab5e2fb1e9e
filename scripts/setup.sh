#!/usr/bin/env bash
# Create ./.venv with moba_cp and its test dependencies. Safe to re-run.
#
# - On a machine whose python3 already has torch (a GPU cluster), the venv sees the system
#   site-packages and keeps that torch: nothing pulls another build.
# - Otherwise it installs torch==2.13.0 first; on our CPU machines that resolves to the CPU
#   build on local disk (an unpinned `torch` would pull a multi-GB CUDA build).
# - triton is pinned to 3.6.0, the version of the GPU machines, so the CPU interpreter sees the
#   same language the GPU compiles.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
pip() { .venv/bin/python -m pip "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install -q "torch==2.13.0"
fi
pip install -q "triton==3.6.0" 2>/dev/null || echo "setup: triton 3.6.0 not installable here; Triton tests will skip"
pip install -q -e ".[test]"
.venv/bin/python -c "import torch, megatron.core, moba_cp; print(f'setup: torch {torch.__version__}, megatron-core {megatron.core.__version__}, moba_cp {moba_cp.__version__}')" 2>&1 | grep -v Warn | grep -v warnings.warn
