#!/usr/bin/env bash
# Re-make the README's pictures: docs/summary.png (the multirun summary plot) and docs/browser.png (the results
# browser opened in Debian's headless chromium, a screenshot shrunk to a small PNG).
#
#   docs/make_pictures.sh                        # runs a small toy multirun (a few minutes on 2 CPU cores), then
#                                                # shoots its page
#   docs/make_pictures.sh --from SWEEP_DIR       # shoots an existing multirun's page, e.g. the main command's
#                                                # (`python -m benchmarks`): outputs/vlmfix/multiruns/<date>
#   docs/make_pictures.sh --from SWEEP_DIR --view 'table=chair&object=*&runs=greedy,vcd'
#
# --view is the page's address preset (benchmarks/browse.py): by default the CHAIR table alone, only the
# captions where some method hallucinated, the columns of greedy, VCD, PAI and OPERA (those present).
# Needs Debian's chromium (apt-get install -y chromium) and Pillow. PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
sweep=""
view="table=chair&object=*&runs=greedy,vcd,pai,opera"
while [ $# -gt 0 ]; do
  case "$1" in
    --from) sweep="${2:?--from needs a multirun directory}"; shift 2 ;;
    --view) view="${2:?--view needs an address preset}"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "unknown option $1; see docs/make_pictures.sh --help" >&2; exit 2 ;;
    *) sweep="$1"; shift ;;  # the older spelling: docs/make_pictures.sh SWEEP_DIR
  esac
done
if [ -z "$sweep" ]; then
  sweep="outputs/pictures/toy_sweep"
  "$python" -m benchmarks --multirun model=toy method=greedy,vcd benchmark=chair,pope_random limit=20 \
    progress=false "hydra.sweep.dir=$sweep"
fi
[ -d "$sweep" ] || { echo "$sweep is not a directory: pass the multirun's sweep dir (it holds multirun.yaml)" >&2; exit 2; }
command -v chromium >/dev/null || { echo "chromium not found: apt-get install -y chromium" >&2; exit 2; }
# The summary (table, plot) and the results browser, re-made from the sweep's result.json files.
"$python" -c "import sys; from pathlib import Path; from benchmarks.summary import write_summary; write_summary(Path(sys.argv[1]))" "$sweep"
cp "$sweep/summary.png" docs/summary.png
page="$("$python" -m benchmarks.browse "$sweep")"
shot="$(mktemp --suffix=.png)"
trap 'rm -f "$shot"' EXIT
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --virtual-time-budget=5000 \
  --window-size=1400,1000 --screenshot="$shot" "file://$(realpath "$page")#$view" 2>/dev/null
# Small enough for the repository: the blank page below the table cut off, at most 1200 pixels wide, 256 colours.
"$python" - "$shot" docs/browser.png <<'EOF'
import sys
from PIL import Image, ImageChops

with Image.open(sys.argv[1]) as image:
    image = image.convert("RGB")
    drawn = ImageChops.difference(image, Image.new("RGB", image.size, "white")).getbbox()
    if drawn is not None:
        image = image.crop((0, 0, image.width, min(image.height, drawn[3] + 12)))
    if image.width > 1200:
        image = image.resize((1200, round(image.height * 1200 / image.width)), Image.LANCZOS)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(sys.argv[2], optimize=True)
EOF
ls -l docs/summary.png docs/browser.png
