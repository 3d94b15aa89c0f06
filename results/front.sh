#!/usr/bin/env bash
# The measured accuracy-vs-compute front: a searched-skeleton, accuracy-vs-MMAC search (one seed, 2-epoch trials on 10,000
# images), then front networks at several budgets retrained like a final model (12 epochs on all 60,000 training
# images, chosen on validation by --pick-mmac) and tested once each. Steps already done are skipped.
#   nohup bash results/front.sh > results/front-points.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
export MNIST_DATA_DIR="${MNIST_DATA_DIR:-../shared/data}"
if [ ! -f results/front/summary.json ]; then
    python MNIST-optuna.py --skeleton searched --objectives accuracy mmac --max-mmac 60 --conv-filters 4 64 4 \
        --fc-width 16 256 16 --seeds 0 --n-trials 40 --n-startup-trials 12 --epochs 2 --no-final --out-dir results/front
fi
for budget in ${BUDGETS:-0.4 1.1 4.6 11 25}; do
    out="results/front-points/mmac-$budget"
    [ -f "$out/model.pt" ] && [ -f "$out/summary.json" ] && continue
    python MNIST-optuna.py --objectives accuracy mmac --seeds 0 --retrain-only --storage results/front/study.journal \
        --pick-mmac "$budget" --promote 0 --final-epochs 12 --no-plots --out-dir "$out"
done
