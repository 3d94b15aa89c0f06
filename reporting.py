"""What a run writes and prints: the run folder, atomic result files, trial lines, the summary of both
scripts, best_params.json and its reader, progress bars. It decides nothing."""
import datetime
import hashlib
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from optuna.trial import TrialState

from errors import UserError
from models import describe, normalise_config
from training import load_checkpoint, write_atomic

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent
# the reasons of trials that ended without training (studies.run_trial); they are counted apart
OVER_BUDGET = "over budget"   # the network needs more MACs than --max-mmac allows
TWIN = "same configuration as trial"  # an earlier trial of the study trained or is training these parameters
NOT_TRAINED = (OVER_BUDGET, TWIN)


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
    return writable_folder(out_dir, "--out-dir", "choose a writable folder")


def writable_folder(folder, flag, advice):
    """`folder`, made if missing and proven writable with a probe file (root ignores permission bits, so only
    a real write tells); otherwise one line naming `flag` and what to do."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write in {flag} {folder} ({error.strerror or error}); {advice}") from None
    return folder


def start_run(out_dir, settings):
    """Record the resolved settings in config.json and return the folder's run id.

    A rerun in the same folder keeps the run id, so it resumes rather than starting over.
    """
    path = Path(out_dir) / "config.json"
    run_id = None
    if path.is_file():
        try:
            before = json.loads(path.read_text())
            run_id = before.get("run_id")
        except (OSError, ValueError, AttributeError):
            before, run_id = {}, None
        if isinstance(before, dict) and family_of(before) != family_of(settings):
            raise UserError(f"--out-dir {out_dir} holds the results of {family_text(before)}, this run is "
                            f"{family_text(settings)}; its files would be replaced: pass a new --out-dir")
    run_id = run_id or uuid.uuid4().hex[:12]
    write_json(path, {**settings, "run_id": run_id, "command": command_line(), "source": source_version()})
    return run_id


# what a run folder belongs to: one script's stage and study names (the settings that name its studies); a run of
# another stage, script or study name would replace its model.pt, summary.json and trials.csv
FAMILY = ("stage", "study_prefix", "study_name")


def family_of(settings):
    return {key: settings.get(key) for key in FAMILY}


def family_text(settings):
    return " ".join(f"--{key.replace('_', '-')} {settings[key]}" for key in FAMILY if settings.get(key) is not None)


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


def trial_accuracy(trial):
    """A trial's validation accuracy: its value, or its first value in a multi-objective study; None if it has none."""
    return trial.values[0] if trial.values else None


def latency_of(trial):
    return f" {trial.user_attrs['latency_ms']:.3f} ms/img" if trial.user_attrs.get("latency_ms") is not None else ""


def trial_line(trial, label="", describe_trial=network_of):
    seconds = trial.duration.total_seconds() if trial.duration else float("nan")
    value = f"val {100 * trial_accuracy(trial):6.2f} %" if trial_accuracy(trial) is not None else " " * 12
    last = max(trial.intermediate_values) if trial.intermediate_values else None
    where = f" (step {last})" if trial.state == TrialState.PRUNED and last is not None else ""
    reason = f"  [{trial.user_attrs['reason']}]" if trial.user_attrs.get("reason") else ""
    return (f"{label}trial {trial.number:3d}  {trial.state.name:8s}{where:10s} {value}  {describe_trial(trial)}"
            f"{latency_of(trial)}  {seconds:6.1f} s{reason}")


def print_trial_lines(label="", describe_trial=network_of):
    """An Optuna callback that prints one line per finished trial."""
    def callback(study, trial):
        log.info(trial_line(trial, label, describe_trial))
    return callback


def trained(trial):
    return not str(trial.user_attrs.get("reason") or "").startswith(NOT_TRAINED)


def state_counts(trials):
    """Trials by state; those that ended without training (over budget, repeats) apart as 'not_trained'."""
    counts = {state: sum(t.state == getattr(TrialState, state.upper()) and trained(t) for t in trials)
              for state in ("complete", "pruned", "fail")}
    counts["not_trained"] = sum(not trained(t) for t in trials)
    return counts


def best_or_none(study):
    """The study's most accurate complete trial (of equals, the cheaper network, then the earlier trial)."""
    completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not completed:
        return None
    return min(completed, key=lambda t: (-trial_accuracy(t), t.user_attrs.get("mmac", float("inf"))))


def params_lines(params, indent="    "):
    return [f"{indent}{key}: {value}" for key, value in params.items()]


