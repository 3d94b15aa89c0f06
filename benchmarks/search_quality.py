"""Is the search worth its CPU: the default search's choice against a random network of the same space and against
the hand recipe, each trained at the final fidelity and scored on validation.

    OMP_NUM_THREADS=1 python benchmarks/search_quality.py     # hours on one core; resumes from its JSON
    python benchmarks/search_quality.py --quick                # a smoke run of seconds (after fidelity.py --quick)

Three arms, each network trained with the default final recipe (FINAL_EPOCHS, FINAL_EMA) on the 50,000 training
images and scored on the validation split, 2 seeds each:
- search: MNIST-optuna.py's default search (one run per pair of study seeds, `--seeds 0 1`, `2 3`, `4 5`, run
  through the script itself with --no-final), then its promotion (PROMOTE best distinct trials, the script's own
  rule), whose choice is the arm's network;
- random: the first --random-draws networks of benchmarks/fidelity.py's seeded random draw of the same space
  within the budget, whose final-fidelity runs it reads from that benchmark's JSON (run it first);
- hand: the project's hand recipe (conv 32-32 / pool / 64-64 / pool / 128, benchmarks/throughput.py).
It prints each arm's mean final validation accuracy (each network the mean of its seeds) with its standard error,
the search's margin over random and over the hand recipe with theirs, and each arm's test accuracy, which is
reported and never used to choose. The search's own CPU (search and promotion) is printed beside it.
"""
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import torch
from fidelity import FINAL, common_parser, cpu_model, one_training, prepare, recipes
from throughput import NETWORKS

from data import resolve_data_dir
from errors import UserError
from mnist_optuna import cli, studies
from mnist_optuna.outcome import Outcome
from mnist_optuna.promotion import promote, top_distinct
from mnist_optuna.final import FinalConfig
from mnist_optuna.rundir import write_json
from mnist_optuna.storages import make_storage
from mnist_optuna.training import derive_seed
from models import describe, mmac

ROOT = Path(__file__).resolve().parent.parent


def search_choice(script, space, pair, folder, data, quick):
    """The network the default search and its promotion choose for the study seeds `pair`, and their seconds. The
    search runs through the script (a rerun in the same folder resumes it); the promotion is the script's own."""
    started = time.perf_counter()
    # a smoke run also promotes on a small subset
    command = [sys.executable, str(ROOT / "MNIST-optuna.py"), *(["--quick", "--final-subset", "1000"] if quick else []),
               "--seeds",
               *map(str, pair), "--out-dir", str(folder), "--no-final", "--no-plots", "--quiet",
               "--data-dir", str(data["dir"])]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"the search for seeds {pair} failed: {done.stderr.strip().splitlines()[-1:]}")
    search_seconds = json.loads((folder / "summary.json").read_text())["search_seconds"]
    storage = make_storage(None, folder, must_exist=True)
    searched = [(seed, optuna.load_study(study_name=f"{space.study_prefix}-seed{seed}", storage=storage)) for seed in pair]
    ranked, _ = studies.rank(Outcome(None, str, max_mmac=space.max_mmac, studies=searched))
    ranking = [trial for _, trial in ranked]
    clock = time.perf_counter()
    if space.promote > 1:
        cfg = FinalConfig.from_args(space, data["precision"])
        ranking = promote(top_distinct(ranking, space.promote), data["search"], cfg, folder)["ranking"]
    chosen = ranking[0]
    return {"model": chosen.user_attrs["model"], "study": chosen.user_attrs["study"], "trial": chosen.number,
            "search_val": chosen.values[0], "search_seconds": search_seconds,
            "promotion_seconds": time.perf_counter() - clock, "wall_seconds": time.perf_counter() - started}


