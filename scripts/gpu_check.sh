#!/usr/bin/env bash
# numres's GPU check, in one command, on a machine with an NVIDIA GPU (under 6 minutes on an H200):
#
#   scripts/gpu_check.sh             # probe, tests/test_gpu.py, short ResNet-50 benchmark
#   scripts/gpu_check.sh --no-bench  # probe and tests only
#   scripts/gpu_check.sh --full      # ... then also the whole suite on both backends, and the CuPy tests
#                                    #     on the generic array code (NUMRES_CUDA_KERNELS=0): not timed
#
# 1. Environment.  If CuPy, a CUDA build of torch and pytest already import (the project's H200
#    image: cupy-cuda13x 14.2, torch 2.11+cu130, no network), it installs nothing.  Otherwise it
#    pip-installs .[test,bench,cudaXX] for the driver's CUDA major (NUMRES_CUDA=12|13 overrides it;
#    NUMRES_NO_INSTALL=1 forbids installing).  numres runs from this checkout (PYTHONPATH=.).
# 2. scripts/gpu_probe.py: one cuBLAS GEMM, CuPy's runtime kernels, one RawModule compile of
#    numres's source, torch CUDA; names exactly what is missing if anything is.
# 3. tests/test_gpu.py (time cap NUMRES_GPU_TEST_SECONDS, default 200 s).
# 4. benchmarks/gpu_resnet50.py --quick, within what is left of NUMRES_GPU_CHECK_SECONDS
#    (default 330 s for the whole command).
#
# Everything lands in one folder, ${NUMRES_GPU_RESULTS:-benchmarks/results/gpu}/<card>/<UTC time>/:
# check.log (this whole output), probe.json, gpu_tests.log, benchmark.json, benchmark.log and
# summary.json (versions, step results).  The last line is a one-line PASS/FAIL tally; the exit
# status is 0 only if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
total_budget=${NUMRES_GPU_CHECK_SECONDS:-330}
test_budget=${NUMRES_GPU_TEST_SECONDS:-200}
bench=1 full=0
for arg in "$@"; do
    case "$arg" in
        --no-bench) bench=0 ;;
        --full) full=1 ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}

# --- 1. environment: install nothing where everything already imports --------------------------------
if "$python" -c "import cupy, torch, pytest; assert torch.cuda.is_available()" >/dev/null 2>&1; then
    env_note="using the installed CuPy, torch and pytest (nothing installed)"
elif [ "${NUMRES_NO_INSTALL:-0}" = "1" ]; then
    env_note="CuPy, CUDA torch or pytest missing and NUMRES_NO_INSTALL=1: nothing installed"
else
    if command -v nvidia-smi >/dev/null 2>&1; then
        driver_cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -n 1)
    fi
    cuda_major=${NUMRES_CUDA:-${driver_cuda:-12}}
    if [ "$cuda_major" -ge 13 ]; then extra=cuda13; else extra=cuda12; fi
    echo "== installing .[test,bench,$extra] (CuPy, CUDA torch or pytest did not import)"
    "$python" -m pip install -q -e ".[test,bench,$extra]" || echo "pip install failed (the probe says what is missing)" >&2
    # CuPy wheels load cuBLAS/NVRTC from a CUDA toolkit; [ctk] brings them from PyPI where none is installed.
    if ! ls /usr/local/cuda/lib64/libcublas.so* >/dev/null 2>&1; then
        "$python" -m pip install -q "cupy-cuda${cuda_major}x[ctk]" || echo "pip install of CUDA components failed" >&2
    fi
    env_note="installed .[test,bench,$extra]"
fi

card=$("$python" -c "import cupy; p = cupy.cuda.runtime.getDeviceProperties(0); n = p['name']; \
print(n.decode() if isinstance(n, bytes) else n)" 2>/dev/null || echo unknown-gpu)
slug=$(echo "$card" | tr 'A-Z' 'a-z' | sed 's/[^a-z0-9]\{1,\}/_/g; s/^_//; s/_$//')
stamp=$(date -u +%Y%m%dT%H%M%SZ)
dir="${NUMRES_GPU_RESULTS:-benchmarks/results/gpu}/${slug:-unknown_gpu}/$stamp"
mkdir -p "$dir"
exec > >(tee -a "$dir/check.log") 2>&1
echo "== gpu_check.sh $(date -u +%FT%TZ) on $card; results in $dir"
echo "== $env_note"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
git log -1 --format='== numres commit %H (%s)' 2>/dev/null

