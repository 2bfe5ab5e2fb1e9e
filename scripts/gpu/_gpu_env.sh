# Sourced by the scripts/gpu/*.sh jobs (run from the repository root on a GPU machine): sets PY,
# makes megatron-core importable (from ./.whl when it is not installed; no network needed), puts the
# repository on PYTHONPATH, keeps NCCL off NVLink multicast, checks that a GPU is there, and makes
# the output folder OUT (the device tool sets it; default ./gpu_out).
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "megatron-core is not importable and there is no .whl/ to install it from" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.cuda.get_device_name(0))"
