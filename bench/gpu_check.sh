#!/usr/bin/env bash
# The GPU check of the multi-LoRA kernels, for the few minutes a GPU is lent: the CUDA kernel
# tests (pytest -m gpu), then the GPU benchmark. Under 5 minutes in all on one H200.
#   bench/gpu_check.sh                 # writes bench/results/kernels_gpu.json
#   OUT=/some/dir bench/gpu_check.sh   # writes $OUT/kernels_gpu.json and $OUT/gpu_tests.txt
# Needs a torch build with CUDA: PYTHON=... picks the interpreter (default .venv/bin/python,
# whose pinned torch is the CPU build on the development machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: $PYTHON has no CUDA device (torch $("$PYTHON" -c 'import torch; print(torch.__version__)')); nothing run." >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
out_dir=${OUT:-bench/results}
mkdir -p "$out_dir"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

status=0
# Tests first: a kernel that is wrong on the GPU makes the timings meaningless.
timeout 150 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/kernels 2>&1 \
    | tee "$out_dir/gpu_tests.txt" || status=1
timeout 170 "$PYTHON" -m bench.lora_kernels --device cuda --budget-s 120 \
    --out "$out_dir/kernels_gpu.json" || status=1
exit $status
