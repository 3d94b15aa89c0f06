"""Time to accuracy of the final training: the old recipe against the new one, side by side, several seeds.

    python benchmarks/time_to_accuracy.py                        # hand recipe, 3 seeds: about 80 min on 2 cores
    python benchmarks/time_to_accuracy.py --seeds 0 --train-images 5000 --old-epochs 2 --new-epochs 1   # a smoke run

Each network is trained on the 50,000 training images (the validation split held out, as promotion trains)
with each recipe: the old one (OLD: 12 epochs, last weights, fp32) and the new one (NEW: fewer epochs, a
moving average of the weights) in fp32 and, where the CPU or GPU computes it natively, in bf16. Runs are
interleaved (seed by seed, every recipe in turn), so a busy neighbour slows them alike. Per recipe it prints
the training seconds per epoch (validation excluded; the median over every epoch of every seed), the
validation accuracy after each epoch (mean over seeds), the time the seed-mean curve takes to reach the old
recipe's final seed-mean validation accuracy (epochs needed x seconds per epoch),
what the last weights (instead of the average) and shift TTA score on validation at the end, and the test
accuracy mean ± std. The test accuracy is reported, never used to choose. Results go to a JSON file as each
run finishes; a rerun with the same file skips the runs it holds.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from throughput import NETWORKS

from data import load_search_data, resolve_data_dir
from mnist_optuna.devices import native_bf16, resolve_device
from mnist_optuna.evaluation import load_test
from mnist_optuna.training import TrainConfig, accuracy_on, seed_everything, train
from models import build_model, count_macs

ROOT = Path(__file__).resolve().parent.parent

# the final training's recipe before the moving average of weights, and the new default of MNIST-optuna.py's final training
OLD = dict(epochs=12, batch_size=128, optimizer="adamw", lr=3e-3, weight_decay=5e-4, label_smoothing=0.1,
           schedule="onecycle", ema=0.0)
NEW = dict(OLD, epochs=8, ema=0.5)


def recipes(args, device):
    """(name, TrainConfig) of each recipe to compare; the old one first."""
    old = TrainConfig(**{**OLD, "epochs": args.old_epochs, "precision": "fp32"})
    found = [("old fp32", old), ("new fp32", TrainConfig(**{**NEW, "epochs": args.new_epochs, "precision": "fp32"}))]
    native, why = native_bf16(device)
    if native or args.bf16_anyway:
        found.append(("new bf16", TrainConfig(**{**NEW, "epochs": args.new_epochs, "precision": "bf16"})))
    print(f"bf16: {'measured' if native or args.bf16_anyway else 'not measured'} ({why})")
    return found


def one_run(config, recipe, seed, data, test):
    seed_everything(seed)
    model = build_model(config).to(data.train_x.device)
    history = train(model, data.train_x, data.train_y, recipe, seed, val=(data.val_x, data.val_y),
                    background=data.background, also_last=True)
    return {"seconds": [record["seconds"] - record["eval_seconds"] for record in history],
            "val": [record["val_accuracy"] for record in history],
            "val_last": [record.get("val_accuracy_last", record["val_accuracy"]) for record in history],
            "val_tta": accuracy_on(model, data.val_x, data.val_y, tta=True, background=data.background),
            "test": accuracy_on(model, *test)}


def mean_curve(runs, key):
    return [statistics.fmean(values) for values in zip(*(run[key] for run in runs))]


def report(network, names, done, seeds):
    runs = {name: [done[json.dumps([network, name, seed])] for seed in seeds
                   if json.dumps([network, name, seed]) in done] for name in names}
    runs = {name: found for name, found in runs.items() if found}
    if not runs:
        return
    old = runs.get(names[0])
    target = mean_curve(old, "val")[-1] if old else None
    print(f"\n==== {network} ====")
    if target is not None:
        print(f"target: the old recipe's final validation accuracy, mean of {len(old)} seed(s): {100 * target:.3f} %")
    times = {}
    for name, found in runs.items():
        curve = mean_curve(found, "val")
        # every epoch is the same work: the median epoch of all seeds is the time of one, robust to a neighbour
        # that slowed a few of them
        per_epoch = statistics.median(s for run in found for s in run["seconds"])
        cumulative = [per_epoch * (i + 1) for i in range(len(curve))]
        reached = next((i for i, value in enumerate(curve) if target is not None and value >= target), None)
        times[name] = cumulative[reached] if reached is not None else None
        tests = [run["test"] for run in found]
        std = statistics.stdev(tests) if len(tests) > 1 else 0.0
        print(f"{name:9s} ({len(found)} seed(s)): {per_epoch:6.1f} s/epoch, {len(curve)} epochs, "
              f"{cumulative[-1]:7.0f} s in all")
        print("   val after each epoch: " + " ".join(f"{100 * v:.2f}" for v in curve))
        print(f"   final val {100 * curve[-1]:.3f} %   last weights {100 * mean_curve(found, 'val_last')[-1]:.3f} %   "
              f"shift TTA {100 * statistics.fmean(run['val_tta'] for run in found):.3f} %")
        reach = (f"{times[name]:.0f} s (epoch {reached + 1})" if times[name] is not None else "not reached")
        print(f"   time to the target: {reach}   test accuracy {100 * statistics.fmean(tests):.3f} ± "
              f"{100 * std:.3f} % (reported, not used to choose)")
    if names[0] not in runs:
        return
    whole = statistics.median(s for run in runs[names[0]] for s in run["seconds"]) * len(runs[names[0]][0]["seconds"])
    for name in list(runs)[1:]:
        if times[name] is None:
            print(f"ratio {name} time to the target / {names[0]} training: n/a (target not reached)")
            continue
        # against the old recipe's whole training (what it costs today), and against the time the old recipe
        # itself took to first reach its final accuracy (a stricter comparison)
        print(f"ratio {name} time to the target / {names[0]} training: {times[name] / whole:.2f}x   "
              f"(/ {names[0]} time to the target: {times[name] / times[names[0]]:.2f}x)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=["hand recipe"], choices=list(NETWORKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--old-epochs", type=int, default=OLD["epochs"])
    parser.add_argument("--new-epochs", type=int, default=NEW["epochs"])
    parser.add_argument("--train-images", type=int, default=None, help="a stratified subset (smoke runs)")
    parser.add_argument("--val-size", type=int, default=10_000)
    parser.add_argument("--bf16-anyway", action="store_true", help="measure bf16 where it is not native too")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--results", default=str(ROOT / "bench-out" / "time_to_accuracy.json"),
                        help="JSON file of finished runs; a rerun skips them")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    data_dir = resolve_data_dir(args.data_dir)
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, seeds {args.seeds}")
    data = load_search_data(data_dir, device, args.val_size, args.train_images)
    test = load_test(data_dir, device, data.mean, data.std)
    found = recipes(args, device)
    names = [name for name, _ in found]
    path = Path(args.results)
    done = json.loads(path.read_text()) if path.is_file() else {}
    for network in args.networks:
        config = NETWORKS[network]
        if config is None:
            print(f"{network}: its best_params.json is not in results/; skipped")
            continue
        print(f"{network}: {count_macs(build_model(config)) / 1e6:.1f} MMAC, {len(data.train_y)} training images")
        for seed in args.seeds:  # interleaved: every recipe in turn for each seed
            for name, recipe in found:
                key = json.dumps([network, name, seed])
                if key in done:
                    continue
                started = time.perf_counter()
                done[key] = one_run(config, recipe, seed, data, test)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(done, indent=1))
                print(f"  {name} seed {seed}: val {100 * done[key]['val'][-1]:.2f} %  "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
        report(network, names, done, args.seeds)


if __name__ == "__main__":
    main()
