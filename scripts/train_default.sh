#!/usr/bin/env bash
# The recipe of sr3fast's default 4x model (sr3fast.load("default")): collects the photos
# (scripts/collect_photos.py, listed in DATA.md), then trains the compact-4x preset on data/photos/train,
# validating on the held-out data/photos/val. Seeded and resumable: run it again after an
# interruption and it continues from the newest checkpoint in $OUT.
# Measured: 115 min on a shared 2-core CPU, about 70 min on an idle one (docs/model-card.md).
#
#   bash scripts/train_default.sh [OUT]        # default OUT: runs/default-4x
#   .venv/bin/python scripts/ship_default.py OUT/model.safetensors   # -> sr3fast/weights/default-4x.safetensors
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-runs/default-4x}

[ -f data/photos/manifest.json ] || "$PY" scripts/collect_photos.py --out data/photos

exec "$PY" -m sr3fast.train --data data/photos/train --val data/photos/val --out "$OUT" \
    --preset compact-4x --steps 3250 --batch 16 --lr 2e-4 --warmup 500 --ema-decay 0.999 \
    --loss l1 --seed 0 --workers 0 \
    --val-images 3 --val-steps 50 --val-every 500 --save-every 250 --keep 2 --log-every 25 \
    --resume --quiet
