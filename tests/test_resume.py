"""A resumed, retried or concurrent run answers exactly what an uninterrupted one answers."""

import time

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
    journal_lock_held,
    kill_inside_a_trial,
    start,
    trained_networks,
)
from mnist_optuna.storages import make_storage

pytestmark = pytest.mark.timeout(600)



@LONG
def test_kill_and_resume_gives_what_an_uninterrupted_run_gives(run_here, tmp_path):
    # only the killed run needs a process of its own; the others run in the test's (one torch thread, as the child)
    # trials of a second or so on 2,000 images: the kill after a trial is seen training lands inside it
    args = [*TINY_ADV, *GRID, "--train-subset", "2000", "--epochs", "2", "--no-final"]
    whole = run_here("MNIST-optuna-adv.py", *args, "--out-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr

    killed = tmp_path / "killed"
    victim = start("MNIST-optuna-adv.py", *args, "--out-dir", killed)
    kill_inside_a_trial(victim, killed / "study.journal", "mnist-fc-grid", after=2)
    resumed = run_here("MNIST-optuna-adv.py", *args, "--out-dir", killed)
    assert resumed.returncode == 0, resumed.stderr
    assert "interrupted trial(s) queued to run again" in resumed.stdout + resumed.stderr

    whole = trained_networks(tmp_path / "whole" / "study.journal", "mnist-fc-grid")  # (trained asserts: each network once)
    resumed = trained_networks(killed / "study.journal", "mnist-fc-grid")
    assert sorted(dict(key)["fc"] for key in whole) == sorted(GRID_HEADS)  # the whole grid
    assert resumed == whole  # the same networks, states and values, to the last bit
    # a finished grid trains nothing more
    rows = len((killed / "trials.csv").read_text().splitlines())
    again = run_here("MNIST-optuna-adv.py", *args, "--out-dir", killed)
    assert again.returncode == 0 and "grid is finished already" in again.stdout + again.stderr, again.stdout
    assert len((killed / "trials.csv").read_text().splitlines()) == rows


def test_a_resumed_tpe_search_never_trains_a_network_twice(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, *TINY_CNN, "--train-subset", "3000", "--epochs", "2", "--seeds", "0", "--n-trials", "4",
            "--n-startup-trials", "4", "--no-final", "--out-dir", out]
    victim = start("MNIST-optuna.py", *args)
    kill_inside_a_trial(victim, out / "study.journal", "mnist-cnn-seed0", after=1)
    code, output = finish(start("MNIST-optuna.py", *args))
    assert code == 0, output
    # the retried trial and the restarted random start-up draw are the same network; it trains once
    assert len(trained_networks(out / "study.journal", "mnist-cnn-seed0")) == 4


def test_two_workers_of_one_seed_never_train_a_network_twice(tmp_path):
    journal = tmp_path / "shared.journal"
    common = [*TINY, *TINY_CNN, "--seeds", "0", "--n-trials", "3", "--storage", journal, "--no-final"]
    workers = [start("MNIST-optuna.py", *common, "--out-dir", tmp_path / f"w{i}") for i in range(2)]
    for worker in workers:
        code, output = finish(worker)
        assert code == 0, output
    assert len(trained_networks(journal, "mnist-cnn-seed0")) == 6


QUICK_SEARCH = ["--quick", "--no-final", "--no-plots"]
_UNINTERRUPTED = {}


def drawn(folder):
    """Each study's trials that count, in order: (parameters, value); lost trials left out (their retries count)."""
    import optuna

    from mnist_optuna.workers import lost_numbers

    storage = make_storage(None, folder, must_exist=True)
    found = {}
    for seed in (0, 1):
        trials = optuna.load_study(study_name=f"mnist-cnn-seed{seed}", storage=storage).trials
        lost = lost_numbers(trials)
        found[seed] = [(t.params, t.value) for t in trials if t.number not in lost]
    return found


@pytest.mark.parametrize("signal_name, when", [("SIGKILL", "inside"), ("SIGINT", "inside"), ("SIGKILL", "between")])
def test_a_tpe_search_stopped_anywhere_and_resumed_draws_and_trains_what_an_uninterrupted_one_does(
        capsys, tmp_path, signal_name, when):
    import signal
    import subprocess
    import sys
    import time

    from conftest import DATA_DIR, ROOT, run_in_process

    if not _UNINTERRUPTED:
        assert run_in_process(capsys, "MNIST-optuna.py", *QUICK_SEARCH, "--out-dir", tmp_path / "whole").returncode == 0
        _UNINTERRUPTED.update(drawn(tmp_path / "whole"))
    out = tmp_path / "stopped"
    process = subprocess.Popen([sys.executable, str(ROOT / "MNIST-optuna.py"), *QUICK_SEARCH, "--out-dir", str(out),
                                "--data-dir", str(DATA_DIR)], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    journal, deadline = out / "study.journal", time.monotonic() + 120
    # inside: seed 0's first trial has claimed its worker and trains; between: it has finished, the next not begun
    mark = b'"claimed"' if when == "inside" else b'"state":1,'
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if journal.is_file() and mark in journal.read_bytes() and not journal_lock_held(journal):
                if when == "inside":  # into the training, past the journal writes that start the trial (a kill
                    time.sleep(0.2)   # holding the journal's lock costs the rerun Optuna's 30 s grace period)
                process.send_signal(getattr(signal, signal_name))
                break
            time.sleep(0.005)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode in (-9, 130), process.returncode  # stopped, not finished
    rerun = run_in_process(capsys, "MNIST-optuna.py", *QUICK_SEARCH, "--out-dir", out)
    assert rerun.returncode == 0, rerun.stderr
    assert drawn(out) == _UNINTERRUPTED


def test_a_retry_with_its_first_parameters_fixed_draws_the_rest_as_the_lost_trial_would():
    from mnist_optuna.samplers import PositionSeeded

    def study():
        return optuna.create_study(sampler=PositionSeeded(7, lambda seed: optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=2)))

    def draw(trial):
        return [trial.suggest_int("width", 1, 100), trial.suggest_float("rate", 1e-4, 1.0, log=True),
                trial.suggest_categorical("kind", ["a", "b", "c"])]

    whole = study()
    drawn = draw(whole.ask())
    # the lost trial had drawn its width before the stop: its retry has it fixed and draws only the rest
    resumed = study()
    resumed.enqueue_trial({"width": drawn[0]})
    assert draw(resumed.ask()) == drawn
    # and the next position draws alike in both, the startup draws and TPE's alike
    for _ in range(3):
        a, b = whole.ask(), resumed.ask()
        values = draw(a)
        assert draw(b) == values
        whole.tell(a, values[0])
        resumed.tell(b, values[0])


def test_a_trial_whose_worker_died_before_claiming_it_is_queued_again_in_its_place(monkeypatch):
    from mnist_optuna import workers
    from mnist_optuna.samplers import PositionSeeded, position

    monkeypatch.setattr(workers, "CLAIM_SECONDS", 0.5)

    def study():
        return optuna.create_study(sampler=PositionSeeded(3, lambda seed: optuna.samplers.RandomSampler(seed)))

    whole = study()
    expected = [whole.ask().suggest_float("rate", 0, 1) for _ in range(2)]
    stopped = study()
    stopped.tell(stopped.ask(), 1.0)  # position 0 (its value is not compared here)
    stopped.ask()  # position 1, created by a process killed before its claim: RUNNING, no worker named
    start = time.monotonic()
    workers.wait_for_claims(stopped, poll_seconds=0.05)
    assert time.monotonic() - start >= 0.4  # it waited for the claim that might still come...
    assert workers.requeue_lost_trials(stopped) == 1  # ...then took the trial for lost
    retry = stopped.ask()
    assert retry.number == 2 and position(stopped, retry) == 1
    assert retry.suggest_float("rate", 0, 1) == expected[1]
    stopped.tell(retry, 0.5)
    # a claimed trial of a live worker (this process) is neither waited for nor queued again
    claimed = stopped.ask()
    claimed.set_user_attr("worker", workers.worker_id())
    claimed.set_user_attr("claimed", claimed.number)
    start = time.monotonic()
    workers.wait_for_claims(stopped, poll_seconds=0.05)
    assert time.monotonic() - start < 0.3 and workers.requeue_lost_trials(stopped) == 0