declare -A result
order=()
record() { result[$1]=$2; order+=("$1"); }

# --- 2. probe ------------------------------------------------------------------------------------------
echo "== probe"
if "$python" scripts/gpu_probe.py --json "$dir/probe.json"; then record probe PASS; else record probe FAIL; fi

# --- 3. GPU tests --------------------------------------------------------------------------------------
if [ "${result[probe]}" = PASS ]; then
    echo "== tests/test_gpu.py (cap ${test_budget}s)"
    timeout --signal=INT --kill-after=15 "$test_budget" "$python" -m pytest -q -rfEs -p no:cacheprovider \
        tests/test_gpu.py 2>&1 | tee "$dir/gpu_tests.log"
    code=${PIPESTATUS[0]}
    tests_line=$(grep -E '^(=+ )?[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s' "$dir/gpu_tests.log" | tail -n 1)
    if [ "$code" -eq 0 ]; then record tests PASS
    elif [ "$code" -eq 124 ] || [ "$code" -eq 130 ]; then record tests "FAIL(time cap ${test_budget}s)"
    else record tests FAIL; fi
else
    record tests "FAIL(not run: probe failed)"
fi

# --- 4. benchmark --------------------------------------------------------------------------------------
if [ "$bench" = 1 ]; then
    left=$(( total_budget - ($(date +%s) - start) - 10 ))
    if [ "${result[probe]}" != PASS ]; then
        record benchmark "FAIL(not run: probe failed)"
    elif [ "$left" -lt 30 ]; then
        record benchmark "FAIL(not run: only ${left}s left of ${total_budget}s)"
    else
        echo "== benchmarks/gpu_resnet50.py --quick (budget ${left}s)"
        if timeout --signal=INT --kill-after=15 $(( left + 20 )) "$python" benchmarks/gpu_resnet50.py --quick \
                --time-budget "$left" --json "$dir/benchmark.json" 2>&1 | tee "$dir/benchmark.log"; then
            record benchmark PASS
        else
            record benchmark FAIL
        fi
    fi
fi

# --- optional: the whole suite and the generic CuPy path (not part of the timed check) ---------------
if [ "$full" = 1 ]; then
    echo "== whole suite, numpy and cupy backends"
    if "$python" -m pytest -q -rfEs -p no:cacheprovider 2>&1 | tee "$dir/suite.log"; then
        record suite PASS; else record suite FAIL; fi
    echo "== cupy tests on the generic array code (NUMRES_CUDA_KERNELS=0)"
    if NUMRES_CUDA_KERNELS=0 "$python" -m pytest -q -rfEs -p no:cacheprovider -m gpu 2>&1 | \
            tee "$dir/generic_cupy.log"; then record generic_cupy PASS; else record generic_cupy FAIL; fi
fi

# --- summary -------------------------------------------------------------------------------------------
elapsed=$(( $(date +%s) - start ))
passed=0 failed=0 parts=""
for step in "${order[@]}"; do
    case "${result[$step]}" in PASS) passed=$((passed + 1)) ;; *) failed=$((failed + 1)) ;; esac
    parts="$parts $step=${result[$step]}"
done
steps_json=$(for step in "${order[@]}"; do printf '"%s": "%s", ' "$step" "${result[$step]}"; done)
"$python" - "$dir" "$elapsed" "${tests_line:-}" <<EOF
import json, os, sys
folder, elapsed, tests_line = sys.argv[1], int(sys.argv[2]), sys.argv[3]
probe = {}
if os.path.exists(os.path.join(folder, "probe.json")):
    with open(os.path.join(folder, "probe.json")) as stream:
        probe = json.load(stream)
summary = {"card": "$card", "results_folder": folder, "elapsed_seconds": elapsed, "steps": {${steps_json%, }},
           "tests": tests_line,
           "versions": {key: probe.get(key) for key in ("card", "compute_capability", "driver_cuda_version",
                                                        "cuda_runtime_version", "cupy", "numpy", "torch",
                                                        "torch_cuda", "cudnn", "python")}}
with open(os.path.join(folder, "summary.json"), "w") as stream:
    json.dump(summary, stream, indent=2)
EOF
[ -n "${tests_line:-}" ] && echo "== tests: $tests_line"
if [ "$failed" -eq 0 ]; then verdict=PASS; else verdict=FAIL; fi
echo "gpu_check: $verdict - $passed passed, $failed failed:$parts (${elapsed}s, $card, results in $dir)"
[ "$failed" -eq 0 ]
