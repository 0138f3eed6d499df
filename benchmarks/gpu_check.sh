#!/usr/bin/env bash
# GPU check: the kernel tests on CUDA (fp32, fp16, bf16; compiled, not interpreted), the decode kernel
# benchmark (benchmarks/kernels.py, issue 9's 4k-key targets), then every method against greedy on a
# LLaVA-shaped bf16 model with planted sinks, at batch 1 and 8 (benchmarks/speed.py, issue 13): decode time
# per token, wall time per caption, peak allocated memory, the two-stream floor; a method that edits nothing
# fails the step.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else /tmp/vlmfix-gpu-check
#
# Writes OUT_DIR/gpu_tests.log, OUT_DIR/bench.log (+ the benchmark's CSV and PNG files), OUT_DIR/speed.log
# and OUT_DIR/speed.json. Exits non-zero if any step fails. Takes a few minutes on one H100/H200.
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
$PYTHON -m benchmarks.speed --device cuda --dtype bfloat16 --batch 1 8 --layers 8 --heads 32 --head-dim 128 \
    --new-tokens 64 --repeats 3 --out "$OUT_DIR/speed.json" 2>&1 | tee "$OUT_DIR/speed.log"
speed_rc=${PIPESTATUS[0]}
echo "gpu_check: tests rc=$tests_rc, benchmark rc=$bench_rc, speed rc=$speed_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$speed_rc" -eq 0 ]
