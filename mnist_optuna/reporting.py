"""What a run prints and the result tables it writes: trial lines, the summary of both scripts, trials.csv,
best_params.json's payload, progress bars. It decides nothing."""
import json
import logging
import statistics
import sys
import time

from optuna.trial import TrialState

from mnist_optuna.rundir import command_line, write_atomic
from mnist_optuna.scores import compare, comparison_text, score_text
from mnist_optuna.training import minutes
from mnist_optuna.workers import NOT_TRAINED
from models import describe

log = logging.getLogger(__name__)


def network_text(trial):
    model = trial.user_attrs.get("model")
    return describe(model) + f" drop {model['dropout']:.2f}" + mmac_text(trial) if model else "?"


def mmac_text(trial):
    return f" ({trial.user_attrs['mmac']:.1f} MMAC)" if trial.user_attrs.get("mmac") is not None else ""


def training_text(trial):
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


def latency_text(trial):
    return f" {trial.user_attrs['latency_ms']:.3f} ms/img" if trial.user_attrs.get("latency_ms") is not None else ""


def val_text(trial):
    """'val 98.97 ± 0.10 %, NLL 0.0412': the validation accuracy with its standard error on the validation images
    (and the NLL) where the trial recorded them, else the accuracy alone."""
    accuracy, validation = trial_accuracy(trial), trial.user_attrs.get("validation") or {}
    if accuracy is None:
        return ""
    if not validation.get("images"):
        return f"val {100 * accuracy:.2f} %"
    return f"val {score_text(accuracy, validation['images'], validation.get('nll'))}"


def config_key(trial):
    """What a trial trains (network and recipe): two trials with one key are the same candidate."""
    return json.dumps([trial.user_attrs.get("model"), trial.user_attrs.get("train")], sort_keys=True)


def runner_up(ranked):
    """The first (key, trial) of `ranked` after the first whose network or recipe differs from the first's."""
    if not ranked:
        return None
    first = config_key(ranked[0][1])
    return next((pair for pair in ranked[1:] if config_key(pair[1]) != first), None)


def best_against_runner_up(best, other):
    """McNemar's test of the best trial against the runner-up on the validation images both were scored on
    (scores.compare), or None when either lacks a per-image record or they were scored on other images."""
    a, b = (trial.user_attrs.get("validation") or {} for trial in (best, other))
    if not (a.get("correct") and b.get("correct")) or a.get("images") != b.get("images"):
        return None
    return compare(a["correct"], b["correct"], a["images"])


def trial_line(trial, label="", describe_trial=network_text):
    seconds = trial.duration.total_seconds() if trial.duration else float("nan")
    value = f"{val_text(trial):29s}" if trial_accuracy(trial) is not None else " " * 29
    last = max(trial.intermediate_values) if trial.intermediate_values else None
    where = f" (step {last})" if trial.state == TrialState.PRUNED and last is not None else ""
    reason = f"  [{trial.user_attrs['reason']}]" if trial.user_attrs.get("reason") else ""
    return (f"{label}trial {trial.number:3d}  {trial.state.name:8s}{where:10s} {value}  {describe_trial(trial)}"
            f"{latency_text(trial)}  {seconds:6.1f} s{reason}")


def print_trial_lines(label="", describe_trial=network_text):
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


def mmac_of(trial):
    return trial.user_attrs.get("mmac", float("inf"))


def by_rank(trials):
    """The one order of "best": by validation accuracy, of equals the cheaper network first, then the earlier
    (the order given: stable)."""
    return sorted(trials, key=lambda t: (-trial_accuracy(t), mmac_of(t)))


def best_or_none(study):
    """The study's best complete trial (by_rank), or None."""
    ranked = by_rank(t for t in study.trials if t.state == TrialState.COMPLETE)
    return ranked[0] if ranked else None


def params_lines(params, indent="    "):
    return [f"{indent}{key}: {value}" for key, value in params.items()]


def mean_std(values):
    """(mean, sample std) of the values; (None, None) for none, so the results files stay valid JSON."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_trials_csv(path, column, studies):
    """Optuna's trials_dataframe of each (key, study), the key in a first column of that name, as one table."""
    import pandas as pd

    frames = []
    for key, study in studies:
        frame = study.trials_dataframe()
        if "user_attrs_validation" in frame.columns:  # its NLL is a column; which images it got right is not
            frame["user_attrs_val_nll"] = frame.pop("user_attrs_validation").map(
                lambda record: record.get("nll") if isinstance(record, dict) else None)
        frame.insert(0, column, key)
        frames.append(frame)
    write_atomic(path, (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()).to_csv(index=False))


def best_params_payload(trial, **extra):
    """Everything needed to rebuild and retrain the best network, with nothing else."""
    return {"value": trial_accuracy(trial), "trial": trial.number, "params": trial.params,
            "model": trial.user_attrs["model"], "train": trial.user_attrs["train"],
            "seed": trial.user_attrs.get("seed"), **extra}


class Stopwatch:
    def __init__(self):
        self.started = time.perf_counter()

    def seconds(self):
        return time.perf_counter() - self.started


