"""Training throughput of the networks that matter against this machine's fp32 matmul peak, side by side.

    python benchmarks/throughput.py [--device auto] [--batch-sizes 128 256] [--repeats 5]

For each network and variant (eager channels_last, the project's default; eager contiguous; torch.compile
with the inductor backend) and batch size: training images/s, achieved GFLOP/s (6 x MACs x images/s:
forward 2, backward 4 FLOPs per MAC) and the model FLOPs utilisation (MFU) against the fp32 matmul peak.
The variants and the peak are measured in interleaved rounds and each number is the median over the
rounds, so a busy neighbour slows all of them alike instead of one; `ratio` lines compare variants by the
median of their per-round ratios. Also evaluation images/s per batch size (with BatchNorm folded into
the convolutions or not), which set data.EVAL_BATCH. Last, the hand recipe's training step in bf16 autocast
against fp32 (`bf16/fp32 training ratio`), where the CPU or GPU computes bf16 natively.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

from mnist_optuna.devices import native_bf16, resolve_device
from mnist_optuna.training import TrainConfig, accuracy_on, autocast, make_optimizer
from models import build_model, count_macs

ROOT = Path(__file__).resolve().parent.parent


def block(channels, kernel=3, pool=False, slope=0.01):
    return {"channels": channels, "kernel": kernel, "pool": pool, "slope": slope, "batch_norm": True}


NETWORKS = {
    # the hand recipe of DESIGN.md (32-32 / pool / 64-64 / pool / 128), inside MNIST-optuna.py's default space
    "hand recipe": {"conv": [block(32), block(32, pool=True), block(64), block(64, pool=True), block(128)],
                    "fc": [], "dropout": 0.0},
    # two networks the first two-stage pipeline found (results/README.md): 16-32 filters, and 32-64 ("wide")
    "searched 10.8 MMAC": {"conv": [block(32, slope=0.02656), block(32, pool=True, slope=0.002209),
                                    block(16, kernel=5, slope=0.0173), block(24, pool=True, slope=0.001346)],
                           "fc": [128], "dropout": 0.1236},
    "searched wide 28.3 MMAC": {"conv": [block(48, slope=0.01117), block(48, pool=True, slope=0.1119),
                                         block(32, kernel=5, slope=0.02174), block(64, pool=True, slope=0.003568)],
                                "fc": [192], "dropout": 0.1922},
    # MNIST-optuna-adv.py's default backbone with a 512-wide head
    "adv backbone + FC 512": {"conv": [block(16, pool=True), block(32, pool=True)], "fc": [512], "dropout": 0.2},
}
VARIANTS = ("eager channels_last", "eager contiguous", "compile channels_last")


def matmul_peak(device, size=2048, seconds=1.0):
    """Sustained fp32 GFLOP/s of a square matmul, the machine's practical peak."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    for _ in range(2):
        a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size ** 3 * count / (time.perf_counter() - started) / 1e9


def training_step(config, device, batch_size, variant, precision="fp32"):
    """A warmed-up training step of `config` in the given variant and precision, on one fixed random batch."""
    torch.manual_seed(0)
    fmt = torch.contiguous_format if "contiguous" in variant else torch.channels_last
    model = build_model(config).to(device).to(memory_format=fmt)
    forward = torch.compile(model) if variant.startswith("compile") else model
    x = torch.randn(batch_size, 1, 28, 28, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch_size,), device=device)
    optimizer = make_optimizer(model, TrainConfig())
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = loss_fn(forward(x).float(), y)
        loss.backward()
        optimizer.step()
    for _ in range(3):  # compiles on the first call
        step()
    return step


