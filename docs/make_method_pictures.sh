#!/usr/bin/env bash
# Re-make the README's vlmfix.viz picture from the toy model: docs/viz_toy.png, one figure with a picture of
# each kind (image-token maps: GIFT's saliency and PAI's image-attention gain over the toy's patch grid; head
# maps: VHR's vision-aware head divergence and the heads it scaled; PAI's per-token contrast trace).
#
#   docs/make_method_pictures.sh          # about a minute on 2 CPU cores once the full toy is built (builds it
#                                         # first otherwise, ~5-8 minutes)
#
# PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
"$python" -m vlmfix.viz --full --methods gift vhr pai --dpi 80 --out docs/viz_toy.png
ls -l docs/viz_toy.png
