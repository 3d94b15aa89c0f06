"""Optuna plumbing shared by both scripts: storage, samplers, pruners, the trial runner, summaries, results.

Training itself lives in training.py; this module only wires a trial to it (report, prune, record why
a trial stopped) and writes what a run produced.
"""
import datetime
import errno
import gc
import hashlib
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

from cli import log, stop_code
from data import final_training_set, load_test, promotion_training_set
from errors import UserError
from models import build_model, count_macs, describe, normalise_config
from training import (Divergence, TrainConfig, derive_seed, describe_device, evaluate, export_onnx, load_checkpoint,
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
INTERRUPTED = "interrupted"
OVER_BUDGET = "over budget"   # pruned before training: the network needs more MACs than --max-mmac allows
TWIN = "same configuration as trial"  # not trained: an earlier trial of the study has the same parameters
NOT_TRAINED = (OVER_BUDGET, TWIN)


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
        probe = out_dir / f".write-check.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write in --out-dir {out_dir} ({error.strerror}); choose a writable folder") from None
    return out_dir


def open_run_folder(out_dir, storage, must_exist=False):
    """(the run folder, the storage). A folder made by this call is removed again when the storage cannot be
    opened, so a mistyped --storage leaves nothing behind. `must_exist`: the study's storage must be there
    already (--retrain-only adds no trial, so it never creates one)."""
    existed = out_dir is not None and Path(out_dir).exists()
    folder = prepare_out_dir(out_dir)
    try:
        return folder, make_storage(storage, folder, must_exist)
    except UserError:
        if not existed and not any(folder.iterdir()):
            folder.rmdir()
        raise


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
        near = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", spec)
        if near and near.group(1).split("+")[0].lower() in RDB_SCHEMES + ("postgres", "file", "journal"):
            raise UserError(f"--storage {spec} looks like a database URL but lacks '//'; write "
                            f"{near.group(1)}://USER@HOST/DB (or sqlite:///PATH), or a plain file path for a journal")
        return "journal"
    scheme = match.group(1).split("+")[0].lower()
    if scheme not in RDB_SCHEMES:
        raise UserError(f"--storage scheme {match.group(1)!r} is not supported; use a file path (journal), "
                        "sqlite:///PATH, postgresql://USER@HOST/DB or mysql://USER@HOST/DB")
    return "rdb"


def mend_torn_journal(path):
    """Cut a journal's last record when a crash or a full disk left it without its newline.

    Optuna still reads such a file, but its next record would be appended to the partial line and
    make the whole journal unreadable. The original bytes are kept beside it first.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as journal:
        journal.seek(-1, os.SEEK_END)
        if journal.read(1) == b"\n":
            return
        journal.seek(0)
        content = journal.read()
    backup = path.with_name(f"{path.name}.torn-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    backup.write_bytes(content)
    keep = content.rfind(b"\n") + 1
    with open(path, "r+b") as journal:
        journal.truncate(keep)
    log.warning(f"warning: the last record of {path} was cut off ({len(content) - keep} bytes, a crash or a full "
                f"disk); removed it and kept the original as {backup.name}")


def make_storage(spec, out_dir, must_exist=False):
    """An Optuna storage from --storage: None -> a journal file in the run folder; a path -> a journal
    file (several processes on one machine); a URL -> an RDB (many machines), with heartbeats so a
    killed worker's trial is marked failed and retried by a live one."""
    kind = storage_kind(spec)
    if kind == "journal":
        path = Path(spec) if spec else Path(out_dir) / JOURNAL_NAME
        if path.is_dir():
            raise UserError(f"--storage {path} is a folder; pass a file path for a journal, or a database URL")
        if must_exist and not path.is_file():
            raise UserError(f"--storage {path} does not exist; pass the journal of the study to use")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            mend_torn_journal(path)
            backend = optuna.storages.journal.JournalFileBackend(str(path))
            return optuna.storages.JournalStorage(backend)
        except OSError as error:
            raise UserError(f"cannot open journal file {path} ({error.strerror or error}); pass a writable path") \
                from None
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as error:  # what a replay of garbage raises
            raise UserError(f"{path} is not a readable Optuna journal ({type(error).__name__}); move it away or "
                            "pass another --storage") from None
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


