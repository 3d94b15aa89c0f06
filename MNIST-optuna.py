"""Seeded TPE search over the model hyperparameters of an MNIST CNN, repeated over seeds.

    python MNIST-optuna.py                      # the defaults below: about 17 min on 2 cores with native bf16
    python MNIST-optuna.py --quick              # a smoke run, about 20 seconds
    python MNIST-optuna.py --seeds 0 1 2 --n-trials 50 --epochs 3 --train-subset all
    python MNIST-optuna.py --stage optim --backbone runs/X/best_params.json   # stage 2: its training
    python MNIST-optuna.py --evaluate runs/X/model.pt                          # test accuracy, size, MACs
    python MNIST-optuna.py --skeleton searched --objectives accuracy mmac --pick-mmac 5   # a Pareto front

Each seed gets its own study (<prefix>-seed<N>, TPE seeded with N; stage 2: <prefix>-optim-seed<N>).
Trials are scored on a fixed, seeded validation split; networks over MAX_MMAC are never trained; the
PROMOTE best are retrained like the final model and chosen on validation; the chosen network is then
retrained on train+validation and the test set is read once, at the very end.
"""
import dataclasses
import logging

import optuna

from mnist_optuna import cli, evaluation, final, studies
from mnist_optuna.backbone import read_backbone
from mnist_optuna.devices import PRECISIONS
from mnist_optuna.outcome import Outcome
from mnist_optuna.reporting import network_text, training_text
from mnist_optuna.samplers import PositionSeeded
from mnist_optuna.training import TrainConfig, minutes, training_seconds

log = logging.getLogger(__name__)

# ==== search: the settings that define a study, recorded with it (a rerun that changes one is refused) =====
# ---- search space (model hyperparameters) -------------------------------------
SKELETON = "fixed"            # fixed: CONV_LAYERS blocks pooled after POOL_AFTER | searched: depth and pools too
CONV_LAYERS = 5               # fixed skeleton: conv blocks (conv -> BN -> LeakyReLU), as in the original
POOL_AFTER = [2, 4]           # fixed skeleton: 2x2 max-pool after these conv blocks (1-based)
CONV_DEPTH = (2, 6)           # searched skeleton: (low, high) number of conv blocks
MAX_POOLS = 3                 # searched skeleton: at most this many pools, each block choosing (28 -> 14 -> 7 -> 3)
CONV_FILTERS = (16, 64, 16)   # (low, high, step) of the filters of the blocks before the first pool
FILTER_GROWTH = 2             # each pool multiplies that range: 16-64, then 32-128, then 64-256 filters
KERNEL_SIZES = [3, 5]         # choices for every conv layer
MAX_MMAC = 32                 # compute budget: a network over this many million MACs per image is never trained
SLOPE = (1e-3, 0.2)           # LeakyReLU negative slope range per conv layer (log scale)
BATCH_NORM = [True]           # choices; [True, False] lets the search decide
DROPOUT = (0.0, 0.5)          # dropout range in the FC head (never before a BatchNorm)
FC_WIDTH = (64, 256, 64)      # (low, high, step) of the one hidden FC layer
# ---- how the study searches ------------------------------------------------------
STUDY_PREFIX = "mnist-cnn"    # studies are named <prefix>-seed<N>
N_STARTUP_TRIALS = 3          # random trials before TPE models the space
PRUNER = "hyperband"          # hyperband | median | none (steps are epochs)
OBJECTIVES = ["accuracy"]     # accuracy [mmac] [latency]: more than one searches the Pareto front of validation
                              # accuracy vs MACs (and measured CPU ms) per image; Optuna cannot prune such trials
