"""Ensemble members one after another on all the cores, or side by side with one core each?

    python benchmarks/members.py                      # 2 members of the hand recipe, 1 epoch of 50,000 images each
    python benchmarks/members.py --train-images 2000  # a smoke run of seconds

The final stage trains an ensemble's members (and seed repeats) one after another, each with every torch thread.
This measures, alone on the machine, the same members trained that way against the same members trained side by
side, one process per member with an equal share of the threads, started together (their start-up and data loading
counted: a final stage that trained members side by side would pay them too; one after another, the data is read
once before the clock starts, as the final stage has it already). Both modes train the same networks
with the same recipe (the default final recipe: moving average, bf16 where native) and seeds; it prints the wall time
of each and their ratio. The members' weights differ between the modes only by the thread count (CPU kernels
reduce in another order), which the test accuracy of each member shows is immaterial.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from throughput import NETWORKS

from data import load_search_data, promotion_training_set, resolve_data_dir
from mnist_optuna.devices import native_bf16
from mnist_optuna.training import TrainConfig, seed_everything, train
from models import build_model

ROOT = Path(__file__).resolve().parent.parent
RECIPE = dict(batch_size=128, optimizer="adamw", lr=3e-3, weight_decay=5e-4, label_smoothing=0.1,
              schedule="onecycle", ema=0.5)


def training_set(args):
    data = load_search_data(resolve_data_dir(args.data_dir), torch.device("cpu"), 10000, split_seed=0)
    return (*promotion_training_set(data, args.train_images), data.background)


def member(args, seed, x, y, background):
    """Train one member in this process; its training seconds."""
    precision = "bf16" if native_bf16(torch.device("cpu"))[0] else "fp32"
    seed_everything(seed)
    model = build_model(NETWORKS[args.network])
    started = time.perf_counter()
    train(model, x, y, TrainConfig(epochs=args.epochs, precision=precision, **RECIPE), seed,
          background=background)
    return time.perf_counter() - started


def side_by_side(args):
    """Every member in its own process, the threads shared out, all started at once; (wall seconds, each member's
    own training seconds)."""
    threads = max(1, args.threads // args.members)
    started = time.perf_counter()
    children = [subprocess.Popen([sys.executable, __file__, "--member", str(seed), "--network", args.network,
                                  "--epochs", str(args.epochs), "--data-dir", str(args.data_dir or ""),
                                  *(["--train-images", str(args.train_images)] if args.train_images else [])],
                                 stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                 env={**os.environ, "OMP_NUM_THREADS": str(threads)})
                for seed in range(args.members)]
    outputs = [child.communicate()[0] for child in children]
    wall = time.perf_counter() - started
    if any(child.returncode for child in children):
        sys.exit("a member process failed:\n" + "\n".join(outputs))
    return wall, [json.loads(output.strip().splitlines()[-1])["seconds"] for output in outputs]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--network", default="hand recipe", choices=sorted(NETWORKS))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=None, help="None: the 50,000 outside validation")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="the machine's threads for both modes")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--member", type=int, default=None, help=argparse.SUPPRESS)  # a child of side_by_side
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or None
    if args.member is not None:
        print(json.dumps({"seconds": member(args, args.member, *training_set(args))}))
        return
    torch.set_num_threads(args.threads)
    print(f"{args.members} members of {args.network}, {args.epochs} epoch(s) on "
          f"{args.train_images or 50000} images; {args.threads} threads; "
          f"{'bf16' if native_bf16(torch.device('cpu'))[0] else 'fp32'}", flush=True)
    x, y, background = training_set(args)  # once, as the final stage has its data already
    started = time.perf_counter()
    for seed in range(args.members):
        member(args, seed, x, y, background)
    serial = time.perf_counter() - started
    print(f"one after another, {args.threads} thread(s) each: {serial:.1f} s", flush=True)
    wall, own = side_by_side(args)
    print(f"side by side, {max(1, args.threads // args.members)} thread(s) each: {wall:.1f} s "
          f"(their training alone: {', '.join(f'{seconds:.1f} s' for seconds in own)}; the rest is start-up and data)")
    print(f"ratio side by side / one after another: {wall / serial:.2f}x")


if __name__ == "__main__":
    main()
