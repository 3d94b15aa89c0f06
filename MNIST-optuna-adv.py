"""How many fully connected layers, and how wide? A seeded grid over distinct FC heads on a fixed conv
backbone, with a median pruner, then the best network retrained on the GPU when there is one.

    python MNIST-optuna-adv.py                          # the whole default grid (245 networks)
    python MNIST-optuna-adv.py --quick                  # a smoke run, about 15 seconds
    python MNIST-optuna-adv.py --backbone runs/X/best_params.json   # the conv part MNIST-optuna.py found

Each distinct network is one grid point: a depth d and one width per layer 1..d, never the widths of
layers a network does not have. Rerunning with the same storage and study name resumes the grid.
"""
import itertools

import numpy as np
import optuna

import cli
from cli import check, log
from data import load_search_data, resolve_data_dir
from errors import UserError
from models import normalise_config
from studies import (CATCH, Stopwatch, best_or_none, best_params_payload, claim, command_line, counted, finish_run,
                     load_network, make_pruner, network_of, open_run_folder, open_study, search_settings,
                     print_trial_lines, progress, remaining_trials, requeue_lost_trials, run_trial, start_run,
                     state_counts, train_config, waiting_trials, write_json, write_trials_csv)
from training import describe_device, resolve_device

# ---- the fixed convolutional backbone -------------------------------------------
BACKBONE = [                  # conv -> BN -> LeakyReLU (-> 2x2 max-pool); or --backbone PATH
    {"channels": 16, "kernel": 3, "slope": 0.01, "batch_norm": True, "pool": True},
    {"channels": 32, "kernel": 3, "slope": 0.01, "batch_norm": True, "pool": True},
]
# ---- the grid (model hyperparameters of the head) -------------------------------
FC_DEPTHS = [1, 2, 3, 4]      # numbers of hidden FC layers to try
FC_WIDTHS = {                 # widths to try at each layer position (1 = first after the backbone)
    1: [128, 256, 512, 1024, 2048],
    2: [256, 512, 1024],
    3: [128, 256, 512],
    4: [128, 256, 512, 1024],
}
DROPOUT = 0.2                 # before every FC layer (no BatchNorm follows it)
# ---- study ---------------------------------------------------------------------
SEED = 0                      # grid order, split, each trial's init and batch order
N_TRIALS = None               # None: the whole grid; else this many networks per run folder
MEDIAN_STARTUP_TRIALS = 5     # MedianPruner: trials that finish before any pruning
MEDIAN_WARMUP_STEPS = 0       # MedianPruner: reports of a trial before it may be pruned
MEDIAN_INTERVAL_STEPS = 1     # MedianPruner: prune checks every this many reports
REPORTS_PER_EPOCH = 1         # validation reports (pruner steps) per epoch; 2 measured slower on CPU (README)
STORAGE = None                # None: a journal file in OUT_DIR; a file path; or sqlite:///… / postgresql://…
STUDY_NAME = "mnist-fc-grid"  # the study's exact name; workers sharing a storage share it
# ---- data ----------------------------------------------------------------------
DATA_DIR = None               # None: $MNIST_DATA_DIR, else ./data (holds MNIST/raw/)
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
# ---- final model -------------------------------------------------------------
PROMOTE = 0                   # N > 1: the N best distinct heads retrained like the final model, chosen on validation
FINAL_EPOCHS = 6              # retrain of the best network on train+validation
FINAL_SUBSET = None           # None: all 60,000 images; a number: a stratified subset (quick runs)
FINAL_SEEDS = 1               # N > 1: retrain the best N times with different seeds (mean ± std)
ENSEMBLE = 0                  # K > 1: also retrain the K best distinct networks and average their softmax
DEVICE = "auto"               # auto (CUDA when available) | cpu | cuda | mps
DETERMINISTIC = True          # deterministic kernels; --no-deterministic trades them for GPU speed
OUT_DIR = None                # None: a new timestamped folder under runs/

QUICK = dict(fc_depths=[1, 2], fc_widths=["32,64", "32,64"], train_subset=4000, val_size=1000, epochs=1,
             batch_size=64, median_startup_trials=2, final_epochs=1, final_subset=6000)