def open_study(name, storage, sampler, pruner, search=None, resume_anyway=False, must_exist=False):
    """Create the study or join/resume the existing one of that name.

    `search` holds the settings that define the study's trials (space, data, recipe, backbone, grid). A
    study keeps the first run's as a user attribute; a later run (another worker, a rerun in the same
    folder) whose settings differ is refused, so it never silently continues a different search, unless
    the user consents with --resume-anyway. `must_exist`: --retrain-only, which adds no trial.
    """
    if must_exist:
        try:
            return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        except KeyError:
            raise UserError(f"--retrain-only: no study named {name} in this storage; pass the --storage (and "
                            "--out-dir) of the search to retrain from") from None
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    if search is None:
        return study
    search = json.loads(json.dumps(search, default=_json_default))
    before = study.user_attrs.get("search")
    if before is not None and before != search and not resume_anyway:
        differ = [key for key in sorted(set(before) | set(search)) if before.get(key) != search.get(key)]
        key = differ[0]
        raise UserError(f"study {name} was searched with --{key.replace('_', '-')} {_flag_text(before.get(key))}, "
                        f"this run asks for {_flag_text(search.get(key))}"
                        f"{f' (and {len(differ) - 1} more setting(s))' if len(differ) > 1 else ''}; pass a new "
                        "--out-dir (or --study-prefix / --study-name) for a new search, or --resume-anyway to "
                        "continue this one with the new settings")
    if before != search:
        study.set_user_attr("search", search)
    return study


def _flag_text(value):
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "(not set)" if value is None else str(value)


# settings that say how and where to run, or what to do after the search: a rerun may change them
NOT_SEARCH = {"storage", "data_dir", "out_dir", "device", "deterministic", "compile", "quick", "no_final",
              "retrain_only", "no_plots", "verbose", "quiet", "evaluate", "resume_anyway", "n_trials", "seeds",
              "promote", "final_epochs", "final_subset", "final_seeds", "ensemble", "backbone"}


def search_settings(args, **resolved):
    """The settings that define a study's trials: every flag but NOT_SEARCH's, and what --backbone resolved to
    (its network, not its path)."""
    return {**{key: value for key, value in vars(args).items() if key not in NOT_SEARCH}, **resolved}


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
    retried = lost_numbers(trials)
    requeued = 0
    for trial in trials:
        if trial.number in retried:
            continue
        if trial.state == TrialState.RUNNING and _worker_dead(trial):
            try:
                study.tell(trial.number, state=TrialState.FAIL)
            except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # another live worker got there first and requeues it
            trial = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        elif not (trial.state == TrialState.FAIL and trial.user_attrs.get("reason") == INTERRUPTED):
            continue
        RETRY(study, trial)
        requeued += 1
    if requeued:
        log.info(f"{study.study_name}: {requeued} interrupted trial(s) queued to run again")
    return requeued


def lost_numbers(trials):
    """Numbers of the trials that were queued again (interrupted, or their worker died): their retries count."""
    return {number for trial in trials for number in RETRY.retry_history(trial)}


def waiting_trials(study):
    return study.get_trials(deepcopy=False, states=(TrialState.WAITING,))


def counted(trial, lost=frozenset()):
    """Trials that count towards --n-trials: finished, except those lost to an interrupt or a dead worker
    (numbers in `lost`: their retries count instead) and those that trained nothing (NOT_TRAINED)."""
    reason = str(trial.user_attrs.get("reason") or "")
    if trial.state in (TrialState.PRUNED, TrialState.COMPLETE):
        return not reason.startswith(NOT_TRAINED)
    return trial.state == TrialState.FAIL and reason != INTERRUPTED and trial.number not in lost


