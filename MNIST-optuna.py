"""Seeded TPE search over the model hyperparameters of an MNIST CNN, repeated over seeds.

    python MNIST-optuna.py                      # the defaults below: about 10 minutes on 2 CPU cores
    python MNIST-optuna.py --quick              # a smoke run, about 20 seconds
    python MNIST-optuna.py --seeds 0 1 2 --n-trials 50 --epochs 3 --train-subset all
    python MNIST-optuna.py --stage optim --backbone runs/X/best_params.json   # stage 2: its training
    python MNIST-optuna.py --evaluate runs/X/model.pt                          # test accuracy, size, MACs

Each seed gets its own study (<prefix>-seed<N>, TPE seeded with N; stage 2: <prefix>-optim-seed<N>).
Trials are scored on a fixed, seeded validation split; the best network is then retrained on
train+validation and the test set is read once, at the very end.
"""
import optuna

import cli
from cli import check, log
from data import load_search_data, resolve_data_dir
from models import build_model, count_macs, describe
from studies import (PRUNERS, Stopwatch, best_or_none, best_params_payload, claim, command_line, finish_run,
                     make_pruner, mean_std, network_of, open_run_folder, open_study, optimize_until, params_lines,
                     print_trial_lines, progress, read_backbone, remaining_trials, requeue_lost_trials, run_trial,
                     search_settings, start_run, state_counts, train_config, training_of, write_json, write_trials_csv)
from training import (OPTIMIZERS, SCHEDULES, TrainConfig, describe_device, ensemble_accuracy,
                      evaluate_checkpoints,
                      resolve_device)

# ---- study -------------------------------------------------------------------
SEEDS = [0, 1]                # one TPE study per seed; the summary compares them
N_TRIALS = 6                  # trials per seed that this run folder adds to each study
N_STARTUP_TRIALS = 3          # random trials before TPE models the space
PRUNER = "hyperband"          # hyperband | median | none (steps are epochs)
STORAGE = None                # None: a journal file in OUT_DIR; a file path; or sqlite:///… / postgresql://…
STUDY_PREFIX = "mnist-cnn"    # studies are named <prefix>-seed<N>
# ---- data ----------------------------------------------------------------------
DATA_DIR = None               # None: $MNIST_DATA_DIR, else ./data (holds MNIST/raw/)
VAL_SIZE = 10_000             # validation images, a stratified seeded draw from the 60,000
TRAIN_SUBSET = 10_000         # training images per trial (stratified); None: all 50,000 left
SPLIT_SEED = 0                # the validation split and subset; the same for every seed's study
# ---- training of each trial (optimization hyperparameters, fixed here) ----------
EPOCHS = 3                    # epochs per trial; the pruner's steps
BATCH_SIZE = 128              # images per step
LR = 3e-3                     # peak learning rate (one-cycle)
OPTIMIZER = "adamw"           # adam | adamw | sgd
WEIGHT_DECAY = 5e-4           # L2 through the optimizer
L1 = 0.0                      # explicit L1 penalty on weights (torch has no built-in)
LABEL_SMOOTHING = 0.1         # label smoothing of the cross-entropy
SCHEDULE = "onecycle"         # none | cosine | onecycle
# ---- search space (model hyperparameters) -------------------------------------
CONV_LAYERS = 5               # conv blocks: conv -> BN -> LeakyReLU, as in the original skeleton
POOL_AFTER = [2, 4]           # 2x2 max-pool after these conv blocks (1-based)
CONV_FILTERS = (16, 64, 16)   # (low, high, step) of the filters of the blocks before the first pool
FILTER_GROWTH = 2             # each pool multiplies that range: 16-64, then 32-128, then 64-256 filters
KERNEL_SIZES = [3, 5]         # choices for every conv layer
MAX_MMAC = 32                 # compute budget: a network over this many million MACs per image is never trained
SLOPE = (1e-3, 0.2)           # LeakyReLU negative slope range per conv layer (log scale)
BATCH_NORM = [True]           # choices; [True, False] lets the search decide
DROPOUT = (0.0, 0.5)          # dropout range in the FC head (never before a BatchNorm)
FC_WIDTH = (64, 256, 64)      # (low, high, step) of the one hidden FC layer
# ---- stage 2: the optimization hyperparameters of a fixed network ------------------
STAGE = "model"               # model: search the network (stage 1) | optim: search how to train --backbone
BACKBONE = None               # stage 2: a best_params.json (or model.pt) whose network stays fixed
OPTIM_OPTIMIZERS = ["adamw", "sgd"]  # choices
OPTIM_LR = (5e-4, 2e-2)       # peak learning rate range (log scale)
OPTIM_SCHEDULES = ["onecycle", "cosine"]  # choices
OPTIM_WEIGHT_DECAY = (1e-6, 1e-2)  # L2 range (log scale)
OPTIM_L1 = (1e-7, 1e-4)       # L1 range (log scale), when the trial uses L1 at all
OPTIM_BATCH_SIZES = [64, 128, 256]  # choices
OPTIM_LABEL_SMOOTHING = (0.0, 0.15)  # range
OPTIM_EPOCHS = (2, 5)         # epochs per trial; the upper end is the pruner's last step
# ---- final model -------------------------------------------------------------
PROMOTE = 3                   # the N best distinct trials retrained like the final model, chosen on validation
FINAL_EPOCHS = 12             # retrain of the chosen network on train+validation (and of the promoted ones)
FINAL_SUBSET = None           # None: all 60,000 images; a number: a stratified subset (quick runs)
FINAL_SEEDS = 1               # N > 1: retrain the best N times with different seeds (mean ± std)
ENSEMBLE = 0                  # K > 1: also retrain the K best distinct configs and average their softmax
AUGMENT = False               # small random affine per batch on the device (results are labelled)
DEVICE = "auto"               # auto | cpu | cuda | mps
DETERMINISTIC = True          # deterministic kernels; --no-deterministic trades them for GPU speed
OUT_DIR = None                # None: a new timestamped folder under runs/

