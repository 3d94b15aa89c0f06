"""Running Optuna studies reliably: the run (device, data, folder, storage, tracker), pruners, one trial (its seed,
the compute budget, no configuration trained twice, one or several objectives), the loop that runs trials until
the run folder has its share, and the ranking (or Pareto front) the final stage draws from. Training itself is
training.py's, what workers agree on is workers.py's; nothing here reads the test set."""
import contextlib
import gc
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from data import load_search_data, resolve_data_dir
from errors import UserError
from mnist_optuna.checkpoints import EpochCheckpoint
from mnist_optuna.cli import interrupted_by_user
from mnist_optuna.devices import describe_device, resolve_device, resolve_precision
from mnist_optuna.reporting import PhaseTimes, by_rank, mmac_of, print_trial_lines, progress
from mnist_optuna.rundir import finish_publish, hold_run_folder, start_run
from mnist_optuna.settings import search_settings
from mnist_optuna.storages import metric_names, open_run_folder, open_study
from mnist_optuna.tracking import Tracker, open_artifact_store
from mnist_optuna.training import (
    Divergence,
    TrainConfig,
    derive_seed,
    last_scores,
    seed_everything,
    train,
)
from mnist_optuna.twins import TwinFound, twin_of, yield_to_twin
from mnist_optuna.workers import (
    INTERRUPTED,
    OVER_BUDGET,
    LiveTrial,
    remaining_trials,
    requeue_lost_trials,
    say_searching,
    wait_for_claims,
    worker_id,
)
from models import build_model, cpu_latency_ms
from models import mmac as network_mmac

log = logging.getLogger(__name__)


PRUNERS = ("hyperband", "median", "none")
# what a study can optimise, and which way; validation accuracy always comes first (trial.values[0])
DIRECTIONS = {"accuracy": "maximize", "mmac": "minimize", "latency": "minimize"}


def make_pruner(name, epochs, n_startup_trials=2, n_warmup_steps=0, interval_steps=1):
    """hyperband | median | none, in units of reported steps (epochs unless reporting is finer)."""
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1), reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps,
                                           interval_steps=interval_steps)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"--pruner {name!r} is unknown; choose one of {', '.join(PRUNERS)}")


def waiting_trials(study):
    return study.get_trials(deepcopy=False, states=(TrialState.WAITING,))


def search(outcome, key, study, objective, n_trials, feed=None):
    """Run trials of `study` (the outcome's study of `key`, added to it here) until this run folder has its n_trials
    counted ones; True when the user stopped the run (the outcome is then interrupted).

    Trials that trained nothing (over the compute budget, a repeat of another trial's configuration) do not
    count, so another round asks again; the sampler has seen them and proposes them less and less. `feed`
    queues the next trial when none waits (the adv grid, one point at a time) and says False when nothing is
    left. Lost trials are queued again before each round and after each trial.
    """
    outcome.add(key, study)
    run_id, label, tracker = outcome.run.run_id, outcome.trial_label(key), outcome.run.tracker
    rounds = 20 + 2 * n_trials
    wait_for_claims(study)
    todo = remaining_trials(study, n_trials, run_id)
    if todo:  # the other workers wait for this one before their final stage (workers.wait_for_others)
        say_searching(study, run_id, True)
    callbacks = [print_trial_lines(label, outcome.describe_trial),
                 *([tracker.trial_callback(outcome.objectives)] if tracker else []),
                 lambda s, _: requeue_lost_trials(s), *([lambda s, _: say_searching(s, run_id, True)] if todo else [])]
    live = LiveTrial(objective)
    try:
        with progress(todo, f"{outcome.label} {key} trials") as bar:
            for _ in range(rounds):
                requeue_lost_trials(study)
                left = remaining_trials(study, n_trials, run_id)
                if not left or (feed is not None and not waiting_trials(study) and not feed(study)):
                    return False
                try:
                    study.optimize(live, n_trials=1 if feed else left, catch=CATCH,
                                   callbacks=[*callbacks, lambda s, _: bar.update(1)])
                except Exception:  # what Optuna raises then varies (a refused write, a refused tell, an assertion)
                    if not live.taken_over(study):
                        raise
                    log.warning(f"{study.study_name}: trial {live.trial.number} was judged lost by another worker "
                                "while this one still trained it (its heartbeat came late) and is queued again; "
                                "going on")
    except (KeyboardInterrupt, Exception) as error:  # Ctrl-C, possibly surfacing as a library's error
        if not interrupted_by_user(error):
            raise
        outcome.interrupted = True
        return True
    finally:
        if todo:
            with contextlib.suppress(Exception):  # a storage that fails here: the others see the process gone
                say_searching(study, run_id, False)
    if remaining_trials(study, n_trials, run_id):
        log.warning(f"{study.study_name}: stopped after {rounds} rounds of trials that trained nothing (networks "
                    "over the compute budget, or repeats); raise --max-mmac or widen the space")
    return False


