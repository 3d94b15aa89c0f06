"""Optuna plumbing shared by both scripts: storage, samplers, pruners, the trial runner, summaries, results.

Training itself lives in training.py; this module only wires a trial to it (report, prune, record why
a trial stopped) and writes what a run produced.
"""
import datetime
import errno
import gc
import json
import logging
import os
import re
import socket
import statistics
import sys
import time
import uuid
import warnings
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from cli import log
from data import final_training_set, load_test
from errors import UserError
from models import build_model, describe, normalise_config
from training import (Divergence, TrainConfig, derive_seed, describe_device, export_onnx, load_checkpoint,
                      onnx_parity, predict_logits, retrain_and_test, seed_everything, train)

# the retry callback is marked experimental; it is Optuna's own mechanism and the one we want
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

PRUNERS = ("hyperband", "median", "none")
JOURNAL_NAME = "study.journal"
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
HEARTBEAT_SECONDS = 30     # an RDB worker silent for GRACE_SECONDS is presumed dead
GRACE_SECONDS = 90
MAX_RETRY = 2              # a trial whose worker died is re-run this many times at most
RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
INTERRUPTED, WORKER_DIED = "interrupted", "worker died"


# ---- output folder and storage ----------------------------------------------

def prepare_out_dir(out_dir, root="runs"):
    """The run folder: a new timestamped one under `root`, or the given one.

    An existing folder is reused only when an earlier run of this project made it (so the study in it
    resumes); any other non-empty folder is refused rather than overwritten.
    """
    if out_dir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = Path(root) / stamp
        suffix = 1
        while out_dir.exists():
            out_dir = Path(root) / f"{stamp}-{suffix}"
            suffix += 1
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir} is a file; pass a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise UserError(f"--out-dir {out_dir} exists and was not made by this tool; "
                        "choose a new folder so nothing in it is overwritten")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create --out-dir {out_dir} ({error.strerror}); choose a writable folder") from None
    return out_dir


def start_run(out_dir, settings):
    """Record the resolved settings in config.json and return the folder's run id.

    A rerun in the same folder keeps the run id, so it resumes rather than starting over.
    """
    path = Path(out_dir) / "config.json"
    run_id = None
    if path.is_file():
        try:
            run_id = json.loads(path.read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            run_id = None
    run_id = run_id or uuid.uuid4().hex[:12]
    write_json(path, {**settings, "run_id": run_id, "command": command_line()})
    return run_id


def storage_kind(spec):
    """'journal' for a file path (or the default), 'rdb' for a database URL; unknown schemes are refused."""
    if spec is None:
        return "journal"
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", spec)
    if not match:
        return "journal"
    scheme = match.group(1).split("+")[0].lower()
    if scheme not in RDB_SCHEMES:
        raise UserError(f"--storage scheme {match.group(1)!r} is not supported; use a file path (journal), "
                        "sqlite:///PATH, postgresql://USER@HOST/DB or mysql://USER@HOST/DB")
    return "rdb"


def make_storage(spec, out_dir):
    """An Optuna storage from --storage: None -> a journal file in the run folder; a path -> a journal
    file (several processes on one machine); a URL -> an RDB (many machines), with heartbeats so a
    killed worker's trial is marked failed and retried by a live one."""
    kind = storage_kind(spec)
    if kind == "journal":
        path = Path(spec) if spec else Path(out_dir) / JOURNAL_NAME
        if path.is_dir():
            raise UserError(f"--storage {path} is a folder; pass a file path for a journal, or a database URL")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(path))
        except OSError as error:
            raise UserError(f"cannot open journal file {path} ({error}); pass a writable path") from None
        return optuna.storages.JournalStorage(backend)
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(spec, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                                              heartbeat_stale_trial_callback=RETRY)
        except ImportError as error:
            raise UserError(f"the database driver for {spec.split(':')[0]} is missing ({error}); "
                            "pip install -r requirements.txt") from None
        except Exception as error:  # SQLAlchemy raises many kinds; all mean the URL cannot be used (yet)
            # workers started together on an empty database race to create Optuna's tables; the losers retry
            if attempt < 2 and ("already exists" in str(error) or "UniqueViolation" in str(error)):
                time.sleep(1 + attempt)
                continue
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"cannot open storage {spec} ({first}); check the URL and that the server runs") from None