def build_parser():
    p = cli.Parser(__doc__)
    cli.add_shared_flags(p, globals())
    a = p.add_argument
    a("--backbone", default=None, help="best_params.json of MNIST-optuna.py, or a model.pt, for the conv part")
    a("--fc-depths", type=cli.positive_int, nargs="+", default=FC_DEPTHS)
    a("--fc-widths", nargs="+", default=[",".join(map(str, FC_WIDTHS[k])) for k in sorted(FC_WIDTHS)],
      help="comma-separated widths for layer 1, then layer 2, ...")
    a("--dropout", type=cli.fraction, default=DROPOUT)
    a("--seed", type=cli.seed, default=SEED)
    a("--n-trials", type=cli.optional_positive_int, default=N_TRIALS, help="'all' for the whole grid")
    a("--median-startup-trials", type=cli.nonneg_int, default=MEDIAN_STARTUP_TRIALS)
    a("--median-warmup-steps", type=cli.nonneg_int, default=MEDIAN_WARMUP_STEPS)
    a("--median-interval-steps", type=cli.positive_int, default=MEDIAN_INTERVAL_STEPS)
    a("--reports-per-epoch", type=cli.positive_int, default=REPORTS_PER_EPOCH)
    a("--study-name", default=STUDY_NAME)
    return p


def parse_widths(texts):
    widths = []
    for position, text in enumerate(texts, start=1):
        try:
            values = sorted({int(v) for v in text.split(",") if v.strip()})
        except ValueError:
            raise UserError(f"--fc-widths layer {position}: {text!r} is not a comma-separated list of "
                            "integers") from None
        check(values and all(v >= 1 for v in values), f"--fc-widths layer {position}: need widths >= 1")
        widths.append(values)
    return widths


def head_grid(depths, widths):
    """Every distinct FC head, once: for depth d, the product of the widths of layers 1..d only."""
    heads = []
    for depth in sorted(set(depths)):
        check(depth <= len(widths), f"--fc-depths {depth} needs widths for {depth} layers in --fc-widths; "
                                    f"only {len(widths)} given")
        heads += ["-".join(map(str, combo)) for combo in itertools.product(*widths[:depth])]
    return heads


def load_backbone(path):
    """The conv blocks of --backbone (a best_params.json or model.pt), or of BACKBONE."""
    if path is None:
        return normalise_config({"conv": BACKBONE, "fc": []})["conv"]
    return load_network(path)["conv"]


def make_objective(args, backbone, heads, data, run_id):
    def objective(trial):
        claim(trial, run_id)
        head = trial.suggest_categorical("fc", heads)
        widths = [int(w) for w in head.split("-")]
        config = {"conv": backbone, "fc": widths, "dropout": args.dropout, "num_classes": 10}
        return run_trial(trial, config, train_config(args), data, args.seed, reports_per_epoch=args.reports_per_epoch)
    return objective


def grid_order(heads, seed):
    """The grid in the order its seed gives; every worker of a study must pass the same --seed."""
    return [heads[i] for i in np.random.default_rng(seed).permutation(len(heads))]


def next_grid_point(study, order, run_id):
    """The first head in `order` that no trial holds, or None when the grid is done.

    A trial holds its head while queued, training or finished; a failed one only when this run folder
    failed it (an out-of-memory is not retried in a loop), or while its retry is queued. A head whose
    trial failed in another run (a configuration error since fixed, say) is free again.
    """
    held = set()
    for trial in study.get_trials(deepcopy=False):
        if trial.state != optuna.trial.TrialState.FAIL or trial.user_attrs.get("run") == run_id:
            held.add(trial.user_attrs.get("head", trial.params.get("fc")))
    return next((head for head in order if head not in held), None)


def head_of(trial):
    return f"conv backbone + FC {trial.params.get('fc', '?')}"