class PhaseTimes:
    """Each phase's announced estimate beside the time it took, printed as one line at the end of a run: where the
    time went, and how far the estimates are off on this machine."""

    def __init__(self):
        self.clock = Stopwatch()
        self.phases = {}  # name: [estimate in seconds or None, whether the estimate is an upper bound, seconds taken]

    def estimate(self, name, seconds, at_most=False):
        self.phases.setdefault(name, [None, False, None])[:2] = [seconds, at_most]

    def took(self, name, seconds):
        row = self.phases.setdefault(name, [None, False, None])
        row[2] = (row[2] or 0.0) + seconds

    def line(self):
        parts = [f"{name} {minutes(seconds)}" + ("" if estimate is None else
                                                      f" (estimated {'at most ' if at_most else ''}"
                                                      f"{minutes(estimate)})")
                 for name, (estimate, at_most, seconds) in self.phases.items() if seconds is not None]
        return f"time by phase: {', '.join(parts)}; the whole run {minutes(self.clock.seconds())}"


def progress(total, description, unit="trial"):
    """A tqdm bar on a terminal at the normal log level; nothing at all in logs, pipes and CI."""
    from tqdm import tqdm

    show = sys.stdout.isatty() and log.getEffectiveLevel() <= logging.INFO
    return tqdm(total=total, desc=description, unit=unit, leave=False, disable=not show, file=sys.stdout)


def summarise(outcome, ranked, front=None):
    """Print the summary block of the outcome's searches and write trials.csv (best_params.json is the final
    stage's, final.finish); return (the chosen trial, the summary dict). `ranked`: (key, trial) pairs best first
    (studies.rank), whose first is the chosen network; `front`: the Pareto front of a multi-objective run, listed in
    full."""
    label, describe_trial, objectives = outcome.label, outcome.describe_trial, outcome.objectives
    pick_mmac, extra, out_dir = outcome.pick_mmac, outcome.extra, outcome.run.out_dir
    print("\n==== summary ====")
    per_study, all_trials = {}, []
    for key, study in outcome.studies:
        trial = best_or_none(study)
        all_trials += study.trials
        if trial is None:
            print(f"{label} {key}: no complete trial")
            continue
        per_study[key] = {"value": trial_accuracy(trial), "trial": trial.number, "params": trial.params}
        print(f"{label} {key}: best {val_text(trial)}  trial {trial.number}  {describe_trial(trial)}")
    counts = state_counts(all_trials)
    mean, std = mean_std([v["value"] for v in per_study.values()])
    skipped = f", {counts['not_trained']} not trained (over budget or repeats)" if counts["not_trained"] else ""
    print(f"trials: {counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed{skipped}")
    if len(per_study) > 1:
        print(f"per-{label} best: {100 * mean:.2f} ± {100 * std:.2f} % over {len(per_study)} {label}s")
    if front is not None:
        print_front(front, objectives, label, describe_trial)
    best_key, best = ranked[0] if ranked else (None, None)
    best_vs = None
    within = "" if pick_mmac is None else f" within {pick_mmac:g} MMAC"
    if best is not None:
        what = f"chosen: the most accurate front network{within}" if front is not None else f"best trial{within}"
        print(f"{what}: {val_text(best)}  {label} {best_key}  trial {best.number}  {describe_trial(best)}")
        print("\n".join(params_lines(best.params)))
        second = runner_up(ranked)
        if second is not None:
            comparison = best_against_runner_up(best, second[1])
            print(comparison_text(comparison, f"best trial {best.number}",
                                  f"the runner-up (trial {second[1].number}, {val_text(second[1])})"))
            best_vs = {"runner_up": {label: second[0], "trial": second[1].number,
                                     "value": trial_accuracy(second[1])}, **(comparison or {})}
        else:
            print("no runner-up to compare the best trial with: no other complete configuration")
    elif per_study:  # complete trials, none within the limits
        print(f"no {'front network' if front is not None else 'complete trial'} within "
              f"{mmac_limits({'pick_mmac': pick_mmac, **(extra or {})})}; "
              "rerun with --retrain-only and a larger limit")
    wall = outcome.seconds()
    print(f"search wall time: {wall:.1f} s")
    summary = {"seeds": per_study, "counts": counts, "per_seed_best_mean": mean, "per_seed_best_std": std,
               "best": None if best is None else {"seed": best_key, "trial": best.number,
                                                 "value": trial_accuracy(best), "params": best.params,
                                                 **({"against_runner_up": best_vs} if best_vs else {})},
               "objectives": list(objectives), "pick_mmac": pick_mmac,
               "search_seconds": wall, "command": command_line(), "out_dir": str(out_dir), **(extra or {})}
    if front is not None:
        summary["front"] = [{label: key, "trial": t.number, "values": dict(zip(objectives, t.values)),
                             "params": t.params, "network": describe_trial(t)} for key, t in front]
    write_trials_csv(out_dir / "trials.csv", label.replace(" ", "_"), outcome.studies)
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