def make_pruner(name, epochs, n_startup_trials=2, n_warmup_steps=0, interval_steps=1):
    """hyperband | median | none, in units of reported steps (epochs unless reporting is finer)."""
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1), reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps,
                                           interval_steps=interval_steps)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"pruner {name!r} is unknown; choose one of {', '.join(PRUNERS)}")


def open_study(name, storage, sampler, pruner):
    """Create the study or join/resume the existing one of that name."""
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)


def worker_id():
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except OSError as error:
        return error.errno == errno.EPERM
    return True


def _worker_dead(trial):
    """True when the trial's worker ran on this host and its process is gone."""
    host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not _process_alive(int(pid))


def requeue_lost_trials(study):
    """Queue again the trials whose worker was interrupted or died, once each.

    RDB storages find dead workers by heartbeat; a journal file has none, so a RUNNING trial whose
    process on this host is gone is failed here. Both then go through the same retry callback, which
    re-creates the trial with the same parameters (and grid point) as a WAITING trial.
    """
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    requeued = 0
    for trial in trials:
        if trial.number in retried:
            continue
        if trial.state == TrialState.RUNNING and _worker_dead(trial):
            try:
                study._storage.set_trial_user_attr(trial._trial_id, "reason", WORKER_DIED)
                study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another live worker got there first and requeues it
            trial = study._storage.get_trial(trial._trial_id)
        elif not (trial.state == TrialState.FAIL and trial.user_attrs.get("reason") == INTERRUPTED):
            continue
        RETRY(study, trial)
        requeued += 1
    if requeued:
        log.info(f"{study.study_name}: {requeued} interrupted trial(s) queued to run again")
    return requeued


