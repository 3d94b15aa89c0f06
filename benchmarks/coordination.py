"""The project's own coordination calls against one storage, without torch: how the time per report and per
trial grows with the number of trials in the study.

    python benchmarks/coordination.py                                  # 2,100 trials, 128 simulated workers
    python benchmarks/coordination.py --trials 500 --workers 16 --storage sqlite

A stand-in objective replaces training: `--workers` trials are open at once (as many workers would hold them,
RUNNING in the storage), and their reports interleave. Each trial is claimed like a real one (studies.claim)
and checked for a twin before it "trains" and at each report (twins.twin_of); after each trial the lost-trial
requeue and the --n-trials count run (workers.requeue_lost_trials, workers.remaining_trials), all against the
real storage. Printed: the median time of each call per band of 100 trials in the study (and of the report's time, how
much Optuna took to list the study's trials), and the ratio of the time per report at the end to the time at the
first band, with and without that list. Every band is measured while trials still start: once none start, the
reports of the last open trials take about 1.7x longer at any size of the study (seen at 600 trials as at 2,000),
which says nothing about its growth, so the simulation stops when the last trial has started.
"""
import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from mnist_optuna import studies, twins, workers
from mnist_optuna.storages import make_storage

BAND = 100


def simulate(storage, n_trials, n_workers, reports, seed=0):
    """{band: {"report": [s...], "start": [s...], "trial": [s...], "list": [s...]}}: times of the per-report
    calls, the check before a trial trains, the calls after a trial, and of Optuna's list inside the reports, by
    the number of trials the study held when they ran."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="coordination", storage=storage, pruner=optuna.pruners.NopPruner(),
                                direction="maximize")
    rng = random.Random(seed)
    times, open_trials, started, run_id = {}, [], 0, "simulated"
    listing, read_trials = [0.0], study.get_trials

    def get_trials(*args, **kwargs):  # how long Optuna takes to list the study's trials, inside the calls
        begun = time.perf_counter()
        try:
            return read_trials(*args, **kwargs)
        finally:
            listing[0] += time.perf_counter() - begun
    study.get_trials = get_trials  # the trials' .study is this object: the project's calls go through here

    def timed(kind, call):
        listing[0], begun = 0.0, time.perf_counter()
        result = call()
        band = times.setdefault((started // BAND) * BAND, {"report": [], "start": [], "trial": [], "list": []})
        band[kind].append(time.perf_counter() - begun)
        if kind == "report":
            band["list"].append(listing[0])
        return result

    while True:
        while started < n_trials and len(open_trials) < n_workers:
            trial = study.ask()
            studies.claim(trial, run_id)
            trial.suggest_int("width", 1, 10**6)  # distinct networks: no trial has a twin
            trial.suggest_float("lr", 1e-4, 1e-1, log=True)
            assert timed("start", lambda: twins.twin_of(trial)) is None  # run_trial's check before training
            open_trials.append([trial, 0])
            started += 1
        if started == n_trials:  # the last trial started; those still open are left (see the docstring)
            break
        slot = open_trials[rng.randrange(len(open_trials))]  # some worker reports next
        trial, step = slot
        step += 1
        twin = timed("report", lambda: twins.twin_of(trial))
        assert twin is None
        trial.report(rng.random(), step)
        slot[1] = step
        if step == reports:
            open_trials.remove(slot)
            study.tell(trial, rng.random())
            timed("trial", lambda: (workers.requeue_lost_trials(study), workers.remaining_trials(study, n_trials,
                                                                                               run_id)))
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=2100, help="trials started (the last band of 100: 2,000-2,099)")
    parser.add_argument("--workers", type=int, default=128, help="trials open at once")
    parser.add_argument("--reports", type=int, default=3, help="reports per trial (epochs)")
    parser.add_argument("--storage", choices=("journal", "sqlite"), default="journal")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        spec = None if args.storage == "journal" else f"sqlite:///{folder}/study.db"
        storage = make_storage(spec, Path(folder))
        started = time.perf_counter()
        times = simulate(storage, args.trials, args.workers, args.reports)
        wall = time.perf_counter() - started
    print(f"{args.trials} trials, {args.workers} open at once, {args.reports} reports each, {args.storage} storage: "
          f"{wall:.1f} s")
    print(f"{'trials in study':>16} {'per report (ms)':>16} {'of it Optuna list':>18} {'check before (ms)':>18} "
          f"{'after trial (ms)':>17}")
    bands = [band for band in sorted(times) if times[band]["report"]]  # the first trials open before any report
    for band in bands:
        report, listing, start, trial = (times[band][kind] for kind in ("report", "list", "start", "trial"))
        print(f"{band:>7}-{band + BAND - 1:<8} {1000 * statistics.median(report):16.4f} "
              f"{1000 * statistics.median(listing):18.4f} "
              f"{1000 * statistics.median(start) if start else float('nan'):18.3f} "
              f"{1000 * statistics.median(trial) if trial else float('nan'):17.3f}")
    first, last = bands[0], bands[-1]
    ratio = statistics.median(times[last]["report"]) / statistics.median(times[first]["report"])
    per_trial = statistics.median(times[last]["trial"]) / statistics.median(times[first]["trial"])
    own = [statistics.median(report - listing for report, listing in zip(times[band]["report"], times[band]["list"]))
           for band in (first, last)]
    print(f"ratio per report at {last}-{last + BAND - 1} trials / at {first}-{first + BAND - 1}: {ratio:.2f}x   "
          f"(without Optuna's list of the trials: {own[1] / own[0]:.2f}x; per trial: {per_trial:.2f}x)")


if __name__ == "__main__":
    main()
