"""What workers sharing a study agree on: who a worker is, why a trial trained nothing, which trials count
towards --n-trials, which were lost with their worker (queued again: by heartbeat on a database, by process on a
journal), waiting for each other before the final stage, and the claim that lets one of them run that stage."""
import datetime
import errno
import logging
import os
import socket
import threading
import time
import warnings

import optuna
from optuna.trial import TrialState

# the retry callback is marked experimental; it is Optuna's own mechanism and the one we want
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
log = logging.getLogger(__name__)

# the reasons of trials that ended without training (studies.run_trial); they do not count towards --n-trials
OVER_BUDGET = "over budget"   # the network needs more MACs than --max-mmac allows
TWIN = "same configuration as trial"  # an earlier trial of the study trained or is training these parameters
NOT_TRAINED = (OVER_BUDGET, TWIN)
INTERRUPTED = "interrupted"  # the reason of a trial stopped by Ctrl-C or SIGTERM: a rerun queues it again

HEARTBEAT_SECONDS = 30     # an RDB worker silent for GRACE_SECONDS is presumed dead
GRACE_SECONDS = 90
MAX_RETRY = 2              # a trial whose worker died is re-run this many times at most
CLAIM_SECONDS = 10         # a trial still unclaimed this long after it started lost its worker before the claim
RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


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


def _claimed(trial):
    """True once the trial's worker claimed it (studies.claim). A retried trial starts with its predecessor's
    attributes, the dead worker included, until the live worker that took it from the queue claims it; a trial
    of a study from before claims were recorded counts as claimed."""
    return trial.user_attrs.get("claimed", trial.number) == trial.number


def _claim_overdue(study, trial):
    """For a RUNNING trial no worker has claimed yet (none named, or a retry still naming its predecessor's dead
    one): None while its claim may still come, True once it is overdue (its worker died between creating the trial
    and claiming it, milliseconds apart), False for a claimed trial. Overdue means CLAIM_SECONDS since it started by
    this host's clock or, whichever comes first, since this process first saw it unclaimed."""
    if trial.user_attrs.get("worker") and _claimed(trial):
        return False
    age = time.time() - trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    seen = silent_seconds((study.study_name, "unclaimed", trial.number), trial.number)
    return True if max(age, seen) >= CLAIM_SECONDS else None


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
        if trial.state == TrialState.RUNNING and (_claim_overdue(study, trial) or
                                                  (_claimed(trial) and _worker_dead(trial))):
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