def counted(trial):
    """Trials that count towards --n-trials: finished, except those lost to an interrupt or a dead worker."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get("reason") not in (INTERRUPTED, WORKER_DIED)


def remaining_trials(study, n_trials, run_id):
    """How many trials this run folder still owes the study: --n-trials less those it already finished.

    A fresh run folder (new run id) adds n_trials trials to the study, so several workers add up;
    rerunning in the same folder resumes and only completes what is left.
    """
    done = sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get("run") == run_id and counted(t))
    return max(0, n_trials - done)


# ---- one trial ----------------------------------------------------------------

def claim(trial, run_id):
    """Mark a trial as this worker's and this run folder's; the objective's first act, so that a worker
    killed at any later point leaves a trial that requeue_lost_trials recognises."""
    trial.set_user_attr("worker", worker_id())
    trial.set_user_attr("run", run_id)
    if trial.user_attrs.get("reason"):  # a retried trial inherits its predecessor's attributes
        trial.set_user_attr("reason", None)


def run_trial(trial, model_config, train_cfg, data, seed, reports_per_epoch=1):
    """Train the trial's network, report validation accuracy, prune; return the last validation accuracy.

    A diverged loss prunes the trial and an out-of-memory fails it, each with its reason in the
    trial's user attributes, so the study goes on.
    """
    trial.set_user_attr("model", model_config)
    trial.set_user_attr("train", train_cfg.to_dict())
    trial.set_user_attr("seed", seed)
    seed_everything(seed)
    model = build_model(model_config).to(data.train_x.device)

    last_step = train_cfg.epochs * reports_per_epoch

    def on_report(step, val_accuracy):
        trial.report(val_accuracy, step)
        # pruning after the last report would only throw away a finished result
        if step < last_step and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} with validation accuracy {val_accuracy:.4f}")

    try:
        history = train(model, data.train_x, data.train_y, train_cfg, seed, val=(data.val_x, data.val_y),
                        on_report=on_report, reports_per_epoch=reports_per_epoch, background=data.background)
    except Divergence as error:
        trial.set_user_attr("reason", f"diverged: {error}")
        raise optuna.TrialPruned(str(error)) from None
    except (torch.OutOfMemoryError, MemoryError) as error:
        trial.set_user_attr("reason", f"out of memory: {str(error).splitlines()[0] if str(error) else ''}")
        raise
    except KeyboardInterrupt:
        trial.set_user_attr("reason", INTERRUPTED)  # Optuna marks it failed; a rerun queues it again
        raise
    finally:
        del model
        release_memory()
        if torch.cuda.is_available():  # what a trial leaves behind; flat over many trials means no leak
            trial.set_user_attr("cuda_memory_mb", torch.cuda.memory_allocated() / 2**20)
    return history[-1]["val_accuracy"]


def release_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


CATCH = (torch.OutOfMemoryError, MemoryError)  # fail the trial, keep the study going


# ---- printing -------------------------------------------------------------------

def network_of(trial):
    model = trial.user_attrs.get("model")
    return describe(model) + f" drop {model['dropout']:.2f}" if model else "?"


def training_of(trial):
    """The optimization hyperparameters of a trial in one short phrase (stage 2's key params)."""
    t = trial.user_attrs.get("train")
    if not t:
        return "?"
    l1 = f" L1 {t['l1']:.0e}" if t["l1"] else ""
    return (f"{t['optimizer']} lr {t['lr']:.1e} {t['schedule']} wd {t['weight_decay']:.0e}{l1} "
            f"bs {t['batch_size']} ls {t['label_smoothing']:.2f} {t['epochs']} ep")


def trial_line(trial, label="", describe_trial=network_of):
    seconds = trial.duration.total_seconds() if trial.duration else float("nan")
    value = f"val {100 * trial.value:6.2f} %" if trial.value is not None else " " * 12
    last = max(trial.intermediate_values) if trial.intermediate_values else None
    where = f" (step {last})" if trial.state == TrialState.PRUNED and last is not None else ""
    reason = f"  [{trial.user_attrs['reason']}]" if trial.user_attrs.get("reason") else ""
    return (f"{label}trial {trial.number:3d}  {trial.state.name:8s}{where:10s} {value}  {describe_trial(trial)}"
            f"  {seconds:6.1f} s{reason}")


def print_trial_lines(label="", describe_trial=network_of):
    """An Optuna callback that prints one line per finished trial."""
    def callback(study, trial):
        log.info(trial_line(trial, label, describe_trial))
    return callback


def state_counts(trials):
    return {state: sum(t.state == getattr(TrialState, state.upper()) for t in trials)
            for state in ("complete", "pruned", "fail")}


def best_or_none(study):
    completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    return max(completed, key=lambda t: t.value) if completed else None


def params_lines(params, indent="    "):
    return [f"{indent}{key}: {value}" for key, value in params.items()]


def mean_std(values):
    """(mean, sample std) of the values; (None, None) for none, so the results files stay valid JSON."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ---- results files ------------------------------------------------------------

def write_atomic(path, text):
    """Write text to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path, payload):
    write_atomic(path, json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (datetime.datetime, datetime.timedelta)):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def trials_table(studies):
    """Optuna's trials_dataframe for each (label, study) with the label column first, as one table."""
    import pandas as pd

    frames = []
    for label, value, study in studies:
        frame = study.trials_dataframe()
        frame.insert(0, label, value)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_trials_csv(path, studies):
    write_atomic(path, trials_table(studies).to_csv(index=False))


def best_params_payload(trial, **extra):
    """Everything needed to rebuild and retrain the best network, with nothing else."""
    return {"value": trial.value, "trial": trial.number, "params": trial.params,
            "model": trial.user_attrs["model"], "train": trial.user_attrs["train"],
            "seed": trial.user_attrs.get("seed"), **extra}


def command_line():
    return " ".join([Path(sys.executable).name] + sys.argv)


class Stopwatch:
    def __init__(self):
        self.started = time.perf_counter()

    def seconds(self):
        return time.perf_counter() - self.started


