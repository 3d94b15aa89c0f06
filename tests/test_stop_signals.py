"""Ctrl-C and SIGTERM: a stop anywhere (inside a journal write, before training, in a retrain, a second stop) keeps
what was computed and leaves a study that resumes."""
import os
import signal
import threading
import time
from types import SimpleNamespace

import optuna
import pytest

from conftest import SEARCH, finish, start, study_trials
from mnist_optuna import cli, storages, studies, workers


def a_trial(x):
    return optuna.trial.create_trial(params={"x": x}, distributions={"x": optuna.distributions.IntDistribution(0, 9)},
                                     value=x)


def test_stopping_a_retrain_keeps_the_previous_summary_and_model(run_here, tmp_path):
    out = tmp_path / "run"
    assert run_here("MNIST-optuna.py", *SEARCH, "--promote", "0", "--out-dir", out).returncode == 0
    summary, model = (out / "summary.json").read_bytes(), (out / "model.pt").read_bytes()
    worker = start("MNIST-optuna.py", *SEARCH, "--promote", "0", "--retrain-only", "--final-epochs", "30",
                   "--final-subset", "20000", "--out-dir", out)
    for line in worker.stdout:
        if line.startswith("retraining on"):
            break
    worker.send_signal(signal.SIGINT)
    code, output = finish(worker)
    assert code == 130, output
    assert (out / "summary.json").read_bytes() == summary and (out / "model.pt").read_bytes() == model
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


@pytest.fixture
def stop_handler(monkeypatch):
    """The scripts' SIGTERM handler installed in this process, its state restored afterwards."""
    for key in ("requested", "signal", "held", "pending"):
        monkeypatch.setitem(cli._INTERRUPT, key, cli._INTERRUPT[key])
    previous = signal.signal(signal.SIGTERM, cli._on_stop_signal)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_stop_inside_a_journal_write_comes_after_the_lock_is_given_back(tmp_path, monkeypatch, stop_handler):
    # seen in CI: SIGTERM landed in Optuna's lock release between its unlink and the return, its cleanup
    # unlinked again and a FileNotFoundError, not the stop, failed the trial with a logged traceback
    path = tmp_path / "study.journal"
    study = optuna.create_study(study_name="s", storage=storages.make_storage(str(path), tmp_path))
    unlink = os.unlink

    def unlink_then_stop(name, *args, **kwargs):
        unlink(name, *args, **kwargs)
        if str(name).endswith(".rename"):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(os, "unlink", unlink_then_stop)
    with pytest.raises(KeyboardInterrupt):  # the stop itself, once the record is written and the lock free
        study.add_trial(a_trial(3))
    monkeypatch.setattr(os, "unlink", unlink)
    assert cli._INTERRUPT["requested"] and not cli._INTERRUPT["pending"]
    assert not [p.name for p in tmp_path.iterdir() if ".lock" in p.name]
    assert [t.value for t in study_trials(path, "s")] == [3]


def test_a_stop_just_before_the_journal_lock_is_taken_leaves_another_workers_lock_alone(tmp_path, monkeypatch,
                                                                                       stop_handler):
    # Optuna's acquire releases "its" lock when interrupted; interrupted before it took it, it would take away
    # the lock another worker holds, and two workers would append at once
    path = tmp_path / "study.journal"
    study = optuna.create_study(study_name="s", storage=storages.make_storage(str(path), tmp_path))
    other = optuna.storages.journal.JournalFileSymlinkLock(str(path))
    other.acquire()  # another worker is appending
    symlink, released = os.symlink, []

    def stop_then_symlink(*args, **kwargs):
        if not released:
            released.append(None)
            os.kill(os.getpid(), signal.SIGTERM)
        return symlink(*args, **kwargs)

    def other_worker():
        time.sleep(1.0)
        try:
            other.release()
            released.append("its own lock")
        except RuntimeError as error:  # "did not possess lock": someone took it away
            released.append(str(error))

    monkeypatch.setattr(os, "symlink", stop_then_symlink)
    thread = threading.Thread(target=other_worker)
    thread.start()
    with pytest.raises(KeyboardInterrupt):
        study.add_trial(a_trial(5))
    thread.join()
    assert released == [None, "its own lock"]
    assert [t.value for t in study_trials(path, "s")] == [5]  # written once the other worker was done


def test_a_second_stop_while_one_is_held_stops_at_once(stop_handler):
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with cli.stop_signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append("after the first")
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append("after the second")
    assert reached == ["after the first"]


def test_ctrl_c_before_training_still_queues_the_trial_again():
    # a stop that lands while the trial is being set up (its parameters drawn, nothing trained yet) is an
    # interruption like one in training: the rerun must queue the trial again, not count it as a failure
    def suggest(trial):
        trial.suggest_int("width", 8, 64)
        raise KeyboardInterrupt

    study = optuna.create_study(direction="maximize")
    objective = studies.run_objective(SimpleNamespace(run_id="run", data=None), suggest, 0)
    with pytest.raises(KeyboardInterrupt):
        study.optimize(objective, n_trials=1)
    (stopped,) = study.trials
    assert stopped.state.name == "FAIL" and stopped.user_attrs["reason"] == "interrupted"
    assert not workers.counted(stopped)
    assert workers.requeue_lost_trials(study) == 1
    assert study.get_trials(states=(optuna.trial.TrialState.WAITING,))[0].params == stopped.params
