#!/usr/bin/env bash
# The whole pipeline behind results/, as run on the 2-core CPU machine (about 50 minutes). Every choice
# is made on validation data; the test set is read only by each final retrain.
set -euo pipefail
cd "$(dirname "$0")/.."
export MNIST_DATA_DIR="${MNIST_DATA_DIR:-../shared/data}"
BACKBONE=results/stage1/best_params.json
STAGE2=(--stage optim --backbone "$BACKBONE" --seeds 0 --n-trials 8 --final-epochs 12)

# stage 1: the network (MNIST-optuna.py's defaults)
python MNIST-optuna.py --out-dir results/stage1 2>&1 | tee results/stage1.log
# stage 2: how to train it, then the best retrained on all 60,000 images, and a top-3 ensemble
python MNIST-optuna.py "${STAGE2[@]}" --ensemble 3 --out-dir results/stage2 2>&1 | tee results/stage2.log
# the same best recipe retrained with on-device augmentation (no new trials)
python MNIST-optuna.py "${STAGE2[@]}" --retrain-only --augment --storage results/stage2/study.journal \
    --out-dir results/stage2-augment 2>&1 | tee results/stage2-augment.log