def train_config(args):
    """The per-trial training settings of the shared flags."""
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                       weight_decay=args.weight_decay, l1=args.l1, label_smoothing=args.label_smoothing,
                       schedule=args.schedule, augment=args.augment, compile=args.compile)


# ---- after the search ---------------------------------------------------------

def finish_run(args, best, summary, data, data_dir, device, out_dir, interrupted, meta, plot_studies, trials=()):
    """The common ending of both scripts; returns the exit code.

    Interrupted: say how to resume (130). No complete trial: nothing to retrain (1). Otherwise, unless
    --no-final, retrain the best network on train+validation, read the test set once, save model.pt
    and model.onnx (checked against PyTorch in ONNX Runtime); with --ensemble K, also retrain the K best
    distinct configurations of `trials` and report their averaged softmax. Then the plots.
    """
    write_json(out_dir / "summary.json", summary)
    history = None
    if interrupted:
        print(f"interrupted: finished trials are kept in the storage; rerun the same command with "
              f"--out-dir {out_dir} to resume")
        return 130
    if best is None:
        print("no trial completed, so there is nothing to retrain")
        return 1
    if not args.no_final:
        label = " (with augmentation)" if args.augment else ""
        x, y = final_training_set(data, args.final_subset, best.user_attrs["seed"])
        log.info(f"\nretraining on {len(y)} train+validation images for {args.final_epochs} epochs{label} "
                 f"on {describe_device(device)}")
        # the search is over: this is the one place the test set is read
        test = load_test(data_dir, device, data.mean, data.std)
        meta = {**meta, "command": command_line(), "mean": data.mean, "std": data.std}

        def retrain(trial, checkpoint, repeat=0):
            cfg = TrainConfig.from_dict({**trial.user_attrs["train"], "epochs": args.final_epochs,
                                         "augment": args.augment, "compile": args.compile})
            info = {**meta, "val_accuracy": trial.value, "trial": trial.number, "repeat": repeat}
            with progress(args.final_epochs, "final epochs", "epoch") as bar:
                return retrain_and_test(trial.user_attrs["model"], cfg, x, y, repeat_seed(trial, repeat), test,
                                        checkpoint, info, on_epoch=lambda record: bar.update(1),
                                        background=data.background)

        model, history, test_accuracy, seconds = retrain(best, out_dir / "model.pt")
        print(f"test accuracy: {100 * test_accuracy:.2f} %{label}   "
              f"(final training {seconds:.0f} s on {len(y)} images)")
        onnx_path = export_onnx(model, out_dir / "model.onnx")
        max_diff, agreement = onnx_parity(model, onnx_path, test[0][:1000])
        print(f"onnx parity: max abs diff {max_diff:.2e} on 1000 test images, predicted labels agree "
              f"{100 * agreement:.1f} %")
        summary = {**summary, "test_accuracy": test_accuracy, "augment": args.augment, "final_seconds": seconds,
                   "final_history": history, "onnx_max_abs_diff": max_diff, "onnx_label_agreement": agreement}
        if args.final_seeds > 1:
            summary["final_seeds"] = repeat_seeds(best, args.final_seeds, test_accuracy, seconds, retrain, out_dir,
                                                  label)
        if args.ensemble > 1:
            summary["ensemble"] = ensemble(top_distinct(best, trials, args.ensemble), model, test, retrain, out_dir,
                                           predict_logits, label)
        write_json(out_dir / "summary.json", summary)
    if not args.no_plots:
        from plots import write_plots

        written = write_plots(out_dir, *plot_studies, final_history=history)
        log.info(f"plots: {len(written)} PNG files in {out_dir / 'plots'}")
    print(f"results: {out_dir}/  (best_params.json, trials.csv, summary.json"
          f"{'' if args.no_final else ', model.pt, model.onnx'}{'' if args.no_plots else ', plots/'})")
    print(f"reproduce: {command_line()}")
    return 0


def repeat_seed(trial, repeat):
    """Repeat 0 of a final retrain uses the trial's own seed; repeat k > 0 a seed derived from it and k."""
    return trial.user_attrs["seed"] if repeat == 0 else derive_seed(trial.user_attrs["seed"], repeat)


