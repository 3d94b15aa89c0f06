"""How many fully connected layers, and how wide? A seeded grid over distinct FC heads on a fixed conv
backbone, with a median pruner, then the best network retrained on the GPU when there is one.

    python MNIST-optuna-adv.py                          # the whole default grid (245 networks)
    python MNIST-optuna-adv.py --quick                  # a smoke run, about 15 seconds
    python MNIST-optuna-adv.py --backbone runs/X/best_params.json   # the conv part MNIST-optuna.py found

Each distinct network is one grid point: a depth d and one width per layer 1..d, never the widths of
layers a network does not have. Rerunning with the same storage and study name resumes the grid.
"""
import itertools
import logging

import numpy as np
import optuna

from mnist_optuna import cli, final, studies, workers
from mnist_optuna.backbone import read_backbone
from mnist_optuna.devices import PRECISIONS
from mnist_optuna.outcome import Outcome
from mnist_optuna.reporting import network_text
from models import build_model, normalise_config

log = logging.getLogger(__name__)

# ==== search: the settings that define the grid's study, recorded with it (a rerun that changes one is refused) ==
# ---- the grid (model hyperparameters of the head) -------------------------------
FC_DEPTHS = [1, 2, 3, 4]      # numbers of hidden FC layers to try
FC_WIDTHS = [                 # widths to try at each layer position, first after the backbone first
    [128, 256, 512, 1024, 2048],  # (on the command line: --fc-widths 128,256,512,1024,2048 256,512,1024 ...)
    [256, 512, 1024],
    [128, 256, 512],
    [128, 256, 512, 1024],
]
HEAD_DROPOUT = 0.2            # dropout before every FC layer (no BatchNorm follows it); fixed, not searched
# ---- the fixed convolutional backbone (--backbone, a run setting, replaces these) ---
CONV_BLOCKS = [               # conv -> BN -> LeakyReLU (-> 2x2 max-pool), as JSON on the command line
    {"channels": 16, "kernel": 3, "slope": 0.01, "batch_norm": True, "pool": True},
    {"channels": 32, "kernel": 3, "slope": 0.01, "batch_norm": True, "pool": True},
]
# ---- how the study searches -------------------------------------------------------
STUDY_NAME = "mnist-fc-grid"  # the study's exact name; workers sharing a storage share it
SEED = 0                      # grid order, split, each trial's init and batch order
MEDIAN_STARTUP_TRIALS = 5     # MedianPruner: trials that finish before any pruning
MEDIAN_WARMUP_STEPS = 0       # MedianPruner: reports of a trial before it may be pruned
MEDIAN_INTERVAL_STEPS = 1     # MedianPruner: prune checks every this many reports
REPORTS_PER_EPOCH = 1         # validation reports (pruner steps) per epoch; 2 measured slower on CPU (README)
# ---- data of the trials ---------------------------------------------------------
VAL_SIZE = 10_000             # validation images, a stratified seeded draw from the 60,000
TRAIN_SUBSET = 10_000         # training images per trial (stratified); None: all 50,000 left
# ---- training (optimization hyperparameters) ------------------------------------
EPOCHS = 2                    # epochs per trial
BATCH_SIZE = 128              # images per step
LR = 3e-3                     # peak learning rate (one-cycle)
OPTIMIZER = "adamw"           # adam | adamw | sgd
WEIGHT_DECAY = 5e-4           # L2 through the optimizer
L1 = 0.0                      # explicit L1 penalty on weights (torch has no built-in)
AUGMENT = False               # small random affine per batch on the device (results are labelled)
LABEL_SMOOTHING = 0.0         # label smoothing of the cross-entropy
SCHEDULE = "onecycle"         # none | cosine | onecycle
# ==== run: how much to search, where, on what, and what follows the search (a rerun may change these) ====
# ---- study ---------------------------------------------------------------------
N_TRIALS = None               # None: the whole grid; else this many networks per run folder
STORAGE = None                # None: a journal file in OUT_DIR; a file path; or sqlite:///… / postgresql://…
BACKBONE = None               # a best_params.json or model.pt whose conv blocks are kept; None: CONV_BLOCKS
                              # (the study records the blocks it resolves to, not the path)