def wait_for_claims(study, poll_seconds=0.2):
    """Before a worker counts the study's trials: wait until every RUNNING trial is claimed or its claim overdue
    (at most CLAIM_SECONDS), so that a trial created by a process killed before its claim is queued again in its
    place instead of pushing this worker's trials one position further (other draws than an uninterrupted run)."""
    while any(_claim_overdue(study, t) is None for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
        time.sleep(poll_seconds)


class LiveTrial:
    """The objective, wrapped to remember the trial this worker runs: so that when another worker judged that trial
    lost while it still ran (a heartbeat that came too late: a stalled or suspended machine, a slow database) and
    queued it again, the worker says so in a line and goes on, instead of ending in the traceback of the report,
    attribute or tell that Optuna then refuses."""

    def __init__(self, objective):
        self.objective, self.trial, self.ended, self.refused = objective, None, False, False

    def __call__(self, trial):
        self.trial, self.ended, self.refused = trial, False, False
        try:
            result = self.objective(trial)
        except optuna.TrialPruned:
            self.ended = True
            raise
        except optuna.exceptions.UpdateFinishedTrialError:
            self.refused = True  # this worker never finishes its own trial inside the objective: another one did
            raise
        self.ended = True
        return result

    def taken_over(self, study):
        """Whether the last trial was finished by another worker: a write refused, or an objective that ended well
        yet the trial is stored as failed (Optuna's tell then refuses)."""
        if self.refused:
            return True
        if self.trial is None or not self.ended:
            return False
        own = (self.trial.number, self.trial.datetime_start)
        return any((t.number, t.datetime_start) == own and t.state == TrialState.FAIL
                   for t in study.get_trials(deepcopy=False))


def lost_numbers(trials):
    """Numbers of the trials that were queued again (interrupted, or their worker died): their retries count."""
    return {number for trial in trials for number in RETRY.retry_history(trial)}



def counted(trial, lost=frozenset()):
    """Trials that count towards --n-trials: finished, except those lost to an interrupt or a dead worker
    (numbers in `lost`: their retries count instead), those that trained nothing (NOT_TRAINED), and
    failures of an earlier process (a configuration error since fixed): a rerun tries them again."""
    reason = str(trial.user_attrs.get("reason") or "")
    if trial.state in (TrialState.PRUNED, TrialState.COMPLETE):
        return not reason.startswith(NOT_TRAINED)
    return (trial.state == TrialState.FAIL and reason != INTERRUPTED and trial.number not in lost
            and trial.user_attrs.get("worker") == worker_id())


def remaining_trials(study, n_trials, run_id):
    """How many trials this run folder still owes the study: --n-trials less those it already finished.

    A fresh run folder (new run id) adds n_trials trials to the study, so several workers add up;
    rerunning in the same folder resumes and only completes what is left.
    """
    trials = study.get_trials(deepcopy=False)
    lost = lost_numbers(trials)
    done = sum(1 for t in trials if t.user_attrs.get("run") == run_id and counted(t, lost))
    return max(0, n_trials - done)


_SEEN = {}  # what: (the value last seen, when this process first saw it, by its own monotonic clock)


def silent_seconds(what, value):
    """Seconds, by this process's clock, since another worker's heartbeat `value` (anything it advances) last changed,
    as observed here; 0 at the first sight. Liveness never compares another host's clock with ours: a worker whose
    clock is an hour ahead would look alive for an hour after its death, one an hour behind dead while it runs."""
    now = time.monotonic()
    last = _SEEN.get(what)
    if last is None or last[0] != value:
        _SEEN[what] = (value, now)
        return 0.0
    return now - last[1]


def silent_for(what, worker, stamp):
    """Seconds since `stamp` (a time.time() the worker named `worker` wrote): by the clock itself when that worker
    runs on this host (one clock), else as observed here (silent_seconds)."""
    if str(worker).rpartition(":")[0] == socket.gethostname() and isinstance(stamp, (int, float)):
        return time.time() - stamp
    return silent_seconds(what, stamp)


SEARCHING = "searching:"  # + run id: a study user attribute saying whether that run folder's worker still adds trials


def say_searching(study, run_id, active):
    """Tell the workers sharing the study whether this run folder's worker still adds trials (active), and that
    it is alive; called when its search starts, after each of its trials and when it stops."""
    study.set_user_attr(SEARCHING + run_id, {"worker": worker_id(), "active": active, "alive_at": time.time()})


def searching_others(study, run_id, patience_seconds):
    """The other run folders whose worker still adds trials to the study: its process runs on this host, or
    (another host) it said so within `patience_seconds`. A worker on this host that died while searching is
    waited for GRACE_SECONDS after it last said so, the time a restart of the same command (a supervisor, a
    requeued job) takes to resume its run folder and say so again."""
    others = []
    for key, said in study.user_attrs.items():
        if not key.startswith(SEARCHING) or key == SEARCHING + str(run_id) or not said.get("active"):
            continue
        host, _, pid = str(said.get("worker", "")).rpartition(":")
        silent = silent_for((study.study_name, key), said.get("worker"), said.get("alive_at"))
        here = host == socket.gethostname() and pid.isdigit()
        if (here and (_process_alive(int(pid)) or silent < GRACE_SECONDS)) or (not here and silent < patience_seconds):
            others.append(key[len(SEARCHING):])
    return others


def wait_for_others(outcome, poll_seconds=1):
    """Wait until no other worker is training a trial of the outcome's studies or still adding trials to them, so that every worker that reaches the end sees the same trials, makes the same choice and one
    of them runs the final stage (a worker between two of its trials trains nothing, yet its next trial may change
    the choice). A trial whose worker died is failed and queued again (RDB: no heartbeat; journal: its process on
    this host is gone) and stops the wait, as does a searching worker whose process is gone and that has not come
    back within the grace (searching_others); one that has run more than twice as long as the longest finished trial
    (plus the heartbeat grace), or a worker on another host silent that long, is not waited for (a journal cannot
    tell a dead worker on another host from a slow one)."""
    told = False
    while True:
        running, searching = [], []
        for _, study in outcome.studies:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # RDB heartbeats; does nothing for a journal
            requeue_lost_trials(study)
            trials = study.get_trials(deepcopy=False)
            longest = max((t.duration.total_seconds() for t in trials if t.duration), default=0)
            patience = datetime.timedelta(seconds=2 * longest + GRACE_SECONDS)
            # how long another host's trial has run is judged from when this process first saw it running, not from
            # its start time, which that host's clock wrote
            running += [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("worker") != worker_id()
                        and silent_for((study.study_name, "running", t.number), t.user_attrs.get("worker"),
                                       t.datetime_start.timestamp() if t.datetime_start else None)
                        < patience.total_seconds()]
            searching += searching_others(study, outcome.run.run_id, patience.total_seconds())
        if not running and not searching:
            return
        if not told:
            log.info(f"waiting for {len(running)} trial(s) and {len(set(searching))} searching worker(s) of others "
                     "to finish before the final stage")
            told = True
        time.sleep(poll_seconds)


class FinalStageClaim:
    """The final stage of a search runs once per study and choice, not once per worker that reaches the end.

    Claims are trials of a side study `<study>:final` (Optuna's storage, so every worker sees them), each with the
    choice it is for (`key`), its worker and a heartbeat. The lowest-numbered live claim for a key wins; a claim
    whose worker died (process gone on this host, or no heartbeat for GRACE_SECONDS) is taken over. A finished
    claim of another run folder is not run again: the others print where its results are. A rerun in the same
    folder goes ahead (its checkpoints make it cheap), and --retrain-only always does.
    """
    POLL_SECONDS = 1

    def __init__(self, storage, study_name, key, run_id):
        self.study = optuna.create_study(study_name=f"{study_name}:final", storage=storage, load_if_exists=True,
                                         direction="maximize")
        self.key, self.run_id, self.mine, self.beating = key, run_id, None, None

    def _claims(self):
        return [t for t in self.study.get_trials(deepcopy=False) if t.user_attrs.get("key") == self.key]

    def _alive(self, trial):
        return (trial.state == TrialState.RUNNING and not _worker_dead(trial)
                and silent_for((self.study.study_name, trial.number), trial.user_attrs.get("worker"),
                               trial.user_attrs.get("alive_at")) < GRACE_SECONDS)

    def acquire(self, on_wait=None):
        """None when this worker runs the final stage (the claim is held until release), else the finished claim of
        another run: its user attributes say where the results are. Waits while another live worker runs it."""
        waited = False
        while True:
            claims = self._claims()
            done = [t for t in claims if t.state == TrialState.COMPLETE]
            if done and done[-1].user_attrs.get("run") != self.run_id:
                return done[-1]
            live = [t for t in claims if self._alive(t)]
            if not live or live[0].user_attrs.get("run") == self.run_id:
                if self._take():
                    return None
                continue
            if not waited and on_wait:
                on_wait(live[0])
            waited = True
            time.sleep(self.POLL_SECONDS)

    def _take(self):
        trial = self.study.ask()
        attributes = {"key": self.key, "worker": worker_id(), "run": self.run_id, "alive_at": time.time()}
        for name, value in attributes.items():
            trial.set_user_attr(name, value)
        # a claim created just before ours may still be getting its attributes: give it a moment to show them
        time.sleep(0.5)
        live = [t for t in self._claims() if self._alive(t)]
        if live and live[0].number == trial.number:
            self.mine = trial
            self.beating = threading.Event()
            threading.Thread(target=self._beat, daemon=True).start()
            return True
        self.study.tell(trial, state=TrialState.FAIL)
        return False

    def _beat(self):
        while not self.beating.wait(HEARTBEAT_SECONDS):
            try:
                self.mine.set_user_attr("alive_at", time.time())
            except Exception:  # a storage hiccup; the next beat tries again
                pass

    def release(self, published=None):
        """Finished (published: where the results are) or, with None, given up so another worker takes over."""
        if self.mine is None:
            return
        self.beating.set()
        if published is None:
            self.study.tell(self.mine, state=TrialState.FAIL)
        else:
            self.mine.set_user_attr("published", published)
            self.study.tell(self.mine, 1.0)
        self.mine = None
