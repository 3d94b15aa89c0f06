"""Training throughput of the scripts' CNNs against this machine's fp32 matmul peak, measured in one run.

    python benchmarks/throughput.py [--device auto] [--batch-sizes 64 128 256]

For each network, memory format (channels_last on/off) and batch size: training images/s, achieved
GFLOP/s (6 x MACs x images/s: forward 2, backward 4 FLOPs per MAC) and the model FLOPs utilisation
(MFU) against the fp32 matmul peak measured first in the same process. Also evaluation images/s per
evaluation batch size, which set data.EVAL_BATCH.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models import build_model, count_macs  # noqa: E402
from training import TrainConfig, evaluate, make_optimizer, resolve_device  # noqa: E402


def block(channels, kernel=3, pool=False):
    return {"channels": channels, "kernel": kernel, "pool": pool, "slope": 0.01, "batch_norm": True}


NETWORKS = {
    # the middle of MNIST-optuna.py's default search space (4 conv layers, pools after 2 and 4)
    "main search, mid-space": {"conv": [block(24), block(24, pool=True), block(24), block(24, pool=True)],
                               "fc": [128], "dropout": 0.2},
    # MNIST-optuna-adv.py's default backbone with a 512-wide head
    "adv backbone + FC 512": {"conv": [block(16, pool=True), block(32, pool=True)], "fc": [512], "dropout": 0.2},
}


def matmul_peak(device, size=2048, seconds=2.0):
    """Sustained fp32 GFLOP/s of a square matmul, the machine's practical peak."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    for _ in range(3):
        a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size ** 3 * count / (time.perf_counter() - started) / 1e9


def train_rate(config, device, batch_size, channels_last, steps):
    torch.manual_seed(0)
    model = build_model(config).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(batch_size, 1, 28, 28, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch_size,), device=device)
    optimizer = make_optimizer(model, TrainConfig())
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--images", type=int, default=3_000, help="training images per measurement")
    args = parser.parse_args()
    device = resolve_device(args.device)
    peak = matmul_peak(device)
    print(f"device: {device}, torch threads: {torch.get_num_threads()}")
    print(f"fp32 matmul peak (2048x2048): {peak:.1f} GFLOP/s")
    print(f"{'network':24s} {'MMAC':>6s} {'ch_last':>7s} {'batch':>5s} {'img/s':>8s} {'GFLOP/s':>8s} {'MFU':>6s}")
    for name, config in NETWORKS.items():
        macs = count_macs(build_model(config))
        for channels_last in (False, True):
            for batch_size in args.batch_sizes:
                rate = train_rate(config, device, batch_size, channels_last, max(3, args.images // batch_size))
                gflops = 6 * macs * rate / 1e9
                print(f"{name:24s} {macs / 1e6:6.1f} {str(channels_last):>7s} {batch_size:5d} {rate:8.0f} "
                      f"{gflops:8.1f} {100 * gflops / peak:5.1f}%")
    config = NETWORKS["main search, mid-space"]
    model = build_model(config).to(device)
    x = torch.randn(10_000, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (10_000,), device=device)
    for batch_size in (250, 500, 1000, 2000):
        evaluate(model, x[:1000], y[:1000], batch_size)
        started = time.perf_counter()
        evaluate(model, x, y, batch_size)
        print(f"evaluation, batch {batch_size:5d}: {10_000 / (time.perf_counter() - started):8.0f} img/s")


if __name__ == "__main__":
    main()