QUICK = dict(seeds=[0, 1], n_trials=2, n_startup_trials=2, epochs=1, train_subset=5000, val_size=2000,
             batch_size=64, conv_layers=3, pool_after=[1, 2], conv_filters=(8, 16, 8), fc_width=(32, 64, 32),
             promote=2, final_epochs=1, final_subset=10000)


def build_parser():
    p = cli.Parser(__doc__)
    cli.add_shared_flags(p, globals())
    a = p.add_argument
    a("--seeds", type=cli.seed, nargs="+", default=SEEDS, help="one study per seed")
    a("--n-trials", type=cli.positive_int, default=N_TRIALS, help="trials per seed")
    a("--n-startup-trials", type=cli.nonneg_int, default=N_STARTUP_TRIALS, help="random trials before TPE")
    a("--pruner", choices=PRUNERS, default=PRUNER)
    a("--study-prefix", default=STUDY_PREFIX)
    a("--split-seed", type=cli.seed, default=SPLIT_SEED)
    a("--conv-layers", type=cli.positive_int, default=CONV_LAYERS)
    a("--pool-after", type=cli.positive_int, nargs="*", default=POOL_AFTER)
    a("--conv-filters", type=cli.positive_int, nargs=3, default=CONV_FILTERS, metavar=("LOW", "HIGH", "STEP"),
      help="filters of the blocks before the first pool")
    a("--filter-growth", type=cli.positive_int, default=FILTER_GROWTH, help="each pool multiplies --conv-filters")
    a("--max-mmac", type=cli.positive_float, default=MAX_MMAC,
      help="networks over this many million MACs per image are pruned before training")
    a("--kernel-sizes", type=cli.positive_int, nargs="+", default=KERNEL_SIZES)
    a("--slope", type=cli.positive_float, nargs=2, default=SLOPE, metavar=("LOW", "HIGH"))
    a("--batch-norm", type=_bool, nargs="+", default=BATCH_NORM, help="choices among true/false")
    a("--dropout", type=cli.fraction, nargs=2, default=DROPOUT, metavar=("LOW", "HIGH"))
    a("--fc-width", type=cli.positive_int, nargs=3, default=FC_WIDTH, metavar=("LOW", "HIGH", "STEP"))
    a("--stage", choices=("model", "optim"), default=STAGE)
    a("--backbone", default=BACKBONE, help="stage 2: best_params.json or model.pt of the network to keep")
    a("--optim-optimizers", choices=OPTIMIZERS, nargs="+", default=OPTIM_OPTIMIZERS)
    a("--optim-lr", type=cli.positive_float, nargs=2, default=OPTIM_LR, metavar=("LOW", "HIGH"))
    a("--optim-schedules", choices=SCHEDULES, nargs="+", default=OPTIM_SCHEDULES)
    a("--optim-weight-decay", type=cli.positive_float, nargs=2, default=OPTIM_WEIGHT_DECAY, metavar=("LOW", "HIGH"))
    a("--optim-l1", type=cli.positive_float, nargs=2, default=OPTIM_L1, metavar=("LOW", "HIGH"))
    a("--optim-batch-sizes", type=cli.positive_int, nargs="+", default=OPTIM_BATCH_SIZES)
    a("--optim-label-smoothing", type=cli.fraction, nargs=2, default=OPTIM_LABEL_SMOOTHING, metavar=("LOW", "HIGH"))
    a("--optim-epochs", type=cli.positive_int, nargs=2, default=OPTIM_EPOCHS, metavar=("LOW", "HIGH"))
    a("--evaluate", metavar="PATH", nargs="+",
      help="print each checkpoint's test accuracy, parameters and MACs (and, for several, their averaged-softmax "
           "ensemble's), then exit")
    return p