# ---- final model -------------------------------------------------------------
PROMOTE = 0                   # N > 1: the N best distinct heads retrained like the final model, chosen on validation
PROMOTE_EPOCHS = None         # epochs of each promoted retrain; None: FINAL_EPOCHS
FINAL_EPOCHS = 6              # retrain of the best network on train+validation
FINAL_EMA = 0.5               # > 0: promoted and final models keep a moving average of their weights over about this
                              # many epochs (the average is scored and saved); 0: the last weights
TTA = False                   # score promoted, final and ensemble models on the image and its 4 one-pixel shifts
FINAL_SUBSET = None           # None: all 60,000 images; a number: a stratified subset (quick runs)
FINAL_SEEDS = 1               # N > 1: retrain the best N times with different seeds (mean ± std)
ENSEMBLE = 0                  # K > 1: also retrain the K best distinct networks and average their softmax
# ---- where and how it runs ------------------------------------------------------
DATA_DIR = None               # None: $MNIST_DATA_DIR, else ./data (holds MNIST/raw/)
PRECISION = "auto"            # auto | fp32 | bf16: bf16 autocast in training (weights fp32); auto: where native
DEVICE = "auto"               # auto (CUDA when available) | cpu | cuda | mps
DETERMINISTIC = True          # deterministic kernels; --no-deterministic trades them for GPU speed
OUT_DIR = None                # None: a new timestamped folder under runs/
MLFLOW = None                 # MLflow tracking URI (sqlite:///mlflow.db, http://host:5000): trials, final model as runs
ARTIFACTS = None              # folder shared by the workers, or s3://bucket: final files in Optuna's artifact store
# ==== end of the settings: what follows are no flags ==========================

QUICK = dict(FC_DEPTHS=[1, 2], FC_WIDTHS=[[32, 64], [32, 64]], TRAIN_SUBSET=2000, VAL_SIZE=1000, EPOCHS=1,
             BATCH_SIZE=64, MEDIAN_STARTUP_TRIALS=2, FINAL_EPOCHS=1, FINAL_SUBSET=3000)


def head_grid(depths, widths):
    """Every distinct FC head, once: for depth d, the product of the widths of layers 1..d only."""
    heads = []
    for depth in sorted(set(depths)):
        cli.check(depth <= len(widths), f"--fc-depths {depth} needs widths for {depth} layers in --fc-widths; "
                                        f"only {len(widths)} given")
        heads += ["-".join(map(str, combo)) for combo in itertools.product(*widths[:depth])]
    return heads


def backbone_of(args):
    """The conv blocks of --backbone (a best_params.json or model.pt), else CONV_BLOCKS."""
    if args.backbone is None:
        config = normalise_config({"conv": args.conv_blocks, "fc": []})
        build_model(config)  # blocks that do not fit a 28x28 image: one line now, not a failed trial later
        return config["conv"]
    return read_backbone(args.backbone, args.artifacts)[0]["conv"]


def suggest_head(trial, args, backbone, heads):
    """The grid point queued for this trial: the FC head on the fixed backbone."""
    head = trial.suggest_categorical("fc", heads)
    return {"conv": backbone, "fc": [int(w) for w in head.split("-")], "dropout": args.head_dropout, "num_classes": 10}


def grid_order(heads, seed):
    """The grid in the order its seed gives; every worker of a study must pass the same --seed."""
    return [heads[i] for i in np.random.default_rng(seed).permutation(len(heads))]


def next_grid_point(study, order):
    """The first head in `order` that no trial holds, or None when the grid is done.

    A trial holds its head while queued, training or finished. A failed one holds it only when this
    process failed it (an out-of-memory is not retried in a loop); a later run retries a head whose trial
    failed before (a configuration error since fixed, say), and a lost trial's retry holds its own.
    """
    held = set()
    for trial in study.get_trials(deepcopy=False):
        if trial.state != optuna.trial.TrialState.FAIL or trial.user_attrs.get("worker") == workers.worker_id():
            held.add(trial.user_attrs.get("head", trial.params.get("fc")))
    return next((head for head in order if head not in held), None)


