#!/usr/bin/env bash
# GPU check, one short script for a lent GPU machine (steps ordered by what is still open, each under its own
# time limit, so that one slow step leaves the others their figures):
#   1. issue 14's figure: no method, VHR and PAI (with and without CFG) against plain greedy `generate` on Qwen3-VL-
#      and Gemma 3-shaped bf16 models at the real models' attention width (Qwen3-VL-8B: 32 heads x 128, 8 key/value
#      heads; Gemma 3 12B: 16 heads x 256, 8 key/value heads), batch 1 and 8 (benchmarks/speed.py, runs clock);
#   2. the kernel tests on CUDA (fp32, fp16, bf16; compiled, not interpreted) and the key-bias path's CUDA test
#      (PAI's decode step: SDPA with the mask in the query's dtype);
#   3. the decode kernel benchmark (benchmarks/kernels.py, issue 9's 4k-key targets);
#   4. every method on a LLaVA-shaped bf16 model at batch 1 (issue 13).
# A method that edits nothing fails its step (benchmarks/speed.py checks each session's report).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else /tmp/vlmfix-gpu-check
#
# Writes OUT_DIR/speed-qwen3_vl.{log,json}, speed-gemma3.{log,json}, gpu_tests.log, key_bias_tests.log, bench.log
# (+ the benchmark's CSV files), speed-llava.{log,json}; benchmarks/speed.py writes each finished block at once, so a
# step stopped at its limit keeps what it finished. Exits non-zero if any step fails. At most 9 minutes and 10 seconds (the sum of
# the steps' limits) on one H100/H200; on a fresh H200 the speed step with every method ran past 120 s and the
# kernel tests took 55 s.
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
$PYTHON -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'triton', triton.__version__)" || exit 1

status=0
step() {  # step NAME SECONDS LOG COMMAND...: run under a time limit, keep its log, record a failure
    local name=$1 seconds=$2 log=$3
    shift 3
    echo "=== gpu_check: $name (limit ${seconds}s)"
    timeout "$seconds" "$@" 2>&1 | tee "$OUT_DIR/$log"
    local rc=${PIPESTATUS[0]}
    echo "=== gpu_check: $name rc=$rc"
    [ "$rc" -eq 0 ] || status=1
}
SPEED=($PYTHON -m benchmarks.speed --device cuda --dtype bfloat16 --layers 8 --new-tokens 64 --repeats 3)
ISSUE_14=(--batch 1 8 --no-memory --methods none vhr pai:cfg=False pai)
step "speed, Qwen3-VL-shaped" 140 speed-qwen3_vl.log "${SPEED[@]}" "${ISSUE_14[@]}" --family qwen3_vl --heads 32 \
    --head-dim 128 --out "$OUT_DIR/speed-qwen3_vl.json"
step "speed, Gemma 3-shaped" 140 speed-gemma3.log "${SPEED[@]}" "${ISSUE_14[@]}" --family gemma3 --heads 16 \
    --head-dim 256 --out "$OUT_DIR/speed-gemma3.json"
# --noconftest: these tests need none of the shared model fixtures
step "kernel tests" 90 gpu_tests.log $PYTHON -m pytest tests/test_kernels.py -q --noconftest -p no:cacheprovider
step "key-bias tests" 30 key_bias_tests.log $PYTHON -m pytest tests/test_key_bias.py -q -p no:cacheprovider
step "kernel benchmark" 60 bench.log $PYTHON -m benchmarks.kernels --save-path "$OUT_DIR"
step "speed, LLaVA-shaped" 90 speed-llava.log "${SPEED[@]}" --batch 1 --family llava --heads 32 --head-dim 128 \
    --out "$OUT_DIR/speed-llava.json"
echo "gpu_check: status=$status"
exit "$status"