def _bool(text):
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise cli.argparse.ArgumentTypeError(f"{text!r} is not true or false")


def validate(args):
    """Checks across flags, before any work starts."""
    low, high, step = args.conv_filters
    check(low <= high, f"--conv-filters: low {low} is above high {high}")
    low, high, step = args.fc_width
    check(low <= high, f"--fc-width: low {low} is above high {high}")
    check(args.slope[0] <= args.slope[1], "--slope: low is above high")
    check(args.dropout[0] <= args.dropout[1], "--dropout: low is above high")
    check(all(k % 2 == 1 for k in args.kernel_sizes), "--kernel-sizes must be odd (for 'same' padding)")
    check(all(1 <= p <= args.conv_layers for p in args.pool_after),
          f"--pool-after names conv blocks 1..{args.conv_layers}")
    check(len(args.pool_after) <= 4, "--pool-after: at most 4 pools fit a 28x28 image")
    check(len(set(args.seeds)) == len(args.seeds), "--seeds: each seed once")
    cli.check_shared(args)
    for flag in ("optim_lr", "optim_weight_decay", "optim_l1", "optim_label_smoothing", "optim_epochs"):
        low, high = getattr(args, flag)
        check(low <= high, f"--{flag.replace('_', '-')}: low {low} is above high {high}")
    check(args.stage == "model" or args.backbone, "--stage optim needs --backbone PATH (a best_params.json)")
    smallest = count_macs(build_model(suggest_model(SmallestChoice(), args))) / 1e6
    check(args.stage == "optim" or smallest <= args.max_mmac,
          f"--max-mmac {args.max_mmac:g}: even the smallest network of the space needs {smallest:.1f} MMAC; "
          "raise --max-mmac or lower --conv-filters")


class SmallestChoice:
    """Answers every suggest_* with its lowest value, so suggest_model builds the cheapest network of the space."""

    def suggest_int(self, name, low, high, step=1, log=False):
        return low

    def suggest_float(self, name, low, high, step=None, log=False):
        return low

    def suggest_categorical(self, name, choices):
        return min(choices)


def suggest_model(trial, args):
    """The explicit skeleton; only the numbers inside it are searched."""
    conv = []
    for i in range(1, args.conv_layers + 1):
        low, high, step = (value * args.filter_growth ** sum(p < i for p in args.pool_after)
                           for value in args.conv_filters)
        conv.append({
            "channels": trial.suggest_int(f"conv{i}_filters", low, high, step=step),
            "kernel": _choice(trial, f"conv{i}_kernel", args.kernel_sizes),
            "slope": trial.suggest_float(f"conv{i}_slope", *args.slope, log=True),
            "batch_norm": _choice(trial, "batch_norm", args.batch_norm),
            "pool": i in args.pool_after,
        })
    low, high, step = args.fc_width
    return {"conv": conv, "fc": [trial.suggest_int("fc_width", low, high, step=step)],
            "dropout": trial.suggest_float("dropout", *args.dropout), "num_classes": 10}


def _choice(trial, name, choices):
    """A categorical only when there is a choice, so a fixed value does not clutter the study."""
    return trial.suggest_categorical(name, list(choices)) if len(choices) > 1 else choices[0]


def optim_space(args):
    """Stage 2's space, once for the sampler and for the recipe check: (ranges, choices) by parameter name."""
    ranges = {"epochs": args.optim_epochs, "lr": args.optim_lr, "weight_decay": args.optim_weight_decay,
              "l1": args.optim_l1, "label_smoothing": args.optim_label_smoothing}
    choices = {"batch_size": args.optim_batch_sizes, "optimizer": args.optim_optimizers,
               "schedule": args.optim_schedules}
    return ranges, choices


