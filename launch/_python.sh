# Sourced by the launchers: the Python to run (the repo's .venv when present, else python3).
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$_root/.venv/bin/python" ]; then PYTHON="$_root/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$_root${PYTHONPATH:+:$PYTHONPATH}"
# Never let NCCL use NVLink multicast (NVLS): on shared hosts it can take GPUs out of service.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
# A CP rank that fails inside an exchange ends its peers within this many seconds (moba_cp.parallel.failure).
export MOBA_CP_EXCHANGE_TIMEOUT_S="${MOBA_CP_EXCHANGE_TIMEOUT_S:-60}"