def repeat_seeds(best, n, first_accuracy, first_seconds, retrain, out_dir, label):
    """The final recipe trained n times in all (repeat 0 is model.pt): how much the seed alone moves it."""
    runs = [{"repeat": 0, "seed": repeat_seed(best, 0), "test_accuracy": first_accuracy,
             "train_seconds": first_seconds}]
    for repeat in range(1, n):
        _, _, accuracy, seconds = retrain(best, out_dir / f"seed-{repeat}.pt", repeat)
        runs.append({"repeat": repeat, "seed": repeat_seed(best, repeat), "test_accuracy": accuracy,
                     "train_seconds": seconds})
        print(f"final recipe, repeat {repeat}: test accuracy: {100 * accuracy:.2f} %{label}   "
              f"(final training {seconds:.0f} s)")
    accuracies = [run["test_accuracy"] for run in runs]
    mean, std = mean_std(accuracies)
    print(f"final recipe over {n} seeds: test accuracy {100 * mean:.2f} ± {100 * std:.2f} %{label}   "
          f"(min {100 * min(accuracies):.2f}, max {100 * max(accuracies):.2f})")
    return {"runs": runs, "mean": mean, "std": std}


def _config_key(trial):
    return json.dumps([trial.user_attrs.get("model"), trial.user_attrs.get("train")], sort_keys=True)


def top_distinct(best, trials, k):
    """`best`, then the next best complete trials whose (network, training) differ from all before, k in all."""
    members, seen = [best], {_config_key(best)}
    for trial in sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value):
        if len(members) < k and _config_key(trial) not in seen:
            seen.add(_config_key(trial))
            members.append(trial)
    return members


def ensemble(members, best_model, test, retrain, out_dir, predict_logits, label):
    """Retrain the members after the first (the best, retrained already) and average their softmax on the test set."""
    test_x, test_y = test
    probabilities, results = 0, []
    for index, trial in enumerate(members):
        model = best_model if index == 0 else retrain(trial, out_dir / f"ensemble-{index}.pt")[0]
        logits = predict_logits(model, test_x)
        accuracy = (logits.argmax(1) == test_y).float().mean().item()
        probabilities = probabilities + torch.softmax(logits, 1)
        results.append({"trial": trial.number, "seed": trial.user_attrs["seed"], "val_accuracy": trial.value,
                        "test_accuracy": accuracy})
        print(f"ensemble member {index}: trial {trial.number}  val {100 * trial.value:.2f} %  "
              f"test accuracy: {100 * accuracy:.2f} %{label}")
    accuracy = (probabilities.argmax(1) == test_y).float().mean().item()
    print(f"ensemble of {len(members)} (averaged softmax): test accuracy: {100 * accuracy:.2f} %{label}")
    return {"members": results, "test_accuracy": accuracy}


def load_network(path):
    """The model config in a best_params.json written by either script, or in a model.pt checkpoint."""
    return read_backbone(path)[0]


def read_backbone(path):
    """(model config, training recipe dict or None) from a best_params.json or a model.pt checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--backbone {path} does not exist; pass a best_params.json or a model.pt")
    if path.suffix == ".pt":
        payload = load_checkpoint(path)[1]
        return normalise_config(payload["config"]), payload.get("train")
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"--backbone {path} is not valid JSON ({error}); pass the best_params.json "
                        "written by MNIST-optuna.py") from None
    model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(model, dict) or "conv" not in model:
        raise UserError(f"--backbone {path} has no 'model' with 'conv' blocks; pass the best_params.json "
                        "written by MNIST-optuna.py")
    train = payload.get("train")
    return normalise_config({"fc": [], **model}), train if isinstance(train, dict) else None


def progress(total, description, unit="trial"):
    """A tqdm bar on a terminal at the normal log level; nothing at all in logs, pipes and CI."""
    from tqdm import tqdm

    show = sys.stdout.isatty() and log.getEffectiveLevel() <= logging.INFO
    return tqdm(total=total, desc=description, unit=unit, leave=False, disable=not show, file=sys.stdout)
