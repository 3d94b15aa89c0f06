"""Which search fidelity predicts the final ranking, and at what cost.

    OMP_NUM_THREADS=1 python benchmarks/fidelity.py      # 12 networks: hours on one core; resumes from its JSON
    python benchmarks/fidelity.py --quick                 # a smoke run of a few seconds

Draws N networks of MNIST-optuna.py's default space within its compute budget (seeded random draws, the way the
search's start-up trials draw) and trains each at every candidate search fidelity and at the final fidelity: the
default final recipe (FINAL_EPOCHS, FINAL_EMA) on the 50,000 training images, scored on the validation split, with
2 seeds so that the noise floor is measured. Candidate fidelities: today's trial (EPOCHS epochs on TRAIN_SUBSET
images, the last weights) and 1, 2 and 3 epochs on the 50,000 images with the moving average of the final recipe.
For each fidelity and each score (validation accuracy; validation NLL, lower is better) it prints Spearman's rho
with the mean final validation accuracy, a bootstrap interval over the networks, and the training seconds per
trial; and the noise ceiling: rho between the two seeds of the final fidelity (no fidelity can predict one
final run better than another final run of the same network does). The final fidelity's runs also record their test
accuracy, for benchmarks/search_quality.py's report (its random arm); nothing here reads it to choose.

Every finished training goes to the JSON file at once (its scores, the per-image correctness on validation, its
seconds); a rerun with the same file and settings skips what it holds, a rerun with other settings is refused.
Work runs fidelity by fidelity: today's trial fidelity, the final fidelity's first seed, the other candidates, the
final fidelity's second seed; so a partial file already answers the main question.
"""
import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import optuna
import torch

from data import load_search_data, promotion_training_set, resolve_data_dir
from errors import UserError
from mnist_optuna import cli, studies
from mnist_optuna.devices import resolve_device, resolve_precision
from mnist_optuna.promotion import spearman
from mnist_optuna.evaluation import load_test
from mnist_optuna.rundir import write_json
from mnist_optuna.scores import scores_of_logits
from mnist_optuna.training import derive_seed, predict_logits, seed_everything, train
from models import build_model, describe, mmac

ROOT = Path(__file__).resolve().parent.parent

FINAL = "final"
# a fidelity: (name, images: "subset" (TRAIN_SUBSET, as a trial trains) | "all" (the 50,000 outside validation),
# epochs (None: EPOCHS), the final recipe's moving average or not)
CANDIDATES = [("trial: EPOCHS ep x TRAIN_SUBSET", "subset", None, False),
              ("1 ep x all, EMA", "all", 1, True),
              ("2 ep x all, EMA", "all", 2, True),
              ("3 ep x all, EMA", "all", 3, True)]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name.replace("-", "_").removesuffix(".py"), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_model():
    """The CPU's model name as Linux reports it, with whether it computes bf16 natively."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    return f"{name} ({'native bf16' if 'avx512_bf16' in ' '.join(lines) else 'no native bf16'})"


def draw_networks(script, space, n, seed):
    """n networks of the script's space within MAX_MMAC, drawn by Optuna's RandomSampler seeded with `seed`
    (networks over the budget are drawn again, as the search never trains them)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    networks = []
    for _ in range(1000 * n):
        if len(networks) == n:
            break
        trial = study.ask()
        config = script.suggest_model(trial, space)
        over = mmac(config) > space.max_mmac
        study.tell(trial, state=optuna.trial.TrialState.PRUNED if over else optuna.trial.TrialState.COMPLETE,
                   values=None if over else 0.0)
        if not over:
            networks.append(config)
    return networks


def recipes(space, precision):
    """(name, images, TrainConfig) of each candidate fidelity, then of the final fidelity."""
    trial = studies.train_config(space, precision)
    found = [(name.replace("EPOCHS", str(space.epochs)).replace("TRAIN_SUBSET", str(space.train_subset)), images,
              dataclasses.replace(trial, epochs=epochs or space.epochs, ema=space.final_ema if ema else 0.0))
             for name, images, epochs, ema in CANDIDATES]
    found.append((FINAL, "all", dataclasses.replace(trial, epochs=space.final_epochs, ema=space.final_ema)))
    return found


