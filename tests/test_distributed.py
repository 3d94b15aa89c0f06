"""Optuna's own distributed mode: several workers on one storage, killed workers, Ctrl-C, resume."""
import json
import signal
import subprocess
import sys
import uuid

import optuna
import pytest

from conftest import (
    GRID,
    GRID_HEADS,
    LONG,
    TINY,
    TINY_ADV,
    TINY_CNN,
    finish,
    kill_inside_a_trial,
    load_script,
    postgres_or_skip,
    start,
    wait_for_trial_lines,
)
from mnist_optuna.reporting import trained
from mnist_optuna.storages import make_storage
from mnist_optuna.studies import trial_seed

adv = load_script("MNIST-optuna-adv.py")



@pytest.fixture(params=["journal", "postgresql"])
def storage(request, tmp_path):
    if request.param == "journal":
        return str(tmp_path / "shared.journal")
    return postgres_or_skip()



def load(storage, name):
    return optuna.load_study(study_name=name, storage=make_storage(storage, None))


def states(study):
    """The states of the trials that trained a network (not those over budget or repeating another's)."""
    return [t.state.name for t in study.trials if trained(t)]


@LONG
def test_two_adv_workers_share_one_grid(storage, tmp_path):
    name = f"grid-{uuid.uuid4().hex[:8]}"
    common = [*TINY_ADV, *GRID, "--storage", storage, "--study-name", name, "--no-final"]
    workers = [start("MNIST-optuna-adv.py", *common, "--out-dir", tmp_path / f"w{i}") for i in range(2)]
    for worker in workers:
        code, output = finish(worker)
        assert code == 0, output
        assert "grid size: 9" in output
    study = load(storage, name)
    done = [t.params["fc"] for t in study.trials if t.state.name in ("COMPLETE", "PRUNED") and trained(t)]
    assert sorted(done) == sorted(GRID_HEADS)  # every network once: none lost, none twice


def test_two_tpe_workers_add_up(tmp_path):
    # on PostgreSQL; two TPE workers on one journal: tests/test_resume.py
    storage = postgres_or_skip()
    prefix = f"tpe-{uuid.uuid4().hex[:8]}"
    common = [*TINY, *TINY_CNN, "--seeds", "0", "--storage", storage, "--study-prefix", prefix, "--no-final"]
    workers = [start("MNIST-optuna.py", *common, "--n-trials", n, "--out-dir", tmp_path / f"w{n}") for n in (2, 3)]
    for worker in workers:
        code, output = finish(worker)
        assert code == 0, output
    assert sum(s in ("COMPLETE", "PRUNED") for s in states(load(storage, f"{prefix}-seed0"))) == 2 + 3



@LONG
def test_killed_worker_trial_is_retried_by_another_worker(run_here, tmp_path):
    storage = postgres_or_skip()
    name = f"kill-{uuid.uuid4().hex[:8]}"
    # trials of a second or so on 2,000 images: a kill right after a trial is seen training lands inside it (with
    # 1,000 images a loaded CI machine once saw the trial end in between)
    common = [*TINY_ADV, *GRID, "--train-subset", "2000", "--storage", storage, "--study-name", name, "--no-final"]
    victim = start("MNIST-optuna-adv.py", *common, "--out-dir", tmp_path / "victim")
    wait_for_trial_lines(victim, 2)
    # wait until the victim is inside its next trial (training: its network recorded), then kill it without warning
    for _ in range(200):
        if any(t.state.name == "RUNNING" and "model" in t.user_attrs for t in load(storage, name).trials):
            break
        subprocess.run(["sleep", "0.05"])
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    killed = [t for t in load(storage, name).trials if t.state.name == "RUNNING"]
    assert len(killed) == 1

    rescuer = run_here("MNIST-optuna-adv.py", *common, "--out-dir", tmp_path / "rescuer")  # needs no process of its own
    assert rescuer.returncode == 0, rescuer.stderr
    study = load(storage, name)
    lost = study.trials[killed[0].number]
    assert lost.state.name == "FAIL"  # failed by the heartbeat or by the next worker on this host
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == lost.number]
    assert len(retries) == 1 and retries[0].state.name in ("COMPLETE", "PRUNED")
    # the queued grid point, even when the worker died before the trial asked for it (then params are empty)
    assert retries[0].params == (lost.params or {"fc": lost.user_attrs["head"]})
    done = [t.params["fc"] for t in study.trials if t.state.name in ("COMPLETE", "PRUNED") and trained(t)]
    assert sorted(done) == sorted(GRID_HEADS)


@LONG
def test_ctrl_c_and_sigterm_keep_the_study_and_a_rerun_completes_it(run_here, tmp_path):
    out = tmp_path / "run"
    journal, name = out / "study.journal", "mnist-cnn-seed0"
    # trials of a second or more, so each signal lands inside the search
    args = [*TINY, *TINY_CNN, "--train-subset", "3000", "--epochs", "2", "--seeds", "0", "--n-trials", "4",
            "--no-final", "--out-dir", out]
    finished = 0
    for stop, code_expected in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        worker = start("MNIST-optuna.py", *args)
        kill_inside_a_trial(worker, journal, name, after=1, signal_number=stop)
        code, output = finish(worker)
        assert code == code_expected, output
        assert "==== summary ====" in output and "rerun the same command" in output
        assert "Traceback" not in output  # neither ours nor Optuna's logged one
        study = load(str(journal), name)
        rows = (out / "trials.csv").read_text().strip().splitlines()[1:]
        assert len(rows) == len(study.trials)  # trials.csv was written after the stop
        now = sum(t.state.name in ("COMPLETE", "PRUNED") and trained(t) for t in study.trials)
        assert finished < now < 4
        finished = now

    rerun = run_here("MNIST-optuna.py", *args)
    assert rerun.returncode == 0, rerun.stderr
    study = load(str(journal), name)
    assert sum(t.state.name in ("COMPLETE", "PRUNED") and trained(t) for t in study.trials) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["complete"] + summary["counts"]["pruned"] == 4
    # each stopped trial ran again, once, with its parameters and their seed
    interrupted = [t for t in study.trials if t.state.name == "FAIL"]
    assert interrupted and all(t.user_attrs.get("reason") == "interrupted" for t in interrupted)
    for trial in interrupted:
        retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == trial.number]
        assert len(retried) == 1 and retried[0].state.name in ("COMPLETE", "PRUNED")
        assert retried[0].params == trial.params and retried[0].user_attrs["seed"] == trial_seed(0, trial.params)


SIGINT_INSIDE_CLEANUP = """
import os, signal
from mnist_optuna import cli

def main(argv):
    try:
        os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C lands inside a library's lock release ...
        signal.pause()
    except KeyboardInterrupt:
        pass
    raise FileNotFoundError("lock file already gone")  # ... whose cleanup then fails instead
{tail}
"""


@pytest.mark.parametrize("signal_first", [True, False])
def test_ctrl_c_that_surfaces_as_a_library_error_still_exits_130(signal_first):
    tail = "cli.run(main)" if signal_first else "cli.run(lambda argv: open('/nonexistent/x'))"
    code = SIGINT_INSIDE_CLEANUP.format(tail=tail)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if signal_first:  # the user asked to stop: one line, 130, no traceback
        assert result.returncode == 130 and result.stderr.strip() == "interrupted", result.stderr
    else:  # the same error without Ctrl-C is a real bug and must stay visible
        assert result.returncode == 1 and "FileNotFoundError" in result.stderr
