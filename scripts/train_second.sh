#!/usr/bin/env bash
# The second model of the few-step sampling validation (README, "Few-step sampling"): the `small`
# preset (public U-Net variant, 3 levels, attention at 16x16, so unlike the default model it runs
# the attention op), 4x on 16->64 crops of the same training photos, trained briefly. It is a
# validation subject, not a model to ship: its point is a second network, with attention and less
# training, on which the samplers are compared. Seeded and resumable (1200 steps; it was first
# stopped at 200 and at 600, where few-step sampling failed on it: bench/results/
# samplers-second-small-step{200,600}-cpu-2026-12-01.json; resuming with more steps continues it).
#
#   bash scripts/train_second.sh [OUT]        # default OUT: runs/second-small
#   .venv/bin/python bench/sampler_validation.py --model OUT --start-gamma 0.5 --out samplers-small.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-runs/second-small}

[ -f data/photos/manifest.json ] || "$PY" scripts/collect_photos.py --out data/photos

exec "$PY" -m sr3fast.train --data data/photos/train --val data/photos/val --out "$OUT" \
    --preset small --steps 1200 --batch 8 --lr 3e-4 --warmup 100 --ema-decay 0.995 \
    --loss l1 --seed 0 --workers 0 \
    --val-every 0 --save-every 100 --keep 2 --log-every 25 \
    --resume --quiet