def one_training(config, recipe, seed, x, y, data, test=None):
    """Train `config` with `recipe` from `seed` on (x, y); its validation scores, seconds, and with `test` (images,
    labels) its test accuracy (reported, never used to choose)."""
    seed_everything(seed)
    model = build_model(config).to(x.device)
    started, cpu = time.perf_counter(), time.process_time()
    history = train(model, x, y, recipe, seed, background=data.background)
    scores = scores_of_logits(predict_logits(model, data.val_x), data.val_y)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    found = {**scores, "seconds": seconds, "cpu_seconds": cpu, "train_loss": history[-1]["train_loss"]}
    if test is not None:
        found["test_accuracy"] = (predict_logits(model, test[0]).argmax(1) == test[1]).float().mean().item()
    return found


def bootstrap_interval(a, b, reps=2000, seed=0):
    """A 90 % percentile bootstrap interval of spearman(a, b), resampling the networks."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(reps):
        pick = rng.integers(0, len(a), len(a))
        value = spearman([a[i] for i in pick], [b[i] for i in pick])
        if value is not None:
            values.append(value)
    if not values:
        return None
    return float(np.percentile(values, 5)), float(np.percentile(values, 95))


def rho_text(rho, interval):
    if rho is None:
        return "    n/a"
    band = f"[{interval[0]:+.2f}, {interval[1]:+.2f}]" if interval else ""
    return f"{rho:+.2f} {band:16s}"


def report(runs, names, n_networks, stored_networks=None):
    """The table: each fidelity's rho (accuracy, -NLL) with the final validation accuracy, CPU seconds per trial; the
    noise ceiling; one summary line naming the fidelity with the most rho per training minute."""
    def got(name, net, seed=0):
        return runs.get(json.dumps([name, net, seed]))

    finals = {net: [got(FINAL, net, seed) for seed in (0, 1) if got(FINAL, net, seed)] for net in range(n_networks)}
    nets = [net for net in range(n_networks) if finals[net]]
    target = [statistics.fmean(r["accuracy"] for r in finals[net]) for net in nets]
    print(f"\n==== fidelity against the final validation accuracy ({len(nets)} of {n_networks} networks with a final "
          f"run; rho with a 90 % bootstrap interval) ====")
    print(f"{'fidelity':34s} {'rho accuracy':>24s} {'rho -NLL':>24s} {'CPU s':>8s}")
    best = None
    for name in names:
        if name == FINAL:
            continue
        have = [net for net in nets if got(name, net)]
        if len(have) < 3:
            print(f"{name:34s} {'(fewer than 3 networks scored)':>50s}")
            continue
        final = [target[nets.index(net)] for net in have]
        # CPU seconds: the cost of the training itself, whatever else ran beside it or paused it (wall seconds as the
        # fallback of runs stored before they were recorded)
        seconds = statistics.median(got(name, net).get("cpu_seconds", got(name, net)["seconds"]) for net in have)
        cells = []
        for key, sign in (("accuracy", 1), ("nll", -1)):
            values = [sign * got(name, net)[key] for net in have]
            rho = spearman(values, final)
            cells.append(rho_text(rho, bootstrap_interval(values, final)))
            if rho is not None and (best is None or rho / seconds > best[0] / best[2]):
                best = (rho, f"{name} ({'accuracy' if sign > 0 else 'NLL'})", seconds, len(have))
        print(f"{name:34s} {cells[0]:>24s} {cells[1]:>24s} {seconds:8.0f}")
    if stored_networks is not None and len(nets) >= 3:  # a predictor that trains nothing: the network's size
        sizes = [mmac(stored_networks[net]) for net in nets]
        cell = rho_text(spearman(sizes, target), bootstrap_interval(sizes, target))
        print(f"{'network MMAC (no training)':34s} {cell:>24s} {'':>24s} {0:8d}")
    both = [net for net in nets if len(finals[net]) == 2]
    ceiling = None
    if len(both) >= 3:
        first, second = ([finals[net][k]["accuracy"] for net in both] for k in (0, 1))
        ceiling = spearman(first, second)
        print(f"{'noise ceiling (final seed 0 vs 1)':34s} {rho_text(ceiling, bootstrap_interval(first, second)):>24s}"
              f" {'':>24s} {statistics.median(finals[n][0]['seconds'] for n in both):8.0f}")
        spread = [abs(finals[net][0]["accuracy"] - finals[net][1]["accuracy"]) for net in both]
        print(f"final validation accuracy: networks span {100 * min(target):.2f}-{100 * max(target):.2f} %; "
              f"two seeds of one network differ by {100 * statistics.fmean(spread):.2f} points on average")
    if best is None:
        print("fidelity: not enough networks scored yet")
        return
    ceiling_text = f"noise ceiling {ceiling:+.2f}" if ceiling is not None else "noise ceiling not measured yet"
    print(f"fidelity: most rank correlation per training second: {best[1]}, rho {best[0]:+.2f} at {best[2]:.0f} CPU s per "
          f"trial; {ceiling_text} ({best[3]} networks)")


def common_parser(doc, results):
    """The flags both search benchmarks take."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the scripts' --quick space and sizes: a smoke run")
    parser.add_argument("--train-images", type=int, default=None, help="cap the 50,000 images (smoke runs)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", default=str(ROOT / "bench-out" / results),
                        help="JSON file of finished trainings; a rerun skips them")
    return parser


