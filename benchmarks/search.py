"""One fixed small search with and without pruning, side by side in one run.

    python benchmarks/search.py --data-dir ../shared/data [--pruners hyperband median]

Runs MNIST-optuna.py with the same seed, space and budget once per pruner and once with none, and
prints each search's wall time, best validation accuracy, trial counts and trials per hour, then the
speed-up of each pruner over no pruning and the change in best value (percentage points).
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEARCH = ["--seeds", "0", "--n-trials", "16", "--n-startup-trials", "4", "--epochs", "6", "--train-subset", "4000",
          "--val-size", "4000", "--conv-layers", "2", "--pool-after", "1", "2", "--conv-filters", "8", "32", "8",
          "--kernel-sizes", "3", "5", "--fc-width", "32", "128", "32", "--lr", "3e-3", "--no-final", "--no-plots",
          "--quiet"]


def run_search(pruner, data_dir, folder):
    out = Path(folder) / pruner
    command = [sys.executable, str(ROOT / "MNIST-optuna.py"), *SEARCH, "--pruner", pruner, "--out-dir", str(out)]
    if data_dir:
        command += ["--data-dir", data_dir]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return {"seconds": summary["search_seconds"], "best": summary["best"]["value"], **summary["counts"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--pruners", nargs="+", default=["hyperband", "median"])
    args = parser.parse_args()
    print("search: MNIST-optuna.py " + " ".join(SEARCH))
    with tempfile.TemporaryDirectory() as folder:
        results = {name: run_search(name, args.data_dir, folder) for name in ["none", *args.pruners]}
    print(f"{'pruner':10s} {'wall s':>8s} {'best val %':>10s} {'complete':>8s} {'pruned':>6s} {'trials/h':>8s}")
    for name, r in results.items():
        trials = r["complete"] + r["pruned"] + r["fail"]
        print(f"{name:10s} {r['seconds']:8.1f} {100 * r['best']:10.2f} {r['complete']:8d} {r['pruned']:6d} "
              f"{3600 * trials / r['seconds']:8.0f}")
    base = results["none"]
    for name in args.pruners:
        r = results[name]
        print(f"{name}: speed-up {base['seconds'] / r['seconds']:.2f}x, best value "
              f"{100 * (r['best'] - base['best']):+.2f} pp against no pruning")


if __name__ == "__main__":
    main()