# ---- data of the trials ---------------------------------------------------------
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
AUGMENT = False               # small random affine per batch on the device (results are labelled)
# ---- stage 2: the optimization hyperparameters of a fixed network ------------------
STAGE = "model"               # model: search the network (stage 1) | optim: search how to train BACKBONE
OPTIM_OPTIMIZERS = ["adamw", "sgd"]  # choices
OPTIM_LR = (5e-4, 2e-2)       # peak learning rate range (log scale)
OPTIM_SCHEDULES = ["onecycle", "cosine"]  # choices
OPTIM_WEIGHT_DECAY = (1e-6, 1e-2)  # L2 range (log scale)
OPTIM_L1 = (1e-7, 1e-4)       # L1 range (log scale), when the trial uses L1 at all
OPTIM_BATCH_SIZES = [64, 128, 256]  # choices
OPTIM_LABEL_SMOOTHING = (0.0, 0.15)  # range
OPTIM_EPOCHS = (2, 5)         # epochs per trial; the upper end is the pruner's last step
# ==== run: how much to search, where, on what, and what follows the search (a rerun may change these) ====
# ---- study ---------------------------------------------------------------------
SEEDS = [0, 1]                # one TPE study per seed; the summary compares them
N_TRIALS = 6                  # trials per seed that this run folder adds to each study
STORAGE = None                # None: a journal file in OUT_DIR; a file path; or sqlite:///… / postgresql://…
BACKBONE = None               # stage 2: a best_params.json (or model.pt) whose network stays fixed
PICK_MMAC = None              # retrain the most accurate (front) network within this many MMAC; None: the most accurate
# ---- final model -------------------------------------------------------------
PROMOTE = 2                   # the N best distinct trials retrained like the final model, chosen on validation
PROMOTE_EPOCHS = 3            # epochs of each promoted retrain (on the 50,000 training images); None: FINAL_EPOCHS
FINAL_EPOCHS = 8              # retrain of the chosen network on train+validation
FINAL_EMA = 0.5               # > 0: promoted and final models keep a moving average of their weights over about this
                              # many epochs (the average is scored and saved); 0: the last weights
TTA = False                   # score promoted, final and ensemble models on the image and its 4 one-pixel shifts
FINAL_SUBSET = None           # None: all 60,000 images; a number: a stratified subset (quick runs)
FINAL_SEEDS = 1               # N > 1: retrain the best N times with different seeds (mean ± std)
ENSEMBLE = 0                  # K > 1: also retrain the K best distinct configs and average their softmax
# ---- where and how it runs ------------------------------------------------------
DATA_DIR = None               # None: $MNIST_DATA_DIR, else ./data (holds MNIST/raw/)
PRECISION = "auto"            # auto | fp32 | bf16: bf16 autocast in training (weights fp32); auto: where native
DEVICE = "auto"               # auto | cpu | cuda | mps
DETERMINISTIC = True          # deterministic kernels; --no-deterministic trades them for GPU speed
OUT_DIR = None                # None: a new timestamped folder under runs/
MLFLOW = None                 # MLflow tracking URI (sqlite:///mlflow.db, http://host:5000): trials, final model as runs
ARTIFACTS = None              # folder shared by the workers, or s3://bucket: final files in Optuna's artifact store
# ==== end of the settings: what follows are no flags ==========================

QUICK = dict(SEEDS=[0, 1], N_TRIALS=2, N_STARTUP_TRIALS=2, EPOCHS=1, TRAIN_SUBSET=2000, VAL_SIZE=1000,
             BATCH_SIZE=64, CONV_LAYERS=3, POOL_AFTER=[1, 2], CONV_FILTERS=(8, 16, 8), FC_WIDTH=(32, 64, 32),
             PROMOTE=2, PROMOTE_EPOCHS=None, FINAL_EPOCHS=1, FINAL_SUBSET=4000)


def suggest_model(trial, args):
    """The explicit skeleton (fixed: only the numbers inside it are searched), or with --skeleton searched
    also its depth and where to pool: a block's parameters then exist only in networks that have the block,
    and its filters are a base count times FILTER_GROWTH per pool before it, so each parameter name keeps
    one range whatever the pools."""
    searched = args.skeleton == "searched"
    depth = trial.suggest_int("conv_blocks", *args.conv_depth) if searched else args.conv_layers
    conv, pools = [], 0
    for i in range(1, depth + 1):
        if searched:
            channels = trial.suggest_int(f"conv{i}_base_filters", *args.conv_filters[:2],
                                         step=args.conv_filters[2]) * args.filter_growth ** pools
            pool = pools < args.max_pools and trial.suggest_categorical(f"conv{i}_pool", [False, True])
        else:
            low, high, step = (value * args.filter_growth ** pools for value in args.conv_filters)
            channels = trial.suggest_int(f"conv{i}_filters", low, high, step=step)
            pool = i in args.pool_after
        conv.append({
            "channels": channels,
            "kernel": _choice(trial, f"conv{i}_kernel", args.kernel_sizes),
            "slope": trial.suggest_float(f"conv{i}_slope", *args.slope, log=True),
            "batch_norm": _choice(trial, "batch_norm", args.batch_norm),
            "pool": pool,
        })
        pools += pool
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