def rate(step, batch_size, images, device):
    steps = max(2, images // batch_size)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - started)


def fold_batchnorm(model):
    """An evaluation copy with each BatchNorm folded into the convolution before it."""
    model = build_model(model.config).to(next(model.parameters()).device).eval()
    layers = list(model.features)
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.nn.BatchNorm2d):
            conv = layers[i - 1]
            model.features[i - 1] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, layer)
            model.features[i] = torch.nn.Identity()
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--images", type=int, default=1_500, help="training images per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; each number is their median")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--eval-images", type=int, default=5_000, help="images per evaluation measurement")
    args = parser.parse_args()
    device = resolve_device(args.device, deterministic=False)
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, {args.repeats} interleaved rounds")
    print(f"{'network':22s} {'MMAC':>5s} {'variant':22s} {'batch':>5s} {'img/s':>7s} {'GFLOP/s':>8s} {'MFU':>6s}")
    all_peaks = []
    for name, config in NETWORKS.items():
        if config is None:
            continue
        macs = count_macs(build_model(config))
        for batch_size in args.batch_sizes:
            steps = {variant: training_step(config, device, batch_size, variant) for variant in args.variants}
            rates, peaks = {variant: [] for variant in steps}, []
            for _ in range(args.repeats):  # interleaved: noise from a neighbour hits every variant alike
                peaks.append(matmul_peak(device, seconds=0.3))
                for variant, step in steps.items():
                    rates[variant].append(rate(step, batch_size, args.images, device))
            all_peaks += peaks
            peak = statistics.median(peaks)
            for variant, values in rates.items():
                value = statistics.median(values)
                gflops = 6 * macs * value / 1e9
                print(f"{name:22s} {macs / 1e6:5.1f} {variant:22s} {batch_size:5d} {value:7.0f} {gflops:8.1f} "
                      f"{100 * gflops / peak:5.1f}%")
            base = rates[args.variants[0]]
            for variant in args.variants[1:]:
                ratio = statistics.median(a / b for a, b in zip(rates[variant], base))
                print(f"ratio {variant} / {args.variants[0]}: {ratio:.2f}x")
    print(f"fp32 matmul peak (2048x2048): {statistics.median(all_peaks):.1f} GFLOP/s "
          f"(median of {len(all_peaks)}, interleaved with the measurements)")
    model = build_model(NETWORKS["hand recipe"]).to(device).eval()
    folded = fold_batchnorm(model)
    x = torch.randn(args.eval_images, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.eval_images,), device=device)
    for batch_size in (250, 500, 1000):
        seconds = {"plain": [], "folded BN": []}
        for _ in range(max(1, args.repeats // 2)):
            for label, net in (("plain", model), ("folded BN", folded)):
                started = time.perf_counter()
                accuracy_on(net, x, y, batch_size)
                seconds[label].append(time.perf_counter() - started)
        print(f"evaluation, hand recipe, batch {batch_size:5d}: "
              + ", ".join(f"{label} {len(y) / statistics.median(values):7.0f} img/s"
                          for label, values in seconds.items()))
    bf16_ratio(device, args.batch_sizes[0], args.images, args.repeats)


def bf16_ratio(device, batch_size, images, repeats):
    """The hand recipe's training step with bf16 autocast against fp32, interleaved; only where bf16 is native."""
    native, why = native_bf16(device)
    if not native:
        print(f"bf16/fp32 training ratio: not measured: bf16 is not native here ({why}); training stays fp32")
        return
    steps = {precision: training_step(NETWORKS["hand recipe"], device, batch_size, "eager channels_last", precision)
             for precision in ("fp32", "bf16")}
    rates = {precision: [] for precision in steps}
    for _ in range(repeats):
        for precision, step in steps.items():
            rates[precision].append(rate(step, batch_size, images, device))
    for precision, values in rates.items():
        print(f"hand recipe, batch {batch_size}, {precision} autocast: {statistics.median(values):7.0f} img/s")
    ratio = statistics.median(b / f for b, f in zip(rates["bf16"], rates["fp32"]))
    print(f"bf16/fp32 training ratio: {ratio:.2f}x ({why})")


if __name__ == "__main__":
    main()
