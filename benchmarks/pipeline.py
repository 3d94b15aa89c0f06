"""Data pipeline, side by side in one run: the original scripts' loader against device-resident batches.

    python benchmarks/pipeline.py --data-dir ../shared/data

(a) original style: torchvision MNIST + ToTensor + Normalize + DataLoader(batch 32, shuffle), as the
    published scripts fed every trial; (b) this project: tensors normalised once on the device,
    batches sliced from a seeded permutation. Both feed the same batch size to the same model.
Baseline and project alternate over --repeats rounds; prints the medians of images/s for data only
and with the reference model, the data-only ratio of each round, and `ratio: N.Nx`, the median of them.
"""
import argparse
import statistics
import time

import torch

from data import batches, ensure_files, load_search_data, resolve_data_dir
from mnist_optuna.devices import resolve_device
from mnist_optuna.training import TrainConfig, make_optimizer
from models import build_model

# a plain BN CNN in the spirit of DESIGN.md's reference (32-64 channels, one FC layer)
REFERENCE = {"conv": [{"channels": 32, "kernel": 3, "pool": True}, {"channels": 64, "kernel": 3, "pool": True}],
             "fc": [128], "dropout": 0.25}


def original_loader(data_dir, batch_size):
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    dataset = datasets.MNIST(str(data_dir), train=True, download=False, transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)


def project_batches(data, batch_size, seed=0):
    return batches(data.all_x, data.all_y, batch_size, torch.Generator().manual_seed(seed))


def time_batches(iterator, images, step=None):
    """Images per second over the first `images` images the iterator yields (plus `step` per batch)."""
    seen, started = 0, time.perf_counter()
    for x, y in iterator:
        if step is not None:
            step(x, y)
        seen += len(y)
        if seen >= images:
            break
    return seen / (time.perf_counter() - started)


def train_step_fn(device):
    torch.manual_seed(0)
    model = build_model(REFERENCE).to(device)
    optimizer = make_optimizer(model, TrainConfig())
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32, help="the original scripts' batch size")
    parser.add_argument("--data-images", type=int, default=60_000, help="images per data-only measurement")
    parser.add_argument("--model-images", type=int, default=6_400, help="images per with-model measurement")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the numbers are their medians")
    args = parser.parse_args(argv)
    data_dir = resolve_data_dir(args.data_dir)
    device = resolve_device(args.device)
    ensure_files(data_dir)
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, batch size {args.batch_size}")

    started = time.perf_counter()
    data = load_search_data(data_dir, device, val_size=10_000)
    print(f"project: one-time load + normalise on the device: {time.perf_counter() - started:.2f} s")

    # baseline and project alternate, `--repeats` times each; the medians (and the median of the per-round
    # ratios) stay put when another job shares the cores for part of the run, where one pair would not
    rounds = {"data only": [], "data + reference model training": []}
    for _ in range(args.repeats):
        rounds["data only"].append((time_batches(original_loader(data_dir, args.batch_size), args.data_images),
                                    time_batches(project_batches(data, args.batch_size), args.data_images)))
        rounds["data + reference model training"].append(
            (time_batches(original_loader(data_dir, args.batch_size), args.model_images, train_step_fn(device)),
             time_batches(project_batches(data, args.batch_size), args.model_images, train_step_fn(device))))

    print(f"{'':34s} {'original (img/s)':>18s} {'project (img/s)':>18s} {'ratio':>8s}   "
          f"(medians of {args.repeats} interleaved rounds)")
    for name, pairs in rounds.items():
        original = statistics.median(a for a, _ in pairs)
        ours = statistics.median(b for _, b in pairs)
        ratio = statistics.median(b / a for a, b in pairs)
        print(f"{name:34s} {original:18,.0f} {ours:18,.0f} {ratio:7.1f}x")
    ratio = statistics.median(b / a for a, b in rounds["data only"])
    spread = [b / a for a, b in rounds["data only"]]
    print(f"data-only ratio per round: {', '.join(f'{r:.1f}x' for r in spread)}")
    print(f"ratio: {ratio:.1f}x")

if __name__ == "__main__":
    main()
