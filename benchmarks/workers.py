"""Many workers on one study: N processes of the real MNIST-optuna.py share one storage, a fifth of them are
killed with SIGKILL at random moments and started again, and the study is checked at the end.

    python benchmarks/workers.py --workers 16 --storage journal
    python benchmarks/workers.py --workers 16 --storage postgresql       # a throwaway server, as .ci/run starts it
    python benchmarks/workers.py --workers 16 --storage grpc --behind postgresql   # Optuna's gRPC proxy in front

Each worker trains tiny networks (300 images, one epoch of 6 steps) so that coordination, not training, is what
is measured; every worker uses the same TPE seed, as the same command started on many machines does, so they
propose the same networks at the same moments. Counted at the end: trials by state, configurations trained
more than once, trials lost (RUNNING or WAITING forever, or failed and never retried), final stages run, trials
per minute, and each worker's time in storage calls per trial (median and 99th percentile; a worker is timed
by wrapping the storage object Optuna opens, in that worker's process).
"""
import argparse
import atexit
import collections
import json
import math
import os
import random
import runpy
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = os.environ.get("MNIST_DATA_DIR") or str(ROOT.parent / "shared" / "data")
# tiny trials: 300 images, one epoch of 6 steps, small networks
TINY = ["--train-subset", "300", "--val-size", "200", "--epochs", "1", "--batch-size", "50", "--final-epochs", "1",
        "--final-subset", "500", "--conv-layers", "2", "--pool-after", "1", "2", "--conv-filters", "4", "32", "4",
        "--kernel-sizes", "3", "--fc-width", "16", "128", "16", "--seeds", "0", "--promote", "0", "--no-plots"]


# ---- inside a worker: time every call to the storage object Optuna opens --------------------------------------

def timed_worker(stats_path, argv):
    """Run MNIST-optuna.py with `argv` in this process, its storage calls timed; write the storage seconds of
    each finished trial to `stats_path` after every trial (a killed worker leaves what it finished)."""
    import optuna

    local, spent, per_trial = threading.local(), [0.0], []

    def timed(method):
        def call(self, *args, **kwargs):
            if getattr(local, "depth", 0):  # a storage method calling another: the outer call counts
                return method(self, *args, **kwargs)
            local.depth, started = 1, time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                local.depth = 0
                spent[0] += time.perf_counter() - started
                if method.__name__ == "set_trial_state_values" and len(args) > 1 and args[1].is_finished():
                    local.depth = 1  # not timed: is it a trial of the search, or a final-stage claim?
                    claim = "key" in self.get_trial(args[0]).user_attrs
                    local.depth = 0
                    if not claim:
                        per_trial.append(spent[0])
                        spent[0] = 0.0
                        Path(stats_path).write_text(json.dumps(per_trial))
        return call

    def with_timing(storage):
        base = type(storage)
        if getattr(base, "timed", False):
            return storage
        names = [name for name in dir(optuna.storages.BaseStorage) if not name.startswith("_")]
        storage.__class__ = type(f"Timed{base.__name__}", (base,), {
            "timed": True, **{name: timed(getattr(base, name)) for name in names if callable(getattr(base, name))}})
        return storage

    opened = optuna.storages.get_storage
    optuna.storages.get_storage = lambda storage: with_timing(opened(storage))
    atexit.register(lambda: Path(stats_path).write_text(json.dumps(per_trial)))
    sys.argv = [str(ROOT / "MNIST-optuna.py"), *argv]
    runpy.run_path(str(ROOT / "MNIST-optuna.py"), run_name="__main__")


