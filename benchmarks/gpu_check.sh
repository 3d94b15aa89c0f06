#!/usr/bin/env bash
# The GPU check for a lent H100/H200, sized to finish within 8 minutes. Needs MNIST under
# $MNIST_DATA_DIR (default ../shared/data) and the requirements installed. Prints the GPU, the
# benchmarks at GPU sizes, both quick searches, a final training, and the times and test accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
export MNIST_DATA_DIR="${MNIST_DATA_DIR:-../shared/data}" PYTHONUNBUFFERED=1
out=$(mktemp -d /tmp/gpu-check.XXXXXX)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

echo "== throughput (training img/s against the matmul peak; batch sizes for a GPU)"
python benchmarks/throughput.py --device cuda --batch-sizes 256 1024 4096 --images 200000
echo "== data pipeline (original loader vs device-resident batches)"
python benchmarks/pipeline.py --device cuda --data-images 60000 --model-images 20000

timed() { local start=$SECONDS; "$@"; echo "-- wall time: $((SECONDS - start)) s"; }
echo "== one epoch of 50,000 images, the main script's default space (3 trials x 1 epoch, deterministic)"
timed python MNIST-optuna.py --seeds 0 --n-trials 3 --epochs 1 --train-subset all --batch-size 256 \
    --no-final --no-plots --out-dir "$out/epoch"
echo "== quick searches"
timed python MNIST-optuna.py --quick --out-dir "$out/quick"
timed python MNIST-optuna-adv.py --quick --out-dir "$out/quick-adv"
echo "== GPU memory over 50 trials (MB allocated after each trial)"
timed python MNIST-optuna-adv.py --fc-depths 1 2 3 --fc-widths 64,128,256,512 128,256,512 128,256,512 \
    --n-trials 50 --epochs 1 --train-subset 10000 --no-final --no-plots --quiet --out-dir "$out/memory"
python - "$out/memory/trials.csv" <<'PY'
import sys, pandas as pd
mb = pd.read_csv(sys.argv[1])["user_attrs_cuda_memory_mb"].dropna()
print(f"trials {len(mb)}: first {mb.iloc[0]:.1f} MB, last {mb.iloc[-1]:.1f} MB, max {mb.max():.1f} MB")
PY
echo "== final training: best of the main search, 12 epochs on 60,000 images"
timed python MNIST-optuna.py --seeds 0 --n-trials 8 --epochs 2 --train-subset all --final-epochs 12 \
    --batch-size 256 --no-plots --out-dir "$out/final"