def prepare(args):
    """(the script, its default (or --quick) settings, device, precision and why, the search's data split, the
    50,000 training images (or --train-images of them), the test set (a fifth of it for a smoke run: its figure
    means nothing there))."""
    script = load_script("MNIST-optuna.py")
    space = script.build_parser().parse_with_preset(["--quick"] if args.quick else [], "--quick", script.QUICK)
    if args.quick:
        args.train_images = args.train_images or 1000
    device = resolve_device(args.device)
    precision, why = resolve_precision(space.precision, device)
    data_dir = resolve_data_dir(args.data_dir or space.data_dir)
    subset = load_search_data(data_dir, device, space.val_size, space.train_subset, space.split_seed)
    test = load_test(data_dir, device, subset.mean, subset.std)
    if args.quick:
        test = (test[0][:2000], test[1][:2000])
    return (script, space, device, precision, why, subset, promotion_training_set(subset, args.train_images), test)


def main(argv=None):
    parser = common_parser(__doc__, "fidelity.json")
    parser.add_argument("--networks", type=int, default=12, help="random networks of the default space")
    parser.add_argument("--draw-seed", type=int, default=0, help="seed of the networks' draw and of their trainings")
    parser.add_argument("--report", action="store_true", help="print the table of the --results file; train nothing")
    args = parser.parse_args(argv)
    if args.report:
        stored = json.loads(Path(args.results).read_text())
        names = [*stored["settings"]["recipes"]]
        for net, config in enumerate(stored["settings"]["networks"]):
            print(f"network {net}: {describe(config)} drop {config['dropout']:.2f} ({mmac(config):.1f} MMAC)")
        return report(stored["runs"], names, len(stored["settings"]["networks"]), stored["settings"]["networks"])
    if args.quick:
        args.networks = min(args.networks, 3)
    script, space, device, precision, why, subset, train_set, test = prepare(args)
    train_sets = {"subset": (subset.train_x, subset.train_y), "all": train_set}
    networks = draw_networks(script, space, args.networks, args.draw_seed)
    found = recipes(space, precision)
    settings = {"networks": networks, "draw_seed": args.draw_seed, "val_size": space.val_size,
                "split_seed": space.split_seed, "train_images": {k: len(v[1]) for k, v in train_sets.items()},
                "recipes": {name: recipe.to_dict() for name, _, recipe in found}, "data": subset.fingerprint}
    settings = json.loads(json.dumps(settings))  # as the file holds them (lists, not tuples)
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = json.loads(path.read_text()) if path.is_file() else {"settings": settings, "runs": {}}
    if stored["settings"] != settings:
        raise UserError(f"{path} holds a run with other settings (networks, recipes or data); pass another "
                        "--results file")
    runs = stored["runs"]
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s); device {device}, {precision} ({why})")
    for net, config in enumerate(networks):
        print(f"network {net}: {describe(config)} drop {config['dropout']:.2f} ({mmac(config):.1f} MMAC)")
    # today's trial fidelity and one final run of every network first: the question that matters most is answered
    # first; then the other candidates, then the final fidelity's second seed (the noise ceiling)
    stages = [(found[0], 0), (found[-1], 0), *[(candidate, 0) for candidate in found[1:-1]], (found[-1], 1)]
    jobs = [(name, images, recipe, net, seed) for (name, images, recipe), seed in stages for net in range(len(networks))]
    for name, images, recipe, net, seed in jobs:
        key = json.dumps([name, net, seed])
        if key in runs:
            continue
        train_seed = derive_seed(args.draw_seed, net) if seed == 0 else derive_seed(args.draw_seed, net, seed)
        runs[key] = one_training(networks[net], recipe, train_seed, *train_sets[images], subset,
                                 test if name == FINAL else None)
        write_json(path, stored)
        result = runs[key]
        print(f"  {name:32s} network {net:2d} seed {seed}: val {100 * result['accuracy']:.2f} %  NLL "
              f"{result['nll']:.4f}  ({result['seconds']:.0f} s)", flush=True)
    report(runs, [name for name, _, _ in found], len(networks), networks)


if __name__ == "__main__":
    cli.run(main)