def claim(trial, run_id):
    """Mark a trial as this worker's and this run folder's; the objective's first act, so that a worker
    killed at any later point leaves a trial that requeue_lost_trials recognises."""
    trial.set_user_attr("worker", worker_id())
    trial.set_user_attr("run", run_id)
    trial.set_user_attr("study", trial.study.study_name)
    # last: until it says this trial's number, the worker above may be a retried trial's inherited dead one
    trial.set_user_attr("claimed", trial.number)
    if trial.user_attrs.get("reason"):  # a retried trial inherits its predecessor's attributes
        trial.set_user_attr("reason", None)


def trial_seed(study_seed, params):
    """The seed of a trial's init and batch order: from the study's seed and the trial's parameters, not its
    number, so a retried trial, a resumed run and another worker train a configuration exactly alike."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    return derive_seed(study_seed, int(digest[:8], 16))



def run_trial(trial, model_config, train_cfg, data, study_seed, reports_per_epoch=1, max_mmac=None,
              objectives=("accuracy",), checkpoint_dir=None, checkpoint_store=None):
    """Train the trial's network, report validation accuracy, prune; return the last validation accuracy, or
    with several `objectives` the values of each (accuracy, MMAC, CPU latency in ms per image) in their order.

    Not trained: a network over `max_mmac` million MACs per image (pruned), and a configuration an earlier
    trial of the study trained or is training (the resumed TPE start-up draws, concurrent workers): it takes
    that trial's value when there is one and is pruned otherwise (always pruned in a multi-objective study,
    so the front never lists one network twice). A diverged loss prunes the trial and an out-of-memory fails
    it. Each keeps its reason in the trial's user attributes; the study goes on. Optuna cannot prune a
    multi-objective trial, so such a trial trains all its epochs and reports nothing on the way.
    With `checkpoint_dir` the training keeps its state there after each epoch: a trial stopped or killed and queued
    again (same parameters, same seed) continues from its last finished epoch, its earlier reports made again;
    with `checkpoint_store` (--artifacts) that state is also in the store, so a worker in another run folder or on
    another machine that takes the lost trial over continues it too.
    """
    several = len(objectives) > 1
    seed = trial_seed(study_seed, trial.params)
    trial.set_user_attr("model", model_config)
    trial.set_user_attr("train", train_cfg.to_dict())
    trial.set_user_attr("seed", seed)
    mmac = network_mmac(model_config)
    trial.set_user_attr("mmac", round(mmac, 2))
    if max_mmac is not None and "mmac_over_budget" not in trial.constraints:  # a retried trial keeps its own
        # Optuna's trial constraint (feasible when <= 0): TPE ranks infeasible trials below every pruned
        # one, the further over budget the lower, so it learns the budget without a made-up value
        trial.set_constraint("mmac_over_budget", mmac - max_mmac)
    if max_mmac is not None and mmac > max_mmac:
        trial.set_user_attr("reason", f"{OVER_BUDGET}: {mmac:.1f} MMAC > {max_mmac:g}")
        raise optuna.TrialPruned(f"{mmac:.1f} MMAC is over the budget of {max_mmac:g}")
    twin = twin_of(trial)
    if twin is not None:
        return yield_to_twin(trial, twin, several)
    seed_everything(seed)
    model = build_model(model_config).to(data.train_x.device)

    last_step = train_cfg.epochs * reports_per_epoch
    checkpoint = None
    if checkpoint_dir is not None:
        identity = {"study": trial.study.study_name if isinstance(trial, optuna.trial.Trial) else None,
                    "model": model_config, "train": train_cfg.to_dict(), "seed": seed,
                    "images": len(data.train_y), "val": len(data.val_y), "reports_per_epoch": reports_per_epoch,
                    "data": data.fingerprint}

        def replay(reports):  # the retried trial gets the reports its predecessor made before the stop
            for step, value in ([] if several else reports):
                trial.report(value, step)
        checkpoint = EpochCheckpoint.keyed(checkpoint_dir, "trial", identity, f"trial {trial.number}", replay,
                                           checkpoint_store)

    def on_report(step, val_accuracy):
        # two workers can start one configuration at the same moment, each reading the study before the
        # other wrote its parameters; one of them always sees the other by its first report, so the later one
        # stops here and only one of them trains (the last report comes after the last training step)
        twin = twin_of(trial)
        if twin is not None:
            raise TwinFound(twin)
        if several:
            return
        trial.report(val_accuracy, step)
        # pruning after the last report would only throw away a finished result
        if step < last_step and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} with validation accuracy {val_accuracy:.4f}")

    stopped = False  # by the user: the only end that keeps the checkpoint (a kill runs no code at all)
    try:
        history = train(model, data.train_x, data.train_y, train_cfg, seed, val=(data.val_x, data.val_y),
                        on_report=on_report, reports_per_epoch=reports_per_epoch, background=data.background,
                        checkpoint=checkpoint)
        if "latency" in objectives:
            trial.set_user_attr("latency_ms", cpu_latency_ms(model))
    except TwinFound as found:
        twin = found.twin
    except Divergence as error:
        trial.set_user_attr("reason", f"diverged: {error}")
        raise optuna.TrialPruned(str(error)) from None
    except (torch.OutOfMemoryError, MemoryError) as error:
        trial.set_user_attr("reason", f"out of memory: {str(error).splitlines()[0] if str(error) else ''}")
        raise
    except BaseException as error:
        stopped = interrupted_by_user(error)
        raise
    finally:
        del model
        release_memory()
        if checkpoint is not None and not stopped:  # pruned, a twin's, failed or done: nothing to resume
            checkpoint.remove()
        if torch.cuda.is_available():  # what a trial leaves behind; flat over many trials means no leak
            trial.set_user_attr("cuda_memory_mb", torch.cuda.memory_allocated() / 2**20)
    if twin is not None:
        return yield_to_twin(trial, twin, several)
    scores = last_scores(history)
    # the score's noise, and the images it got right, for comparisons with other trials on the same images
    trial.set_user_attr("validation", {key: scores[key] for key in ("nll", "images", "correct")})
    measured = {"accuracy": scores["accuracy"], "mmac": mmac,
                "latency": trial.user_attrs.get("latency_ms")}
    return tuple(measured[name] for name in objectives) if several else measured["accuracy"]


def release_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


CATCH = (torch.OutOfMemoryError, MemoryError)  # fail the trial, keep the study going


def train_config(args, precision="fp32"):
    """The per-trial training settings of the shared flags; `precision` is the run's resolved one (Run.precision)."""
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                       weight_decay=args.weight_decay, l1=args.l1, label_smoothing=args.label_smoothing,
                       schedule=args.schedule, augment=args.augment, compile=args.compile, precision=precision)