def remaining_trials(study, n_trials, run_id):
    """How many trials this run folder still owes the study: --n-trials less those it already finished.

    A fresh run folder (new run id) adds n_trials trials to the study, so several workers add up;
    rerunning in the same folder resumes and only completes what is left.
    """
    trials = study.get_trials(deepcopy=False)
    lost = lost_numbers(trials)
    done = sum(1 for t in trials if t.user_attrs.get("run") == run_id and counted(t, lost))
    return max(0, n_trials - done)


def optimize_until(study, objective, n_trials, run_id, callbacks, max_rounds=20):
    """study.optimize until this run folder has its n_trials counted trials. Networks over the compute budget
    and repeats of an earlier trial's configuration are not trained and do not count, so another round asks
    the sampler again; it has seen them and proposes them less and less (max_rounds stops a space that is
    nearly all over budget or exhausted)."""
    for _ in range(max_rounds):
        todo = remaining_trials(study, n_trials, run_id)
        if not todo:
            return
        study.optimize(objective, n_trials=todo, catch=CATCH, callbacks=callbacks)
    if remaining_trials(study, n_trials, run_id):
        log.warning(f"{study.study_name}: stopped proposing after {max_rounds} rounds of networks over the "
                    "compute budget; raise --max-mmac or narrow the space")


# ---- one trial ----------------------------------------------------------------

def claim(trial, run_id):
    """Mark a trial as this worker's and this run folder's; the objective's first act, so that a worker
    killed at any later point leaves a trial that requeue_lost_trials recognises."""
    trial.set_user_attr("worker", worker_id())
    trial.set_user_attr("run", run_id)
    trial.set_user_attr("study", trial.study.study_name)
    if trial.user_attrs.get("reason"):  # a retried trial inherits its predecessor's attributes
        trial.set_user_attr("reason", None)