def main(argv=None):
    args = build_parser().parse_with_preset(argv, "--quick", QUICK)
    cli.setup_logging(args.verbose, args.quiet)
    cli.check_shared(args)
    train_config(args)  # unknown optimizer or schedule names fail here, before any work
    heads = head_grid(args.fc_depths, parse_widths(args.fc_widths))
    backbone = load_backbone(args.backbone)
    device = resolve_device(args.device, args.deterministic)
    data_dir = resolve_data_dir(args.data_dir)
    data = load_search_data(data_dir, device, args.val_size, args.train_subset, args.seed)
    out_dir, storage = open_run_folder(args.out_dir, args.storage, must_exist=args.retrain_only)
    run_id = start_run(out_dir, {**vars(args), "backbone_conv": backbone})
    log.info(f"device: {describe_device(device)}   data: {data_dir}   out: {out_dir}")
    if device.type == "cpu" and args.device == "auto":
        print("no CUDA GPU found: the search and the retrain of the best network run on the CPU")

    # the grid reaches every worker through the study's queue of waiting trials, one point at a time in the
    # seeded order: a retried trial is popped before the next point is queued, so a resumed run trains
    # what an uninterrupted one trains; run_trial never trains a head another trial trained or is training
    order = grid_order(heads, args.seed)
    sampler = optuna.samplers.RandomSampler(seed=args.seed)  # only ever sees queued, fixed heads
    pruner = make_pruner("median", args.epochs, args.median_startup_trials, args.median_warmup_steps,
                         args.median_interval_steps)
    study = open_study(args.study_name, storage, sampler, pruner, search_settings(args, backbone=backbone),
                       args.resume_anyway, must_exist=args.retrain_only)
    print(f"grid size: {len(heads)}")
    requeue_lost_trials(study)
    n_trials = len(heads) if args.n_trials is None else args.n_trials
    done = sum(1 for t in study.trials if counted(t) and t.params.get("fc") in heads)
    todo = 0 if args.retrain_only else remaining_trials(study, n_trials, run_id)
    if args.retrain_only:
        print("--retrain-only: no new trials")
    elif next_grid_point(study, order, run_id) is None and not waiting_trials(study):
        print("the grid is finished already; going straight to the summary")
    else:
        print(f"{done} networks finished before this run; this run trains up to {todo}")

    clock, interrupted = Stopwatch(), False
    objective = make_objective(args, backbone, heads, data, run_id)
    try:
        with progress(todo, "grid") as bar:
            while todo and remaining_trials(study, n_trials, run_id):
                requeue_lost_trials(study)  # a worker that died meanwhile leaves its network to us
                if not waiting_trials(study):
                    head = next_grid_point(study, order, run_id)
                    if head is None:
                        break
                    study.enqueue_trial({"fc": head}, user_attrs={"head": head})
                study.optimize(objective, n_trials=1, catch=CATCH, callbacks=[print_trial_lines()])
                bar.update(1)
    except (KeyboardInterrupt, Exception) as error:  # Ctrl-C, possibly surfacing as a library's error
        if not cli.interrupted_by_user(error):
            raise
        interrupted = True
    wall = clock.seconds()

    best = best_or_none(study)
    counts = state_counts(study.trials)
    print("\n==== summary ====")
    print(f"grid size: {len(heads)}   trials: {counts['complete']} complete, {counts['pruned']} pruned, "
          f"{counts['fail']} failed")
    if best is not None:
        print(f"best trial: val {100 * best.value:.2f} %  trial {best.number}  {head_of(best)}   ({network_of(best)})")
    print(f"search wall time: {wall:.1f} s")
    summary = {"grid_size": len(heads), "counts": counts, "search_seconds": wall, "command": command_line(),
               "best": None if best is None else {"trial": best.number, "value": best.value, "fc": best.params["fc"]}}
    write_trials_csv(out_dir / "trials.csv", [("seed", args.seed, study)])
    if best is not None:
        write_json(out_dir / "best_params.json", best_params_payload(best))
    return finish_run(args, best, summary, data, data_dir, device, out_dir, interrupted, meta={"grid_seed": args.seed},
                      plot_studies=([study], study), trials=study.trials)


if __name__ == "__main__":
    cli.run(main)