@dataclass
class Run:
    """One run of a script: where it trains, on what, and where its results and studies go."""
    device: torch.device
    data_dir: Path
    data: object          # data.SearchData: the seeded train/validation split on the device
    out_dir: Path
    storage: object       # the Optuna storage of its studies
    run_id: str           # this run folder's id: a rerun in the folder resumes, a new folder adds trials
    tracker: object = None    # tracking.Tracker of --mlflow, or None
    artifacts: object = None  # the Optuna artifact store of --artifacts, or None
    precision: str = "fp32"   # what --precision resolved to on this device: fp32 | bf16
    folder_lock: object = None  # rundir.hold_run_folder's lock: one running command per run folder
    phases: PhaseTimes = field(default_factory=PhaseTimes)  # each phase's estimate and time, for the closing line


def open_run(args, split_seed, record=None, experiment=None):
    """Device, MLflow, the artifact store and the data (each checked before any folder is made), run folder, storage
    and config.json, in that order."""
    phases = PhaseTimes()  # its clock: the run's, from here
    device = resolve_device(args.device, args.deterministic)
    precision, why = resolve_precision(args.precision, device)
    data_dir = resolve_data_dir(args.data_dir)
    tracker = Tracker(args.mlflow, experiment or "mnist-optuna") if args.mlflow else None
    artifacts = open_artifact_store(args.artifacts)
    data = load_search_data(data_dir, device, args.val_size, args.train_subset, split_seed)
    out_dir, storage = open_run_folder(args.out_dir, args.storage, must_exist=args.retrain_only)
    folder_lock = hold_run_folder(out_dir)  # before config.json: a refused second run rewrites nothing
    if finish_publish(out_dir):  # before anything reads the folder
        log.info(f"{out_dir}: the final stage's files were being moved into place when its run was killed; "
                 "the move is finished")
    run_id = start_run(out_dir, {**vars(args), **(record or {}), "precision": precision})
    log.info(f"device: {describe_device(device)}   precision: {precision} ({why})   data: {data_dir}   out: {out_dir}")
    return Run(device, data_dir, data, out_dir, storage, run_id, tracker, artifacts, precision, folder_lock, phases)


def study_for(run, name, sampler, pruner, args, **resolved):
    """The study `name` in the run's storage. It must have been searched with this run's settings (what
    --backbone resolved to included) unless --resume-anyway; --retrain-only only loads an existing one."""
    resolved = {**resolved, "training_data": run.data.fingerprint}
    return open_study(name, run.storage, sampler, pruner, search_settings(args, **resolved), args.resume_anyway,
                      must_exist=args.retrain_only, objectives=getattr(args, "objectives", ("accuracy",)))