def trial_seed(study_seed, params):
    """The seed of a trial's init and batch order: from the study's seed and the trial's parameters, not its
    number, so a retried trial, a resumed run and another worker train a configuration exactly alike."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    return derive_seed(study_seed, int(digest[:8], 16))


def twin_of(trial):
    """The earliest other trial of the study with the same parameters that was trained or is training."""
    if not isinstance(trial, optuna.trial.Trial):  # a FixedTrial has no study to compare with
        return None
    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                 TrialState.RUNNING)):
        # a trial is known by number and start time together: an RDB can give two concurrent trials one number
        if (other.number, other.datetime_start) == (trial.number, trial.datetime_start) or other.params != trial.params:
            continue
        if str(other.user_attrs.get("reason") or "").startswith(NOT_TRAINED):
            continue
        if other.state != TrialState.RUNNING or (other.number, other.datetime_start) < (trial.number,
                                                                                        trial.datetime_start):
            return other  # of two running twins, the one created first trains
    return None


def run_trial(trial, model_config, train_cfg, data, study_seed, reports_per_epoch=1, max_mmac=None):
    """Train the trial's network, report validation accuracy, prune; return the last validation accuracy.

    Not trained: a network over `max_mmac` million MACs per image (pruned), and a configuration an earlier
    trial of the study trained or is training (the resumed TPE start-up draws, concurrent workers): it takes
    that trial's value when there is one and is pruned otherwise. A diverged loss prunes the trial and an
    out-of-memory fails it. Each keeps its reason in the trial's user attributes; the study goes on.
    """
    seed = trial_seed(study_seed, trial.params)
    trial.set_user_attr("model", model_config)
    trial.set_user_attr("train", train_cfg.to_dict())
    trial.set_user_attr("seed", seed)
    mmac = count_macs(build_model(model_config)) / 1e6  # on the CPU, in milliseconds
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
        trial.set_user_attr("reason", f"{TWIN} {twin.number}; not trained again")
        if twin.state == TrialState.COMPLETE:
            return twin.value
        raise optuna.TrialPruned(f"the configuration of trial {twin.number}, which was pruned or is training")
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
    return describe(model) + f" drop {model['dropout']:.2f}" + mmac_of(trial) if model else "?"


def mmac_of(trial):
    return f" ({trial.user_attrs['mmac']:.1f} MMAC)" if trial.user_attrs.get("mmac") is not None else ""


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
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C or a full disk: the previous file stays whole, no half-written one is left
        tmp.unlink(missing_ok=True)
        raise


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
    --no-final: with --promote N, retrain the N best distinct trials like the final model and choose among
    them on validation; retrain the chosen network on train+validation, read the test set once, save
    model.pt and model.onnx (checked against PyTorch in ONNX Runtime); with --ensemble K, also retrain
    the next K - 1 distinct configurations of the (promoted, then search) ranking and report their
    averaged softmax. Then the plots.
    """
    history = None
    if interrupted or best is None or args.no_final:
        # with a final stage ahead, summary.json waits for it: stopping that stage leaves the previous
        # summary.json beside the previous model.pt instead of one without the model's test accuracy
        write_json(out_dir / "summary.json", summary)
    if interrupted:
        print(f"interrupted: finished trials are kept in the storage; rerun the same command with "
              f"--out-dir {out_dir} to resume")
        return stop_code()
    if best is None:
        print("no trial completed, so there is nothing to retrain")
        return 1
    if not args.no_final:
        label = " (with augmentation)" if args.augment else ""
        meta = {**meta, "command": command_line(), "mean": data.mean, "std": data.std}
        ranking = [best] + [t for t in sorted(completed(trials), key=lambda t: -t.value) if t is not best]
        if args.promote > 1:
            promoted = promote(top_distinct(ranking, args.promote), data, args, out_dir)
            summary["promotion"] = promoted["record"]
            ranking = promoted["ranking"] + ranking
            # the chosen network, which model.pt will be: promoted first, not necessarily the search's best
            write_json(out_dir / "best_params.json",
                       best_params_payload(ranking[0], promoted_val=promoted["record"]["chosen"]["promoted_val"]))
        best = ranking[0]
        # the search and its choice are over: this is the one place the test set is read
        test = load_test(data_dir, device, data.mean, data.std)

        def retrain(trial, checkpoint, repeat=0):
            cfg = final_config(trial, args)
            info = {**meta, "val_accuracy": trial.value, "trial": trial.number, "repeat": repeat,
                    "study": trial.user_attrs.get("study")}
            with progress(args.final_epochs, "final epochs", "epoch") as bar:
                return retrain_and_test(trial.user_attrs["model"], cfg, x, y, repeat_seed(trial, repeat), test,
                                        checkpoint, info, on_epoch=lambda record: bar.update(1),
                                        background=data.background)

        x, y = final_training_set(data, args.final_subset, best.user_attrs["seed"])
        log.info(f"\nretraining on {len(y)} train+validation images for {args.final_epochs} epochs{label} "
                 f"on {describe_device(device)}")
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
            summary["ensemble"] = ensemble(top_distinct(ranking, args.ensemble), model, test, retrain, out_dir,
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


def completed(trials):
    return [t for t in trials if t.state == TrialState.COMPLETE]


def top_distinct(ranking, k):
    """The first k trials of `ranking` whose (network, training) differ from all before them."""
    members, seen = [], set()
    for trial in ranking:
        if len(members) < k and _config_key(trial) not in seen:
            seen.add(_config_key(trial))
            members.append(trial)
    return members


def final_config(trial, args):
    """The trial's training recipe as the final model trains: --final-epochs, --augment."""
    return TrainConfig.from_dict({**trial.user_attrs["train"], "epochs": args.final_epochs, "augment": args.augment,
                                  "compile": args.compile})


def promote(candidates, data, args, out_dir):
    """Retrain each candidate as the final model will be (its recipe, --final-epochs, --augment, its own seed)
    on every training image outside the validation split, score it on validation, and rank by that score.

    The cheap search ranks networks after a few epochs on a subset; this ranks the few that matter at the
    fidelity of the final training. Scores are kept in promotion.json in the run folder, keyed by what
    the training was, so a rerun in the same folder resumes instead of training them again.
    Returns {"ranking": trials best first, "record": what summary.json keeps}.
    """
    path = Path(out_dir) / "promotion.json"
    try:
        done = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        done = {}
    x, y = promotion_training_set(data, args.final_subset)  # the same images for every candidate
    log.info(f"\npromotion: the {len(candidates)} best distinct trials retrained like the final model "
             f"({args.final_epochs} epochs on {len(y)} training images{' with augmentation' if args.augment else ''})"
             ", scored on validation")
    rows = []
    for search_rank, trial in enumerate(candidates, start=1):
        cfg, seed = final_config(trial, args), repeat_seed(trial, 0)
        key = json.dumps([trial.user_attrs["model"], cfg.to_dict(), seed, len(y)], sort_keys=True)
        if key not in done:
            seed_everything(seed)
            model = build_model(trial.user_attrs["model"]).to(x.device)
            clock = Stopwatch()
            with progress(cfg.epochs, f"promotion {search_rank}", "epoch") as bar:
                history = train(model, x, y, cfg, seed, val=(data.val_x, data.val_y),
                                on_epoch=lambda record: bar.update(1), background=data.background)
            done[key] = {"val_accuracy": history[-1]["val_accuracy"], "seconds": clock.seconds(),
                         "val_curve": [record["val_accuracy"] for record in history]}
            write_json(path, done)
            del model
            release_memory()
        result = done[key]
        rows.append({"trial": trial, "search_rank": search_rank, "search_val": trial.value,
                     "promoted_val": result["val_accuracy"], "seconds": result["seconds"]})
        log.info(f"promotion {search_rank}/{len(candidates)}: {trial.user_attrs.get('study', '')} trial "
                 f"{trial.number}  search val {100 * trial.value:.2f} %  promoted val "
                 f"{100 * result['val_accuracy']:.2f} %  {result['seconds']:.0f} s")
    rows.sort(key=lambda row: (-row["promoted_val"], row["search_rank"]))
    correlation = spearman([row["search_val"] for row in rows], [row["promoted_val"] for row in rows])
    print("\n==== promotion (choice at the final fidelity, on validation) ====")
    print(" rank  search rank  trial                  search val  promoted val  network")
    for rank, row in enumerate(rows, start=1):
        trial = row["trial"]
        print(f"{rank:5d}  {row['search_rank']:11d}  {str(trial.user_attrs.get('study', '')) + ' #' + str(trial.number):21s}"
              f"  {100 * row['search_val']:8.2f} %  {100 * row['promoted_val']:10.2f} %  {network_of(trial)}")
    text = "n/a (fewer than 2 distinct scores)" if correlation is None else f"{correlation:+.2f}"
    print(f"rank correlation of search and promoted validation (Spearman): {text}")
    record = {"epochs": args.final_epochs, "train_images": len(y), "augment": args.augment,
              "spearman": correlation,
              "rows": [{"study": row["trial"].user_attrs.get("study"), "trial": row["trial"].number,
                        "search_rank": row["search_rank"], "search_val": row["search_val"],
                        "promoted_val": row["promoted_val"], "seconds": row["seconds"]} for row in rows]}
    record["chosen"] = record["rows"][0]
    return {"ranking": [row["trial"] for row in rows], "record": record}


def spearman(a, b):
    """Spearman's rank correlation of two equal-length sequences (average ranks for ties); None when undefined."""
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result
    if len(a) < 2:
        return None
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    norm = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / norm if norm else None


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