def mean_std(values):
    """(mean, sample std) of the values; (None, None) for none, so the results files stay valid JSON."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_json(path, payload):
    write_atomic(path, json.dumps(payload, indent=2, default=json_default) + "\n")


def json_default(value):
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
    return {"value": trial_accuracy(trial), "trial": trial.number, "params": trial.params,
            "model": trial.user_attrs["model"], "train": trial.user_attrs["train"],
            "seed": trial.user_attrs.get("seed"), **extra}


def command_line():
    """The command that ran, quoted for a shell."""
    return shlex.join([Path(sys.executable).name] + sys.argv)


class Stopwatch:
    def __init__(self):
        self.started = time.perf_counter()

    def seconds(self):
        return time.perf_counter() - self.started


def read_backbone(path, artifacts=None):
    """(model config, training recipe dict or None) from a best_params.json or a model.pt checkpoint, given as a
    path or as an artifact id in the --artifacts store."""
    from tracking import local_file, open_artifact_store

    path = Path(local_file(str(path), open_artifact_store(artifacts), "--backbone"))
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


CODE = ("*.py", "requirements*.txt")  # what the source version is of


def source_version():
    """The git commit of the code that ran (with '+changes' when its code differs from it), or, outside git,
    a hash of the project's Python files: recorded in config.json and every model.pt."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            # the code only: results and logs committed beside it (results/) do not change what ran
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE],
                                   cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
            return commit.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    digest = hashlib.sha256()
    for path in sorted(ROOT.glob("*.py")):
        digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()[:16]


def summarise(studies, out_dir, wall, describe_trial, ranked, front=None, objectives=("accuracy",), pick_mmac=None,
              extra=None):
    """Print the summary block of the (label, key, study) searches and write trials.csv (best_params.json is the
    final stage's, final.finish); return (the chosen trial, the summary dict). `ranked`: (key, trial) pairs best
    first (studies.rank), whose first is the chosen network; `front`: the Pareto front of a multi-objective run, listed in full."""
    print("\n==== summary ====")
    per_study, all_trials = {}, []
    for label, key, study in studies:
        trial = best_or_none(study)
        all_trials += study.trials
        if trial is None:
            print(f"{label} {key}: no complete trial")
            continue
        per_study[key] = {"value": trial_accuracy(trial), "trial": trial.number, "params": trial.params}
        print(f"{label} {key}: best val {100 * trial_accuracy(trial):.2f} %  trial {trial.number}  "
              f"{describe_trial(trial)}")
    counts = state_counts(all_trials)
    mean, std = mean_std([v["value"] for v in per_study.values()])
    skipped = f", {counts['not_trained']} not trained (over budget or repeats)" if counts["not_trained"] else ""
    print(f"trials: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed{skipped}")
    if len(per_study) > 1:
        print(f"per-{label} best: {100 * mean:.2f} ± {100 * std:.2f} % over {len(per_study)} {label}s")
    if front is not None:
        print_front(front, objectives, label, describe_trial)
    best_key, best = ranked[0] if ranked else (None, None)
    within = "" if pick_mmac is None else f" within {pick_mmac:g} MMAC"
    if best is not None:
        what = f"chosen: the most accurate front network{within}" if front is not None else f"best trial{within}"
        print(f"{what}: val {100 * trial_accuracy(best):.2f} %  {label} {best_key}  trial {best.number}  "
              f"{describe_trial(best)}")
        print("\n".join(params_lines(best.params)))
    elif per_study:  # complete trials, none within the limits
        print(f"no {'front network' if front is not None else 'complete trial'} within "
              f"{mmac_limits({'pick_mmac': pick_mmac, **(extra or {})})}; "
              "rerun with --retrain-only and a larger limit")
    print(f"search wall time: {wall:.1f} s")
    summary = {"seeds": per_study, "counts": counts, "per_seed_best_mean": mean, "per_seed_best_std": std,
               "best": None if best is None else {"seed": best_key, "trial": best.number,
                                                 "value": trial_accuracy(best), "params": best.params},
               "objectives": list(objectives), "pick_mmac": pick_mmac,
               "search_seconds": wall, "command": command_line(), "out_dir": str(out_dir), **(extra or {})}
    if front is not None:
        summary["front"] = [{label: key, "trial": t.number, "values": dict(zip(objectives, t.values)),
                             "params": t.params, "network": describe_trial(t)} for key, t in front]
    write_trials_csv(out_dir / "trials.csv", studies)
    return best, summary


def mmac_limits(settings):
    """The MMAC limits among `settings` (pick_mmac, max_mmac) as flags, e.g. '--pick-mmac 4 and --max-mmac 32';
    empty when there are none."""
    return " and ".join(f"--{name.replace('_', '-')} {settings[name]:g}" for name in ("pick_mmac", "max_mmac")
                        if settings.get(name) is not None)


def print_front(front, objectives, label, describe_trial):
    """The Pareto-optimal trials, cheapest first: each objective's value, the network, the parameters."""
    print(f"\n==== Pareto front: {' vs '.join(objectives)} ({len(front)} networks) ====")
    latency = "latency" in objectives
    print(f"   val acc      MMAC{'   ms/img' if latency else ''}  {label:>5s}  trial  network")
    for key, trial in front:
        values = dict(zip(objectives, trial.values))
        ms = f"  {values['latency']:7.3f}" if latency else ""
        print(f"  {100 * values['accuracy']:6.2f} %  {trial.user_attrs.get('mmac', float('nan')):8.2f}{ms}"
              f"  {str(key):>5s}  {trial.number:5d}  {describe_trial(trial)}")
        print("         " + " ".join(f"{name}={_short(value)}" for name, value in trial.params.items()))
    print()


def _short(value):
    return f"{value:.3g}" if isinstance(value, float) else str(value)