def run_objective(run, suggest, study_seed, reports_per_epoch=1, max_mmac=None, objectives=("accuracy",)):
    """The objective of a search: claim the trial (so a worker killed at any later point leaves a trial that
    requeue_lost_trials recognises), let `suggest(trial)` give (model config, TrainConfig), train it."""
    def objective(trial):
        try:
            claim(trial, run.run_id)
            model_config, train_cfg = suggest(trial)
            return run_trial(trial, model_config, train_cfg, run.data, study_seed, reports_per_epoch, max_mmac,
                             objectives, checkpoint_dir=run.out_dir, checkpoint_store=run.artifacts)
        except BaseException as error:
            # Ctrl-C or SIGTERM at any point of the trial, not only in training: Optuna marks it failed, and
            # this reason makes a rerun queue it again (a trial without it would count as a real failure)
            if interrupted_by_user(error):
                trial.set_user_attr("reason", INTERRUPTED)
            raise
    return objective


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def merged_study(studies, objectives):
    """The finished trials of a run's studies in one in-memory study with the same objectives, and those trials as
    a list: the merged study's trial k is list item k. Its best_trials is the run's Pareto front across seeds (for
    one study, that study's own best_trials), and Optuna's plots draw it."""
    trials = [t for study in studies for t in study.get_trials(deepcopy=False, states=FINISHED)]
    merged = optuna.create_study(directions=[DIRECTIONS[name] for name in objectives])
    merged.set_metric_names(metric_names(objectives))
    merged.add_trials(trials)
    return merged, trials


def rank(outcome):
    """(the candidates for the final model, best first, as (key, trial); the Pareto front as (key, trial)
    sorted by MMAC, or None for one objective). One objective: every complete trial by validation accuracy.
    Several: the front's networks by validation accuracy. Either way only networks within the outcome's
    `pick_mmac` and `max_mmac` MMAC when they are given (a budget lowered since a trial ran rules it out as well);
    ties go to the cheaper network (reporting.by_rank). Chosen on validation alone."""
    objectives = outcome.objectives
    merged, trials = merged_study([study for _, study in outcome.studies], objectives)
    key_of = {study.study_name: key for key, study in outcome.studies}
    keyed = [(key_of.get(t.user_attrs.get("study")), t) for t in trials]
    candidates = [pair for pair in keyed if pair[1].state == TrialState.COMPLETE]
    front = None
    if len(objectives) > 1:
        front = sorted((keyed[t.number] for t in merged.best_trials), key=lambda pair: mmac_of(pair[1]))
        candidates = front
    limit = min((value for value in (outcome.pick_mmac, outcome.max_mmac) if value is not None), default=float("inf"))
    within = [(key, trial) for key, trial in candidates if mmac_of(trial) <= limit]
    key_of_trial = {id(trial): key for key, trial in within}
    return [(key_of_trial[id(trial)], trial) for trial in by_rank(trial for _, trial in within)], front


class SmallestChoice:
    """Answers every suggest_* with its lowest value, so a suggest function builds the cheapest network."""

    def suggest_int(self, name, low, high, step=1, log=False):
        return low

    def suggest_float(self, name, low, high, step=None, log=False):
        return low

    def suggest_categorical(self, name, choices):
        # yes/no answers yes: pooling is what makes a network cheaper, and batch norm adds no MACs
        return True if set(choices) == {False, True} else min(choices)


class MiddleChoice:
    """Answers every suggest_* with the middle of its range (the middle choice), so a suggest function builds a
    typical network of its space: what the search's time estimate trains."""

    def suggest_int(self, name, low, high, step=1, log=False):
        return low + (high - low) // (2 * step) * step

    def suggest_float(self, name, low, high, step=None, log=False):
        return (low * high) ** 0.5 if log else (low + high) / 2

    def suggest_categorical(self, name, choices):
        # pooling yes, as SmallestChoice: a network that never pools is far from typical
        return True if set(choices) == {False, True} else list(choices)[(len(choices) - 1) // 2]


def check_budget(suggest_model, max_mmac):
    """Refuse, before any work, a compute budget that not even the cheapest network of the space fits."""
    smallest = network_mmac(suggest_model(SmallestChoice()))
    if smallest > max_mmac:
        needed = math.ceil(smallest * 1000) / 1000  # rounded up: the advised budget is one the check accepts
        raise UserError(f"--max-mmac {max_mmac:g}: even the smallest network of the space needs {needed:g} MMAC; "
                        "raise --max-mmac or lower --conv-filters")