def suggest_training(trial, args):
    """Stage 2: the optimization and regularization hyperparameters of one trial."""
    ranges, choices = optim_space(args)
    use_l1 = trial.suggest_categorical("use_l1", [False, True])
    return TrainConfig(
        epochs=trial.suggest_int("epochs", *ranges["epochs"]),
        batch_size=_choice(trial, "batch_size", choices["batch_size"]),
        optimizer=_choice(trial, "optimizer", choices["optimizer"]),
        lr=trial.suggest_float("lr", *ranges["lr"], log=True),
        schedule=_choice(trial, "schedule", choices["schedule"]),
        weight_decay=trial.suggest_float("weight_decay", *ranges["weight_decay"], log=True),
        l1=trial.suggest_float("l1", *ranges["l1"], log=True) if use_l1 else 0.0,
        label_smoothing=trial.suggest_float("label_smoothing", *ranges["label_smoothing"]),
        augment=args.augment, compile=args.compile)


def recipe_params(train, args):
    """(the stage-2 params that give back `train`, a backbone's own recipe, None), or (None, why it lies outside
    the stage-2 space)."""
    t = TrainConfig.from_dict(train)
    ranges, choices = optim_space(args)
    params = {"use_l1": t.l1 > 0, "epochs": t.epochs, "lr": t.lr, "weight_decay": t.weight_decay,
              "label_smoothing": t.label_smoothing, **({"l1": t.l1} if t.l1 > 0 else {})}
    for name, (low, high) in ranges.items():
        if name in params and not low <= params[name] <= high:
            return None, f"its {name} {params[name]} is outside {low}..{high}"
    for name, options in choices.items():
        value = getattr(t, name)
        if value not in options:
            return None, f"its {name} {value} is not among {' '.join(map(str, options))}"
        if len(options) > 1:  # as in suggest_training: a fixed choice is not a parameter
            params[name] = value
    return params, None


def enqueue_recipe(study, recipe, args):
    """Stage 2's first trial is the backbone's own recipe, so stage 2 can only match or beat it on validation."""
    if recipe is None:
        log.info("stage optim: the backbone carries no training recipe to start from")
        return
    params, why = recipe_params(recipe, args)
    if params is None:
        log.info(f"stage optim: the backbone's recipe is not tried first: {why}")
        return
    study.enqueue_trial(params, skip_if_exists=True)  # once per study, resumes and extra workers included
    recipe_text = ", ".join(f"{name} {value}" for name, value in params.items())
    log.info(f"stage optim: the backbone's own recipe is among the trials ({recipe_text})")


def make_objective(args, data, study_seed, run_id, network=None):
    """Stage 1 searches the network with fixed training; stage 2 the training of a fixed `network`."""
    def objective(trial):
        claim(trial, run_id)
        if network is None:
            return run_trial(trial, suggest_model(trial, args), train_config(args), data, study_seed,
                             max_mmac=args.max_mmac)
        return run_trial(trial, network, suggest_training(trial, args), data, study_seed)
    return objective


def summarise(args, studies, out_dir, wall, describe_trial):
    """Print the summary block; return (best trial, summary dict)."""
    print("\n==== summary ====")
    per_seed, all_trials, best, best_seed = {}, [], None, None
    for seed, study in studies:
        trial = best_or_none(study)
        all_trials += study.trials
        if trial is None:
            print(f"seed {seed}: no complete trial")
            continue
        per_seed[seed] = {"value": trial.value, "trial": trial.number, "params": trial.params}
        print(f"seed {seed}: best val {100 * trial.value:.2f} %  trial {trial.number}  {describe_trial(trial)}")
        if best is None or trial.value > best.value:
            best, best_seed = trial, seed
    counts = state_counts(all_trials)
    mean, std = mean_std([v["value"] for v in per_seed.values()])
    print(f"trials: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed")
    if per_seed:
        print(f"per-seed best: {100 * mean:.2f} ± {100 * std:.2f} % over {len(per_seed)} seeds")
    if best is not None:
        print(f"best trial: val {100 * best.value:.2f} %  seed {best_seed}  trial {best.number}  "
              f"{describe_trial(best)}")
        print("\n".join(params_lines(best.params)))
    print(f"search wall time: {wall:.1f} s")
    summary = {"seeds": per_seed, "counts": counts, "per_seed_best_mean": mean, "per_seed_best_std": std,
               "best": None if best is None else {"seed": best_seed, "trial": best.number, "value": best.value,
                                                 "params": best.params},
               "search_seconds": wall, "command": command_line(), "out_dir": str(out_dir)}
    write_trials_csv(out_dir / "trials.csv", [("seed", seed, study) for seed, study in studies])
    if best is not None:
        write_json(out_dir / "best_params.json", best_params_payload(best, study_seed=best_seed))
    return best, summary