def suggest_training(trial, args, precision):
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
        augment=args.augment, compile=args.compile, precision=precision)


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


def main(argv=None):
    args = build_parser().parse_with_preset(argv, "--quick", QUICK)
    cli.setup_logging(args.verbose, args.quiet)
    validate(args)
    if args.evaluate:
        return evaluation.evaluate_command(args.evaluate, args.data_dir, args.device, args.artifacts)
    # stage 1 searches the network; stage 2 (--stage optim) the training of the network of --backbone
    network, recipe = read_backbone(args.backbone, args.artifacts) if args.stage == "optim" else (None, None)
    run = studies.open_run(args, args.split_seed, experiment=args.study_prefix)
    announce(args, run, network)
    def suggest(trial):  # (the network, its training) of one trial
        if network:
            return network, suggest_training(trial, args, run.precision)
        return suggest_model(trial, args), studies.train_config(args, run.precision)
    # one seeded TPE study per seed, each trial scored on the validation split
    describe_trial, max_mmac = (training_text, None) if network else (network_text, args.max_mmac)
    outcome = Outcome(run, describe_trial, objectives=tuple(args.objectives), pick_mmac=args.pick_mmac,
                      max_mmac=max_mmac, extra={"max_mmac": max_mmac}, meta={"stage": args.stage})
    n_trials = 0 if args.retrain_only else args.n_trials
    for seed in args.seeds:
        study = seed_study(args, run, seed, network, recipe)
        objective = studies.run_objective(run, suggest, seed, max_mmac=max_mmac, objectives=args.objectives)
        if studies.search(outcome, seed, study, objective, n_trials):
            break
    # rank on validation (a budget lowered since the search applies too), retrain the chosen one, test it once
    return final.finish(args, outcome)


def trial_epochs(args, network):
    """Epochs of a trial at most: the pruner's last step."""
    return args.optim_epochs[1] if network else args.epochs


def announce(args, run, network):
    """What the search will do and about how long it takes (a mid-size network's measured speed here)."""
    max_steps = trial_epochs(args, network)
    what = f"the training of the network of {args.backbone}" if network else "the network"
    trials = 0 if args.retrain_only else len(args.seeds) * args.n_trials
    typical_recipe = dataclasses.replace(studies.train_config(args, run.precision), epochs=max_steps)
    estimate = trials and trials * training_seconds(network or suggest_model(studies.MiddleChoice(), args),
                                                    typical_recipe, run.device, len(run.data.train_y),
                                                    len(run.data.val_y) * max_steps)
    run.phases.estimate("search", estimate, at_most=True)
    log.info(f"stage {args.stage}: searching {what}; train {len(run.data.train_y)} / validation "
             f"{len(run.data.val_y)} images; {len(args.seeds)} seed(s) x {args.n_trials} trials of {max_steps} "
             f"epochs{' (with augmentation)' if args.augment else ''}: about {minutes(estimate)} at most "
             "(a mid-size network's speed here; pruned trials take less)")
    if len(args.objectives) > 1 and args.pruner != "none":
        log.info(f"objectives {' '.join(args.objectives)}: Optuna cannot prune multi-objective trials, so every "
                 f"trial trains its {max_steps} epochs (--pruner {args.pruner} has no effect)")


