#!/usr/bin/env bash
# numres's GPU checks, in one command, on a machine with an NVIDIA GPU:
#
#   scripts/gpu_check.sh            # install, GPU tests, whole suite on both backends, generic CuPy path
#   scripts/gpu_check.sh --bench    # ... and then benchmarks/gpu_resnet50.py
#
# It installs numres with its test extra and the CuPy wheel for the driver's CUDA major version
# (override with NUMRES_CUDA=12 or 13), then runs
#   1. tests/test_gpu.py            kernels vs generic ops, layers and ResNet-50 vs torch CUDA, no host
#                                   syncs in a step, memory-pool reuse, TF32 switch, CUDA-graph step;
#   2. the whole suite              every test parametrised over backends runs on numpy and cupy;
#   3. the cupy tests again with NUMRES_CUDA_KERNELS=0   (the generic array code on CuPy).
# Logs go to benchmarks/results/gpu_check_<card>_*.log.  Exit status: 0 only if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check.sh: no NVIDIA GPU here (nvidia-smi missing or sees no device); nothing to check." >&2
    exit 2
fi
driver_cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -n 1)
cuda_major=${NUMRES_CUDA:-${driver_cuda:-12}}
if [ "$cuda_major" -ge 13 ]; then extra=cuda13; else extra=cuda12; fi
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr -c 'A-Za-z0-9\n' '_' | tr 'A-Z' 'a-z')
mkdir -p benchmarks/results
log=benchmarks/results/gpu_check_${card}

echo "== $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader); installing .[test,$extra]"
python3 -m pip install -q -e ".[test,bench,$extra]" || { echo "pip install failed" >&2; exit 1; }
# CuPy 14 wheels load cuBLAS/NVRTC from a CUDA toolkit; [ctk] brings them from PyPI where none is installed.
if ! ls /usr/local/cuda/lib64/libcublas.so* >/dev/null 2>&1; then
    python3 -m pip install -q "cupy-cuda${cuda_major}x[ctk]" || { echo "pip install of CUDA components failed" >&2; exit 1; }
fi
python3 -c "import cupy, torch; print('cupy', cupy.__version__, '| torch', torch.__version__, \
'| torch sees CUDA:', torch.cuda.is_available())"

status=0
echo "== 1/3 GPU tests"
python3 -m pytest -q -rs tests/test_gpu.py 2>&1 | tee "${log}_gpu_tests.log" || status=1
echo "== 2/3 whole suite, numpy and cupy backends"
python3 -m pytest -q -rs 2>&1 | tee "${log}_suite.log" || status=1
echo "== 3/3 cupy tests on the generic array code (NUMRES_CUDA_KERNELS=0)"
NUMRES_CUDA_KERNELS=0 python3 -m pytest -q -rs -m gpu 2>&1 | tee "${log}_generic_cupy.log" || status=1

if [ "${1:-}" = "--bench" ]; then
    echo "== benchmark"
    python3 benchmarks/gpu_resnet50.py 2>&1 | tee "${log}_benchmark.log" || status=1
fi
echo "== gpu_check.sh: $([ $status -eq 0 ] && echo PASSED || echo FAILED); logs in ${log}_*.log"
exit $status
