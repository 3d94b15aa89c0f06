"""What workers sharing a study do at every report and at the end. The twin check finds the same configuration
among finished and running trials however the study grows, while reading each finished trial once
(benchmarks/coordination.py measures its cost); the wait before the final stage lasts while another worker still
adds trials (benchmarks/workers.py runs many workers with kills)."""
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from mnist_optuna import studies, twins, workers
from mnist_optuna.outcome import Outcome


def outcome_of_run(run_id, *searched):
    """An outcome of a search by the run folder `run_id`, of these studies (keys 0, 1, ...), with no tracker."""
    return Outcome(SimpleNamespace(run_id=run_id, tracker=None), lambda trial: "net", studies=list(enumerate(searched)))


def queued(study, width):
    """A running trial of the network `width`."""
    study.enqueue_trial({"width": width})
    trial = study.ask()
    trial.suggest_int("width", 1, 100)
    return trial


def test_the_twin_check_finds_finished_and_running_twins_as_the_study_grows():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, direction="maximize")
    first = queued(study, 1)                 # running: pins the finished prefix at trial 0
    for width in range(2, 40):               # finished trials behind it, indexed as they finish
        study.tell(queued(study, width), 0.5)
    later = queued(study, 1)
    assert twins.twin_of(later).number == first.number  # the earlier running trial trains it
    assert twins.twin_of(first) is None                 # and does not yield to the later one
    late = queued(study, 30)                 # a twin among the trials finished behind the running one
    assert twins.twin_of(late).params == {"width": 30}
    study.tell(first, 0.9)                   # finishes after it was seen unfinished
    assert twins.twin_of(later).number == first.number
    assert twins.twin_of(later).state == TrialState.COMPLETE
    assert twins.twin_of(queued(study, 77)) is None
    again = optuna.load_study(study_name=study.study_name, storage=storage)  # another process's view: indexed anew
    assert twins.twin_of(queued(again, 30)).params == {"width": 30}


def test_a_report_reads_the_study_only_while_an_open_trial_may_still_turn_into_a_twin(monkeypatch):
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize")
    reads = []
    real = study.get_trials
    monkeypatch.setattr(study, "get_trials", lambda *a, **k: (reads.append(1), real(*a, **k))[1])
    for width in range(10):
        study.tell(queued(study, width), 0.5)
    study.enqueue_trial({"width": 5})
    starting = study.ask()                   # created first, its parameters not suggested yet
    mine = queued(study, 42)
    assert twins.twin_of(mine) is None and twins.twin_of(mine) is None
    assert len(reads) == 2                   # each report looks again while the earlier trial may turn
    starting.suggest_int("width", 1, 100)    # it turns out another network
    assert twins.twin_of(mine) is None
    reads.clear()
    for _ in range(5):
        assert twins.twin_of(mine) is None
    assert reads == []                       # from here on a report reads nothing, however large the study
    later = queued(study, 42)                # a twin created later yields to ours at its first check
    assert twins.twin_of(later).number == mine.number
    reads.clear()
    assert twins.twin_of(mine) is None and reads == []


def test_an_earlier_trial_that_turns_into_a_twin_while_ours_trains_is_found_at_the_next_report():
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize")
    study.enqueue_trial({"width": 42})
    earlier = study.ask()                    # queued and started, its parameters not suggested yet
    mine = queued(study, 42)
    assert twins.twin_of(mine) is None
    earlier.suggest_int("width", 1, 100)
    assert twins.twin_of(mine).number == earlier.number


def test_a_later_twin_that_finishes_before_it_sees_ours_is_still_found():
    # the later trial's last report came just before ours was created; it then finishes as trained
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize")
    mine = queued(study, 42)
    later = queued(study, 42)
    assert twins.twin_of(mine) is None     # the later one is not ours to yield to while it runs
    study.tell(later, 0.9)
    assert twins.twin_of(mine).number == later.number


def test_a_twin_that_trained_nothing_is_not_a_twin():
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize")
    skipped = queued(study, 5)
    skipped.set_user_attr("reason", "over budget: 1.0 MMAC > 0.5")
    study.tell(skipped, state=TrialState.PRUNED)
    assert twins.twin_of(queued(study, 5)) is None


@pytest.mark.parametrize("when", ["report", "tell"])
def test_a_worker_whose_trial_another_judged_lost_says_so_and_goes_on(when, caplog):
    # another worker fails this worker's running trial (its heartbeat came late) and queues it again; this worker
    # then finds its next report refused, or, its objective done, Optuna's tell refused: it used to end in a traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, direction="maximize")
    other = optuna.load_study(study_name=study.study_name, storage=storage)

    def objective(trial):
        trial.suggest_int("width", 1, 1000)
        studies.claim(trial, "my-run")
        if trial.number == 0:
            other.tell(0, state=TrialState.FAIL)
            workers.RETRY(other, other.get_trials(deepcopy=False)[0])
            if when == "report":
                trial.report(0.5, 1)
        return 0.5

    assert studies.search(outcome_of_run("my-run"), 0, study, objective, 3) is False
    assert "trial 0 was judged lost by another worker while this one still trained it" in caplog.text
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    assert trials[1].params == trials[0].params  # its retry ran here
    assert workers.remaining_trials(study, 3, "my-run") == 0