def print_evaluation(paths, data_dir, device):
    """Each checkpoint's test accuracy, size and MACs; for several, their averaged-softmax ensemble's too."""
    clock = Stopwatch()
    members = evaluate_checkpoints(paths, data_dir, device)
    lines = []
    for path, member in zip(paths, members):
        label = " (with augmentation)" if member["meta"].get("augment") else ""
        name = f"{path}: " if len(paths) > 1 else ""
        lines.append(f"{name}test accuracy: {100 * member['accuracy']:.2f} %{label}   parameters: "
                     f"{member['parameters']:,}   MMAC/image: {member['macs'] / 1e6:.1f}")
    if len(paths) > 1:
        label = " (with augmentation)" if any(m["meta"].get("augment") for m in members) else ""
        lines.append(f"ensemble of {len(paths)} (averaged softmax): ensemble test accuracy: "
                     f"{100 * ensemble_accuracy(members):.2f} %{label}   MMAC/image: "
                     f"{sum(m['macs'] for m in members) / 1e6:.1f}")
    print("\n".join(lines) + f"   ({clock.seconds():.1f} s)")
    return 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_with_preset(argv, "--quick", QUICK)
    cli.setup_logging(args.verbose, args.quiet)
    validate(args)
    train_config(args)  # unknown optimizer or schedule names fail here, before any work
    device = resolve_device(args.device, args.deterministic)
    data_dir = resolve_data_dir(args.data_dir)
    if args.evaluate:
        return print_evaluation(args.evaluate, data_dir, device)
    network, recipe = read_backbone(args.backbone) if args.stage == "optim" else (None, None)
    max_steps = args.optim_epochs[1] if network else args.epochs
    make_pruner(args.pruner, max_steps)  # unknown names fail here, before any work
    data = load_search_data(data_dir, device, args.val_size, args.train_subset, args.split_seed)
    out_dir, storage = open_run_folder(args.out_dir, args.storage, must_exist=args.retrain_only)
    run_id = start_run(out_dir, vars(args))
    search = search_settings(args, network=network)
    log.info(f"device: {describe_device(device)}   data: {data_dir}   out: {out_dir}")
    what = f"the training of {describe(network)}" if network else "the network"
    log.info(f"stage {args.stage}: searching {what}; train {len(data.train_y)} / validation {len(data.val_y)} "
             f"images; {len(args.seeds)} seed(s) x {args.n_trials} trials"
             f"{' (with augmentation)' if args.augment else ''}")

    clock, studies, interrupted = Stopwatch(), [], False
    describe_trial = training_of if network else network_of
    prefix = f"{args.study_prefix}-optim" if network else args.study_prefix
    for seed in args.seeds:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=args.n_startup_trials)
        study = open_study(f"{prefix}-seed{seed}", storage, sampler, make_pruner(args.pruner, max_steps), search,
                           args.resume_anyway, must_exist=args.retrain_only)
        studies.append((seed, study))
        requeue_lost_trials(study)
        n_trials = 0 if args.retrain_only else args.n_trials
        todo = remaining_trials(study, n_trials, run_id)
        if network and todo:
            enqueue_recipe(study, recipe, args)
        try:
            with progress(todo, f"seed {seed}") as bar:
                optimize_until(study, make_objective(args, data, seed, run_id, network), n_trials, run_id, callbacks=[print_trial_lines(f"seed {seed}  ", describe_trial),
                                                  lambda s, _: requeue_lost_trials(s),
                                                  lambda s, _: bar.update(1)])
        except (KeyboardInterrupt, Exception) as error:  # Ctrl-C, possibly surfacing as a library's error
            if not cli.interrupted_by_user(error):
                raise
            interrupted = True
            break
    best, summary = summarise(args, studies, out_dir, clock.seconds(), describe_trial)
    best_study = next((study for seed, study in studies if summary["best"] and seed == summary["best"]["seed"]), None)
    return finish_run(args, best, summary, data, data_dir, device, out_dir, interrupted,
                      meta={"study_seed": summary["best"] and summary["best"]["seed"], "stage": args.stage},
                      plot_studies=([study for _, study in studies], best_study),
                      trials=[t for _, study in studies for t in study.trials])


if __name__ == "__main__":
    cli.run(main)