def mean_se(values):
    """(mean, standard error of the mean) of the values; the error is nan for one value."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def arm_units(runs):
    """{network: [its final runs]} -> [(mean validation accuracy, mean test accuracy)] of the networks with runs."""
    return [(statistics.fmean(r["accuracy"] for r in found),
             statistics.fmean(r["test_accuracy"] for r in found) if all("test_accuracy" in r for r in found) else None)
            for found in runs.values() if found]


def report(arms):
    """Each arm's final validation accuracy (mean ± s.e. over its networks), the search's margins, the summary line."""
    print("\n==== arms at the final fidelity (validation; test reported, never used) ====")
    print(f"{'arm':8s} {'networks':>8s} {'final val %':>18s} {'test %':>8s}")
    stats = {}
    for name, units in arms.items():
        if not units:
            print(f"{name:8s} {0:8d} {'(no finished runs)':>18s}")
            continue
        mean, se = mean_se([val for val, _ in units])
        tests = [test for _, test in units if test is not None]
        stats[name] = (mean, se, len(units))
        test_text = f"{100 * statistics.fmean(tests):8.2f}" if tests else f"{'':8s}"
        print(f"{name:8s} {len(units):8d} {100 * mean:9.3f} ± {100 * se:5.3f} {test_text}")
    if "search" not in stats:
        print("search vs random: not measured yet (no search arm finished)")
        return
    for other in ("hand", "random"):  # the margin over chance last: the run's summary line
        if other not in stats:
            continue
        (a, sa, na), (b, sb, nb) = stats["search"], stats[other]
        margin, se = a - b, math.sqrt(sa ** 2 + sb ** 2) if not (math.isnan(sa) or math.isnan(sb)) else float("nan")
        verdict = ("no standard error from one unit" if math.isnan(se) else
                   "beyond twice its standard error" if abs(margin) > 2 * se else "within twice its standard error")
        print(f"search vs {other}: {100 * margin:+.3f} +- {100 * se:.3f} points of final validation accuracy "
              f"({na} study seed pair(s), {nb} {'random draws' if other == 'random' else 'hand recipe seeds'}; "
              f"{verdict})")


def main(argv=None):
    parser = common_parser(__doc__, "search_quality.json")
    parser.add_argument("--pairs", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5],
                        help="study seeds, taken two by two (one default run per pair)")
    parser.add_argument("--random-draws", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=2, help="final-fidelity runs per network")
    parser.add_argument("--fidelity-results", default=str(ROOT / "bench-out" / "fidelity.json"),
                        help="benchmarks/fidelity.py's JSON: the random arm's runs")
    args = parser.parse_args(argv)
    if len(args.pairs) % 2:
        raise UserError("--pairs takes study seeds two by two (e.g. --pairs 0 1 2 3)")
    script, space, device, precision, why, subset, train_set, test = prepare(args)
    data_dir = resolve_data_dir(args.data_dir or space.data_dir)
    name, _, recipe = recipes(space, precision)[-1]
    settings = json.loads(json.dumps({"recipe": recipe.to_dict(), "val_size": space.val_size, "quick": args.quick,
                                      "split_seed": space.split_seed, "train_images": len(train_set[1]),
                                      "data": subset.fingerprint}))
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = json.loads(path.read_text()) if path.is_file() else {"settings": settings, "search": {}, "hand": {}}
    if stored["settings"] != settings:
        raise UserError(f"{path} holds a run with other settings (recipe, data or sizes); pass another --results file")
    fidelity = Path(args.fidelity_results)
    random_runs = {}
    if fidelity.is_file():
        theirs = json.loads(fidelity.read_text())["settings"]
        if (theirs["recipes"][FINAL], theirs["train_images"]["all"], theirs["val_size"], theirs["split_seed"],
                theirs["data"]) != (settings["recipe"], settings["train_images"], settings["val_size"],
                                    settings["split_seed"], settings["data"]):
            raise UserError(f"{fidelity} was trained with another final recipe, data or sizes than this run; pass "
                            "the --fidelity-results of a fidelity.py run with the same settings (--quick with --quick)")
    print(f"machine: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); {precision} "
          f"({why}); final fidelity: {recipe.epochs} epochs on {len(train_set[1])} images, EMA {recipe.ema:g}")
    data = {"dir": data_dir, "precision": precision, "search": subset}

    def final_runs(config, record, base_seed):
        for seed in range(args.seeds):
            if str(seed) in record:
                continue
            record[str(seed)] = one_training(config, recipe, derive_seed(base_seed, seed), *train_set, subset, test)
            write_json(path, stored)
            print(f"    seed {seed}: val {100 * record[str(seed)]['accuracy']:.2f} %  "
                  f"({record[str(seed)]['seconds']:.0f} s)", flush=True)
        return [record[str(seed)] for seed in range(args.seeds)]

    hand = NETWORKS["hand recipe"]
    if args.quick:  # the --quick space is a quarter as wide: so is its hand recipe
        hand = {**hand, "conv": [{**block, "channels": block["channels"] // 4} for block in hand["conv"]]}
    print(f"hand recipe: {describe(hand)} ({mmac(hand):.1f} MMAC)")
    hand_runs = final_runs(hand, stored["hand"], 12345)
    search_runs = {}
    for index in range(0, len(args.pairs), 2):
        pair = args.pairs[index:index + 2]
        key = f"{pair[0]} {pair[1]}"
        if key not in stored["search"] or "model" not in stored["search"][key]:
            folder = path.parent / f"{path.stem}-runs" / f"seeds-{pair[0]}-{pair[1]}"
            stored["search"][key] = {**search_choice(script, space, pair, folder, data, args.quick), "finals": {}}
            write_json(path, stored)
            shutil.rmtree(folder, ignore_errors=True)  # its choice is recorded; the folder is only a resume point
        choice = stored["search"][key]
        print(f"search seeds {key}: chose {choice['study']} trial {choice['trial']}, {describe(choice['model'])} "
              f"({mmac(choice['model']):.1f} MMAC), search {choice['search_seconds']:.0f} s + promotion "
              f"{choice['promotion_seconds']:.0f} s")
        search_runs[key] = final_runs(choice["model"], choice["finals"], derive_seed(*pair))
    if fidelity.is_file():
        runs = json.loads(fidelity.read_text())["runs"]
        random_runs = {net: [runs[k] for k in (json.dumps([FINAL, net, s]) for s in range(args.seeds)) if k in runs]
                       for net in range(args.random_draws)}
    finished = sum(len(found) == args.seeds for found in random_runs.values())
    print(f"random: {finished} of {args.random_draws} draws have their {args.seeds} final runs in {fidelity}"
          + ("" if finished == args.random_draws else
             f" ({sum(map(len, random_runs.values()))} runs in all; benchmarks/fidelity.py with that file finishes "
             "them)"))
    # a unit is a network (the mean of its seeds); the hand recipe is one network, so there each seed is a unit
    report({"search": arm_units(search_runs), "random": arm_units(random_runs),
            "hand": arm_units({seed: [run] for seed, run in enumerate(hand_runs)})})


if __name__ == "__main__":
    cli.run(main)
