#!/usr/bin/env bash
# GPU check for vlmfix.kernels (issue 9): the kernel tests on CUDA (fp32, fp16, bf16; compiled, not
# interpreted), then the decode benchmark (benchmarks/kernels.py) with its 4k-key targets.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else /tmp/vlmfix-gpu-check
#
# Writes OUT_DIR/gpu_tests.log, OUT_DIR/bench.log and the benchmark's CSV and PNG files. Exits non-zero if
# the tests or the benchmark fail. Takes a few minutes on one H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-/tmp/vlmfix-gpu-check}}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels

if ! $PYTHON -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: $PYTHON sees no CUDA GPU; run this on a GPU machine." >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# --noconftest: these tests need none of the shared model fixtures
$PYTHON -m pytest tests/test_kernels.py -q --noconftest -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
$PYTHON -m benchmarks.kernels --save-path "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu_check: tests rc=$tests_rc, benchmark rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
