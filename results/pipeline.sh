#!/usr/bin/env bash
# The whole pipeline behind results/, as run on the 2-core CPU machine. Every choice is made on
# validation data; the test set is read only by the final retrains.
#   bash results/pipeline.sh                 # every step (about 2 h 20 min on 2 CPU cores)
#   bash results/pipeline.sh stage2 augment  # only the named steps (stage1 | stage2 | augment | augsearch | wide | wide2)
set -euo pipefail
cd "$(dirname "$0")/.."
export MNIST_DATA_DIR="${MNIST_DATA_DIR:-../shared/data}"
STEPS="${*:-stage1 stage2 augment augsearch wide wide2}"
BACKBONE=results/stage1/best_params.json
# stage 2: 16 trials (the first is stage 1's own recipe); the best retrained for 15 epochs on all
# 60,000 images, three times with different seeds, and the 5 best distinct recipes as an ensemble
STAGE2=(--stage optim --backbone "$BACKBONE" --seeds 0 --n-trials 16 --final-epochs 15)

for step in $STEPS; do
  case "$step" in
    stage1)  # the network: MNIST-optuna.py's defaults
      python MNIST-optuna.py --out-dir results/stage1 2>&1 | tee results/stage1.log ;;
    stage2)  # how to train it
      python MNIST-optuna.py "${STAGE2[@]}" --final-seeds 3 --ensemble 5 --out-dir results/stage2 2>&1 \
        | tee results/stage2.log ;;
    augment)  # stage 2's best recipe retrained with on-device augmentation (no new trials)
      python MNIST-optuna.py "${STAGE2[@]}" --retrain-only --augment --storage results/stage2/study.journal \
        --out-dir results/stage2-augment 2>&1 | tee results/stage2-augment.log ;;
    augsearch)  # a stage 2 whose trials train with augmentation, so the recipe is chosen for it
      python MNIST-optuna.py "${STAGE2[@]}" --augment --out-dir results/stage2-augsearch 2>&1 \
        | tee results/stage2-augsearch.log ;;
    wide)  # stage 1 again with twice the filter range (32-64 per conv layer instead of 16-32)
      python MNIST-optuna.py --conv-filters 32 64 16 --out-dir results/stage1-wide 2>&1 | tee results/stage1-wide.log ;;
    wide2)  # stage 2 on the wide network: 8 trials, 12 final epochs (what was left of the session's time)
      python MNIST-optuna.py --stage optim --backbone results/stage1-wide/best_params.json --seeds 0 --n-trials 8 \
        --final-epochs 12 --out-dir results/stage2-wide 2>&1 | tee results/stage2-wide.log ;;
    *) echo "unknown step '$step'; choose among stage1 stage2 augment augsearch wide wide2" >&2; exit 2 ;;
  esac
done
