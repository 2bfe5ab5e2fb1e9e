#!/usr/bin/env bash
# Create ./.venv with moba_cp, its test dependencies and the HF export extra. Safe to re-run.
#
# - On a machine whose python3 already has torch (a GPU cluster), the venv sees the system
#   site-packages and keeps that torch: nothing pulls another build.
# - Otherwise it installs torch==2.13.0 first; on our CPU machines that resolves to the CPU
#   build on local disk (an unpinned `torch` would pull a multi-GB CUDA build).
# - On CPU-only torch, triton is pinned to 3.6.0, the version of the GPU machines, so the CPU
#   interpreter sees the same language the GPU compiles; a CUDA torch keeps its own triton.
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
  # numpy with torch: torch imported without numpy warns "Failed to initialize NumPy".
  pip install -q "torch==2.13.0" numpy
fi
# Pin triton to the GPU machines' 3.6.0 where torch has no CUDA (CPU test machines: the
# interpreter then sees the GPU's language). A CUDA torch keeps the triton it was built with.
if .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)"; then
  pip install -q "triton==3.6.0" || echo "setup: triton 3.6.0 is not installable here; Triton tests will fail"
fi
pip install -q -e ".[test,export]"
.venv/bin/python -c "import torch, megatron.core, moba_cp; print(f'setup: torch {torch.__version__}, megatron-core {megatron.core.__version__}, moba_cp {moba_cp.__version__}')" 2>&1 | grep -v Warn | grep -v warnings.warn