def seed_study(args, run, seed, network, recipe):
    """One seed's study (<prefix>-seed<N>; stage 2: <prefix>-optim-seed<N>), made or resumed; TPE seeded with N."""
    searched_skeleton = args.skeleton == "searched" and not network
    # a searched skeleton's parameters come and go with its depth: multivariate TPE on the groups of
    # parameters that occur together models each group where it exists, not absent blocks
    # TPE, its draws a function of the study seed and each trial's position: a resumed search draws what an
    # uninterrupted one draws
    sampler = PositionSeeded(seed, lambda position_seed: optuna.samplers.TPESampler(
        seed=position_seed, n_startup_trials=args.n_startup_trials, multivariate=searched_skeleton,
        group=searched_skeleton))
    name = f"{args.study_prefix}-optim-seed{seed}" if network else f"{args.study_prefix}-seed{seed}"
    pruner = studies.make_pruner("none" if len(args.objectives) > 1 else args.pruner, trial_epochs(args, network))
    study = studies.study_for(run, name, sampler, pruner, args, network=network)
    if network and not args.retrain_only:
        enqueue_recipe(study, recipe, args)
    return study


# ---- command line: a flag per constant above, checks across them --------------------

def build_parser():
    parser = cli.Parser(__doc__)
    cli.add_constant_flags(parser, globals(), __file__, kinds={
        "SEEDS": cli.seed, "SPLIT_SEED": cli.seed, "N_STARTUP_TRIALS": cli.nonneg_int,
        "TRAIN_SUBSET": cli.optional_positive_int, "FINAL_SUBSET": cli.optional_positive_int,
        "WEIGHT_DECAY": cli.nonneg_float, "L1": cli.nonneg_float, "LABEL_SMOOTHING": cli.fraction,
        "DROPOUT": cli.fraction, "OPTIM_LABEL_SMOOTHING": cli.fraction, "STAGE": cli.one_of("model", "optim"),
        "PROMOTE": cli.nonneg_int, "ENSEMBLE": cli.nonneg_int, "PRECISION": cli.one_of(*PRECISIONS),
        "PROMOTE_EPOCHS": cli.optional_positive_int, "FINAL_EMA": cli.nonneg_float, "POOL_AFTER": (cli.positive_int, "*"),
        "MAX_MMAC": cli.positive_float, "OBJECTIVES": cli.one_of(*studies.DIRECTIONS),
        "PICK_MMAC": cli.optional_positive_float, "MAX_POOLS": cli.nonneg_int,
        "SKELETON": cli.one_of("fixed", "searched")})
    cli.add_run_flags(parser, QUICK)
    parser.add_argument("--evaluate", nargs="+", default=[], metavar="MODEL_PT",
                        help="evaluate these checkpoints (model.pt) on the test set, then exit")
    return parser


def validate(args):
    """Checks across flags, before any work starts (each range's LOW <= HIGH is checked by the parser)."""
    cli.check(all(k % 2 == 1 for k in args.kernel_sizes), "--kernel-sizes must be odd (for 'same' padding)")
    cli.check(all(1 <= p <= args.conv_layers for p in args.pool_after),
              f"--pool-after names conv blocks 1..{args.conv_layers}")
    cli.check(len(args.pool_after) <= 4, "--pool-after: at most 4 pools fit a 28x28 image")
    cli.check(len(set(args.pool_after)) == len(args.pool_after), "--pool-after: each block once")
    cli.check(args.max_pools <= 4, "--max-pools: at most 4 pools fit a 28x28 image")
    cli.check(args.objectives[0] == "accuracy" and len(set(args.objectives)) == len(args.objectives),
              "--objectives: accuracy first, then mmac and/or latency, each once (e.g. --objectives accuracy mmac)")
    cli.check(len(args.objectives) == 1 or args.stage == "model",
              "--objectives with mmac or latency compares networks; stage optim trains one fixed network")
    cli.check(len(set(args.seeds)) == len(args.seeds), "--seeds: each seed once")
    cli.check(args.stage == "model" or args.backbone, "--stage optim needs --backbone PATH (a best_params.json)")
    studies.train_config(args)  # unknown optimizer or schedule names fail here, before any work
    for optimizer in args.optim_optimizers:
        TrainConfig(optimizer=optimizer)
    for schedule in args.optim_schedules:
        TrainConfig(schedule=schedule)
    studies.make_pruner(args.pruner, args.epochs)
    if args.stage == "model":
        studies.check_budget(lambda trial: suggest_model(trial, args), args.max_mmac)


if __name__ == "__main__":
    cli.run(main)