def head_text(trial):
    return f"conv backbone + FC {trial.params.get('fc', '?')}   ({network_text(trial)})"


def main(argv=None):
    args = build_parser().parse_with_preset(argv, "--quick", QUICK)
    cli.setup_logging(args.verbose, args.quiet)
    heads = head_grid(args.fc_depths, args.fc_widths)
    backbone = backbone_of(args)
    studies.train_config(args)  # unknown optimizer or schedule names fail here, before any work
    run = studies.open_run(args, args.seed, record={"backbone_conv": backbone}, experiment=args.study_name)
    train_cfg = studies.train_config(args, run.precision)
    if run.device.type == "cpu" and args.device == "auto":
        print("no CUDA GPU found: the search and the retrain of the best network run on the CPU")
    # the grid reaches every worker through the study's queue of waiting trials, one point at a time in the
    # seeded order: a retried trial is popped before the next point is queued, so a resumed run trains
    # what an uninterrupted one trains; run_trial never trains a head another trial trained or is training
    study, order = grid_study(args, run, backbone, heads)
    def feed(study):
        head = next_grid_point(study, order)
        if head is not None:
            study.enqueue_trial({"fc": head}, user_attrs={"head": head})
        return head is not None
    def suggest(trial):  # (the network, its training) of one trial
        return suggest_head(trial, args, backbone, heads), train_cfg
    outcome = Outcome(run, head_text, label="grid seed", key_name="grid_seed", keyed_lines=False,
                      extra={"grid_size": len(heads)})
    objective = studies.run_objective(run, suggest, args.seed, reports_per_epoch=args.reports_per_epoch)
    n_trials = 0 if args.retrain_only else len(heads) if args.n_trials is None else args.n_trials
    studies.search(outcome, args.seed, study, objective, n_trials, feed=feed)
    # rank on validation, retrain the best head on train+validation, test it once
    return final.finish(args, outcome)


def grid_study(args, run, backbone, heads):
    """(the grid's study, made or resumed, the grid in its seeded order); says when nothing is left to train."""
    order = grid_order(heads, args.seed)
    pruner = studies.make_pruner("median", args.epochs, args.median_startup_trials, args.median_warmup_steps,
                                 args.median_interval_steps)
    sampler = optuna.samplers.RandomSampler(seed=args.seed)  # only ever sees queued, fixed heads
    study = studies.study_for(run, args.study_name, sampler, pruner, args, backbone=backbone)
    print(f"grid size: {len(heads)}")
    if args.retrain_only:
        print("--retrain-only: no new trials")
    elif next_grid_point(study, order) is None and not study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        print("the grid is finished already; going straight to the summary")
    return study, order


# ---- command line: a flag per constant above --------------------------------------

def build_parser():
    parser = cli.Parser(__doc__)
    cli.add_constant_flags(parser, globals(), __file__, kinds={
        "CONV_BLOCKS": cli.json_value, "FC_WIDTHS": cli.int_list, "SEED": cli.seed,
        "N_TRIALS": cli.optional_positive_int,
        "MEDIAN_STARTUP_TRIALS": cli.nonneg_int, "MEDIAN_WARMUP_STEPS": cli.nonneg_int, "HEAD_DROPOUT": cli.fraction,
        "TRAIN_SUBSET": cli.optional_positive_int, "FINAL_SUBSET": cli.optional_positive_int,
        "WEIGHT_DECAY": cli.nonneg_float, "L1": cli.nonneg_float, "LABEL_SMOOTHING": cli.fraction,
        "PROMOTE": cli.nonneg_int, "ENSEMBLE": cli.nonneg_int, "PRECISION": cli.one_of(*PRECISIONS),
        "PROMOTE_EPOCHS": cli.optional_positive_int, "FINAL_EMA": cli.nonneg_float})
    cli.add_run_flags(parser, QUICK)
    return parser


if __name__ == "__main__":
    cli.run(main)
