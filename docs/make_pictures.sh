#!/usr/bin/env bash
# Re-make the README's pictures from the toy model: docs/summary.png (the multirun summary plot) and
# docs/browser.png (the results browser in headless chromium).
#
#   docs/make_pictures.sh                 # runs a small toy multirun (a few minutes on 2 CPU cores), then shoots
#   docs/make_pictures.sh SWEEP_DIR       # shoots the results browser of an existing multirun (e.g. the main
#                                         # command's outputs/vlmfix/multiruns/<date>)
#
# Needs Debian's chromium (apt-get install -y chromium). PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
sweep="${1:-outputs/pictures/toy_sweep}"
if [ $# -eq 0 ]; then
  "$python" -m benchmarks --multirun model=toy method=greedy,vcd benchmark=chair,pope_random limit=20 \
    progress=false "hydra.sweep.dir=$sweep"
fi
# The summary (table, plot) and the results browser, re-made from the sweep's result.json files.
"$python" -c "import sys; from pathlib import Path; from benchmarks.summary import write_summary; write_summary(Path(sys.argv[1]))" "$sweep"
cp "$sweep/summary.png" docs/summary.png
"$python" -m benchmarks.browse "$sweep"
# The results browser, filtered to the items where some method hallucinated (#object=*).
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --virtual-time-budget=3000 \
  --window-size=1400,1000 --screenshot="$PWD/docs/browser.png" "file://$(realpath "$sweep")/browse.html#object=*"
ls -l docs/summary.png docs/browser.png