def test_an_error_of_the_objective_itself_still_ends_the_search():
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize")

    def objective(trial):
        studies.claim(trial, "my-run")
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        studies.search(outcome_of_run("my-run"), 0, study, objective, 2)


def test_a_worker_waits_for_another_that_still_adds_trials_or_may_be_restarted():
    # between two of its trials a worker trains nothing, yet its next trial may change the choice: the load test
    # (benchmarks/workers.py) saw final stages start while other workers still had trials to add
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize")
    searched = outcome_of_run("my-run", study)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        def say(active, pid=other.pid, run="other-run"):
            study.set_user_attr(workers.SEARCHING + run, {"worker": f"{socket.gethostname()}:{pid}",
                                                          "active": active, "alive_at": time.time()})
        say(True)
        say(True, os.getpid(), "my-run")  # this worker's own flag is never waited for
        done = threading.Event()
        waiter = threading.Thread(target=lambda: (workers.wait_for_others(searched, 0.1), done.set()))
        waiter.start()
        assert not done.wait(1.5), "the final stage went ahead while another worker was still searching"
        say(False)  # that worker's search ended
        assert done.wait(10)
        waiter.join()
        say(True)
        other.kill()
        other.wait()
        done.clear()
        waiter = threading.Thread(target=lambda: (workers.wait_for_others(searched, 0.1), done.set()))
        waiter.start()
        assert not done.wait(1.5), "a worker killed a moment ago was not given the time to be started again"
        study.set_user_attr(workers.SEARCHING + "other-run", {"worker": f"{socket.gethostname()}:{other.pid}",
                                                              "active": True, "alive_at": time.time() - 3600})
        assert done.wait(10), "a worker that died long ago and never came back was waited for"
        waiter.join()
    finally:
        other.kill()


def test_a_retried_trial_taken_by_a_live_worker_is_not_failed_for_its_predecessors_dead_worker():
    # the load test on PostgreSQL: a worker took a retried trial from the queue and, before it claimed it, another
    # worker saw the inherited (dead) worker and failed it; the live worker then crashed on its next write
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lost = study.ask()
    lost.suggest_int("width", 1, 100)
    studies.claim(lost, "run-a")
    lost.set_user_attr("worker", f"{socket.gethostname()}:{gone.pid}")  # its worker was killed
    assert workers.requeue_lost_trials(study) == 1
    retry = study.ask()  # a live worker takes the retry, which still carries the dead worker, unclaimed
    assert retry.params == lost.params and retry.user_attrs["worker"].endswith(f":{gone.pid}")
    assert workers.requeue_lost_trials(study) == 0
    assert study.get_trials(deepcopy=False)[retry.number].state == TrialState.RUNNING
    studies.claim(retry, "run-b")  # once claimed, it is judged by its own worker (alive: this process)
    assert workers.requeue_lost_trials(study) == 0


def test_another_hosts_liveness_never_compares_its_clock_with_ours(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(workers.time, "monotonic", lambda: clock[0])
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, direction="maximize", study_name="skew")
    # a searching worker on another host whose clock is an hour ahead, killed: its stamp never changes again
    study.set_user_attr(workers.SEARCHING + "far", {"worker": "farhost:1", "active": True,
                                                    "alive_at": time.time() + 3600})
    assert workers.searching_others(study, "mine", 120) == ["far"]
    clock[0] += 60
    assert workers.searching_others(study, "mine", 120) == ["far"]
    clock[0] += 61  # silent for the whole patience, as seen here: not waited for (it used to be an hour)
    assert workers.searching_others(study, "mine", 120) == []

    # a final-stage claim on another host whose clock is an hour behind, beating: alive, however far behind
    claim = workers.FinalStageClaim(storage, "skew", "key", "mine")
    held = claim.study.ask()
    held.set_user_attr("worker", "behindhost:2")
    for beat in range(4):
        held.set_user_attr("alive_at", time.time() - 3600 + beat * 30)
        assert claim._alive(claim.study.get_trials(deepcopy=False)[held.number])
        clock[0] += workers.GRACE_SECONDS - 1
    clock[0] += 2  # no beat for longer than the grace: dead, taken over
    assert not claim._alive(claim.study.get_trials(deepcopy=False)[held.number])
