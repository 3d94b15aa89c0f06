"""Issue 13: a resumed, retried or concurrent run answers exactly what an uninterrupted one answers."""
import signal
import time

import optuna
import pytest
from conftest import TINY, TINY_ADV, TINY_CNN
from test_distributed import GRID, finish, start, wait_for_trial_lines

from storages import make_storage

pytestmark = pytest.mark.timeout(600)


def trained(storage, name):
    """{params as a sorted tuple: (state, value)} of the trials that trained a network."""
    study = optuna.load_study(study_name=name, storage=make_storage(str(storage), None))
    result = {}
    for trial in study.trials:
        if trial.state.name in ("COMPLETE", "PRUNED") and not str(trial.user_attrs.get("reason", "")).startswith(
                ("over budget", "same configuration")):
            key = tuple(sorted(trial.params.items()))
            assert key not in result, f"trial {trial.number} trained the configuration of an earlier trial"
            result[key] = (trial.state.name, trial.value)
    return result


def kill_inside_a_trial(worker, journal, name, after, signal_number=signal.SIGKILL):
    """Send the signal (SIGKILL: no warning) while the worker trains the trial after its first `after` lines."""
    wait_for_trial_lines(worker, after)
    for _ in range(400):
        study = optuna.load_study(study_name=name, storage=make_storage(str(journal), None))
        if any(t.state.name == "RUNNING" and "model" in t.user_attrs for t in study.trials):
            break
        time.sleep(0.05)
    worker.send_signal(signal_number)
    worker.wait(timeout=60)


def test_kill_and_resume_gives_what_an_uninterrupted_run_gives(tmp_path):
    args = [*TINY_ADV, *GRID, "--train-subset", "3000", "--epochs", "2", "--n-trials", "5", "--no-final"]
    code, output = finish(start("MNIST-optuna-adv.py", *args, "--out-dir", tmp_path / "whole"))
    assert code == 0, output

    victim = start("MNIST-optuna-adv.py", *args, "--out-dir", tmp_path / "killed")
    kill_inside_a_trial(victim, tmp_path / "killed" / "study.journal", "mnist-fc-grid", after=2)
    code, output = finish(start("MNIST-optuna-adv.py", *args, "--out-dir", tmp_path / "killed"))
    assert code == 0, output
    assert "interrupted trial(s) queued to run again" in output

    whole = trained(tmp_path / "whole" / "study.journal", "mnist-fc-grid")
    resumed = trained(tmp_path / "killed" / "study.journal", "mnist-fc-grid")
    assert len(whole) == 5 and resumed == whole  # the same networks, states and values, to the last bit


def test_a_resumed_tpe_search_never_trains_a_network_twice(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, *TINY_CNN, "--train-subset", "3000", "--epochs", "2", "--seeds", "0", "--n-trials", "4",
            "--n-startup-trials", "4", "--no-final", "--out-dir", out]
    victim = start("MNIST-optuna.py", *args)
    kill_inside_a_trial(victim, out / "study.journal", "mnist-cnn-seed0", after=1)
    code, output = finish(start("MNIST-optuna.py", *args))
    assert code == 0, output
    # the retried trial and the restarted random start-up draw are the same network; it trains once
    assert len(trained(out / "study.journal", "mnist-cnn-seed0")) == 4


def test_two_workers_of_one_seed_never_train_a_network_twice(tmp_path):
    journal = tmp_path / "shared.journal"
    common = [*TINY, *TINY_CNN, "--seeds", "0", "--n-trials", "3", "--storage", journal, "--no-final"]
    workers = [start("MNIST-optuna.py", *common, "--out-dir", tmp_path / f"w{i}") for i in range(2)]
    for worker in workers:
        code, output = finish(worker)
        assert code == 0, output
    assert len(trained(journal, "mnist-cnn-seed0")) == 6
