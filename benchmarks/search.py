"""One fixed small search with and without pruning, side by side in one run.

    python benchmarks/search.py --data-dir ../shared/data            # MNIST-optuna.py: none, hyperband, median
    python benchmarks/search.py --data-dir ../shared/data --adv      # MNIST-optuna-adv.py: median per epoch or
                                                                     # per half epoch, against no pruning

Runs the script with the same seed, space and budget once per variant, and prints each search's wall
time, best validation accuracy, trial counts and trials per hour, then each variant's speed-up over
no pruning and the change in best value (percentage points).
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAIN = ["--seeds", "0", "--n-trials", "16", "--n-startup-trials", "4", "--epochs", "6", "--train-subset", "4000",
          "--val-size", "4000", "--conv-layers", "2", "--pool-after", "1", "2", "--conv-filters", "8", "32", "8",
          "--kernel-sizes", "3", "5", "--fc-width", "32", "128", "32", "--lr", "3e-3", "--no-final", "--no-plots",
          "--quiet"]
ADV = ["--fc-depths", "1", "2", "--fc-widths", "16,32,64,128,256", "32,64,128", "--epochs", "4",
       "--train-subset", "4000", "--val-size", "4000", "--median-startup-trials", "4", "--no-final", "--no-plots",
       "--quiet"]
VARIANTS = {
    "main": ("MNIST-optuna.py", MAIN, {"none": ["--pruner", "none"], "hyperband": ["--pruner", "hyperband"],
                                       "median": ["--pruner", "median"]}),
    # no pruning: the median pruner never gets past its start-up trials
    "adv": ("MNIST-optuna-adv.py", ADV, {"none": ["--median-startup-trials", "100000"],
                                         "median/epoch": ["--reports-per-epoch", "1"],
                                         "median/half": ["--reports-per-epoch", "2"]}),
}


def run_search(script, args, data_dir, out):
    command = [sys.executable, str(ROOT / script), *args, "--out-dir", str(out)]
    if data_dir:
        command += ["--data-dir", data_dir]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return {"seconds": summary["search_seconds"], "best": summary["best"]["value"], **summary["counts"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--adv", action="store_true", help="measure MNIST-optuna-adv.py's grid instead")
    args = parser.parse_args()
    script, common, variants = VARIANTS["adv" if args.adv else "main"]
    print(f"search: {script} " + " ".join(common))
    with tempfile.TemporaryDirectory() as folder:
        results = {name: run_search(script, [*common, *extra], args.data_dir, Path(folder) / f"run{i}")
                   for i, (name, extra) in enumerate(variants.items())}
    print(f"{'pruning':13s} {'wall s':>8s} {'best val %':>10s} {'complete':>8s} {'pruned':>6s} {'trials/h':>8s}")
    for name, r in results.items():
        trials = r["complete"] + r["pruned"] + r["fail"]
        print(f"{name:13s} {r['seconds']:8.1f} {100 * r['best']:10.2f} {r['complete']:8d} {r['pruned']:6d} "
              f"{3600 * trials / r['seconds']:8.0f}")
    base = results["none"]
    for name, r in results.items():
        if name != "none":
            print(f"{name}: speed-up {base['seconds'] / r['seconds']:.2f}x, best value "
                  f"{100 * (r['best'] - base['best']):+.2f} pp against no pruning")


if __name__ == "__main__":
    main()