# ---- the storages ----------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_postgres():
    """A throwaway PostgreSQL on 127.0.0.1, started the way .ci/run starts it; (URL, stop)."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: [int(x) for x in p.parent.name.split(".")])
    if not bins:
        sys.exit("no PostgreSQL found under /usr/lib/postgresql; install it (apt-get install postgresql) or pass "
                 "--postgres URL")
    pg, port = bins[-1], free_port()
    data = Path(tempfile.mkdtemp(prefix="mnist-optuna-pg-"))  # its own folder: the server runs as postgres
    shutil.chown(data, "postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_postgres, str(pg / "initdb"), "-D", str(data / "data"), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run([*as_postgres, str(pg / "pg_ctl"), "-D", str(data / "data"), "-l", str(data / "log"), "-w", "-o",
                    f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c max_connections=300", "start"],
                   check=True, capture_output=True)

    def stop():
        subprocess.run([*as_postgres, str(pg / "pg_ctl"), "-D", str(data / "data"), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)
    return f"postgresql://postgres@127.0.0.1:{port}/postgres", stop


def start_proxy(behind, folder):
    """`python -m mnist_optuna proxy` in front of `behind`; (grpc:// URL, stop)."""
    port = free_port()
    log = open(Path(folder) / "proxy.log", "w")
    proxy = subprocess.Popen([sys.executable, "-m", "mnist_optuna", "proxy", behind, "--host", "127.0.0.1",
                              "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    else:
        proxy.kill()
        sys.exit(f"the storage proxy did not start: {(Path(folder) / 'proxy.log').read_text()[-500:]}")

    def stop():
        proxy.terminate()
        proxy.wait(30)
    return f"grpc://127.0.0.1:{port}", stop


# ---- the run ---------------------------------------------------------------------------------------------------

def run_workers(n, storage, prefix, folder, trials_per_worker, kill_fraction, rng, timeout):
    """Start n workers, kill some at random moments and start them again; (wall seconds, kills, exit codes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MNIST_DATA_DIR": DATA_DIR}

    def start(i, life):
        out = Path(folder) / f"w{i}"
        argv = [*TINY, "--n-trials", str(trials_per_worker), "--storage", storage, "--study-prefix", prefix,
                "--out-dir", str(out), "--data-dir", DATA_DIR]
        log = open(Path(folder) / f"w{i}.{life}.log", "w")
        return subprocess.Popen([sys.executable, __file__, "--worker", str(Path(folder) / f"w{i}.{life}.json"),
                                 "--", *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    started = time.perf_counter()
    procs = {i: start(i, 0) for i in range(n)}
    lives = dict.fromkeys(range(n), 0)
    victims = rng.sample(range(n), round(n * kill_fraction))
    # each victim dies once, at a random moment after it joined the study (its log shows the search starting:
    # a process killed before that never joined, like a worker started late), while it searches or runs the
    # final stage
    delay = {i: rng.uniform(0, 2.5 * n) for i in victims}
    kill_at = {}
    while True:
        now = time.perf_counter()
        for i in [i for i in delay if i not in kill_at]:
            if "searching" in (Path(folder) / f"w{i}.0.log").read_text(errors="replace"):
                kill_at[i] = now + delay[i]
        for i, moment in list(kill_at.items()):
            if now >= moment:
                del delay[i]
                del kill_at[i]
                if procs[i].poll() is None:
                    procs[i].send_signal(signal.SIGKILL)
                    procs[i].wait()
                    lives[i] += 1
                    procs[i] = start(i, lives[i])  # the same command again: it resumes its run folder
        if all(p.poll() is not None for p in procs.values()):
            break  # (a victim that ended before its moment came is not killed)
        if now - started > timeout:
            for p in procs.values():
                p.kill()
            break
        time.sleep(0.1)
    kills = sum(lives.values())
    return time.perf_counter() - started, kills, {i: p.returncode for i, p in procs.items()}


def check_study(storage, prefix, n, trials_per_worker):
    """What the study holds at the end."""
    import optuna
    from optuna.trial import TrialState

    from mnist_optuna.reporting import trained
    from mnist_optuna.storages import make_storage
    from mnist_optuna.workers import lost_numbers

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(storage, Path(storage).parent if "://" not in storage else Path("."))
    study = optuna.load_study(study_name=f"{prefix}-seed0", storage=storage)
    trials = study.get_trials(deepcopy=False)
    states = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    retried = lost_numbers(trials)
    lost = [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)
            or (t.state == TrialState.FAIL and t.number not in retried)]
    # a training counts once it ended (complete, or pruned by the pruner); a killed trial's partial training is
    # retried by its successor, and a trial that met its twin trained nothing (trained() is False)
    trained_runs = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and trained(t)]
    by_config = collections.Counter(json.dumps(t.params, sort_keys=True) for t in trained_runs)
    twice = sum(count > 1 for count in by_config.values())
    per_run = collections.Counter(t.user_attrs.get("run") for t in trained_runs)  # a run folder: one worker's share
    short = sum(max(0, trials_per_worker - count) for count in per_run.values()) + \
        trials_per_worker * max(0, n - len(per_run))
    try:
        claims = optuna.load_study(study_name=f"{prefix}-seed0:final", storage=storage).get_trials(deepcopy=False)
    except KeyError:
        claims = []
    finals = sum(t.state == TrialState.COMPLETE for t in claims)
    return {"states": states, "trained": len(trained_runs), "twice": twice, "lost": lost, "short": short,
            "finals": finals}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--storage", choices=("journal", "postgresql", "grpc"), default="journal")
    parser.add_argument("--behind", choices=("journal", "postgresql"), default="postgresql",
                        help="what the gRPC proxy stands in front of (--storage grpc)")
    parser.add_argument("--postgres", default=os.environ.get("MNIST_OPTUNA_POSTGRES"),
                        help="a PostgreSQL URL to use instead of starting a throwaway server")
    parser.add_argument("--kill-fraction", type=float, default=0.2)
    parser.add_argument("--trials-per-worker", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="who is killed, and when")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--keep", help="keep the workers' folders and logs here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.worker:
        return timed_worker(args.worker, rest[1:] if rest[:1] == ["--"] else rest)
    folder = tempfile.mkdtemp(prefix="mnist-optuna-workers-")
    stops = []
    try:
        behind = args.storage if args.storage != "grpc" else args.behind
        if behind == "journal":
            storage = str(Path(folder) / "study.journal")
        elif args.postgres:
            storage = args.postgres
        else:
            storage, stop = start_postgres()
            stops.append(stop)
        check_with = storage
        if args.storage == "grpc":
            storage, stop = start_proxy(storage, folder)
            stops.insert(0, stop)
        prefix = f"load-{uuid.uuid4().hex[:8]}"
        wall, kills, codes = run_workers(args.workers, storage, prefix, folder, args.trials_per_worker,
                                         args.kill_fraction, random.Random(args.seed), args.timeout)
        result = check_study(check_with, prefix, args.workers, args.trials_per_worker)
        per_trial = [s for path in Path(folder).glob("w*.json") for s in json.loads(path.read_text() or "[]")]
    finally:
        for stop in stops:
            stop()
        if args.keep:
            shutil.copytree(folder, args.keep, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.pt", "*.onnx"))
        shutil.rmtree(folder, ignore_errors=True)
    name = args.storage if args.storage != "grpc" else f"grpc (in front of {args.behind})"
    failed = {i: code for i, code in codes.items() if code != 0}
    print(f"{args.workers} worker(s), {args.trials_per_worker} trials each, {kills} killed with SIGKILL and started "
          f"again; {wall:.0f} s; exit codes other than 0: {failed or 'none'}")
    print("trials by state: " + ", ".join(f"{k} {v}" for k, v in result["states"].items() if v))
    if per_trial:
        per_trial.sort()
        p99 = per_trial[min(len(per_trial) - 1, math.ceil(0.99 * len(per_trial)) - 1)]
        print(f"storage time per trial (per worker): median {1000 * statistics.median(per_trial):.0f} ms, "
              f"99th percentile {1000 * p99:.0f} ms ({len(per_trial)} trials)")
    if result["short"]:
        print(f"requested trials not completed: {result['short']}")
    if result["lost"]:
        print(f"lost trials: {result['lost']}")
    print(f"workers {args.workers} on {name}: {result['trained']} trials complete, {result['twice']} trained twice, "
          f"{len(result['lost'])} lost, {result['finals']} final stage(s), {60 * result['trained'] / wall:.1f} "
          "trials/min")
    ok = not (result["twice"] or result["lost"] or result["short"] or result["finals"] != 1 or failed)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
