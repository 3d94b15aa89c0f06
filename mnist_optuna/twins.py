"""Twins: a trial whose parameters another trial of the study trained or is training (a resumed TPE start-up draw,
concurrent workers) is not trained again; it takes its twin's score, or is pruned. Cheap enough to check at every
report of a study of thousands of trials."""
import json
import weakref

import optuna
from optuna.trial import TrialState

from mnist_optuna.reporting import trial_accuracy
from mnist_optuna.workers import NOT_TRAINED, TWIN

_SETTLED = weakref.WeakKeyDictionary()  # Trial -> the parameters with which its twin check became final


_MISSING = object()


def twin_of(trial):
    """The earliest other trial of the study with the same parameters that was trained or is training.

    Called before a trial trains and at every report, so a report must not cost more as the study grows. A call
    reads the study's trials: the finished ones from this process's index (FinishedIndex; finished trials never
    change), the open ones anew. The answer can still change only while some open trial may turn into a twin: an
    earlier one whose parameters are not all suggested yet or that is queued, or a later twin that may finish
    before its next report sees this one. Once there is none it is final, and later reports read nothing (a later
    trial that becomes a twin after that sees this one at its next report and yields: the one created first
    trains).
    """
    if not isinstance(trial, optuna.trial.Trial):  # a FixedTrial has no study to compare with
        return None
    # a trial is known by number and start time together: an RDB can give two concurrent trials one number
    own, params = (trial.number, trial.datetime_start), trial.params
    key = _params_key(params)
    if _SETTLED.get(trial) == key:
        return None
    index = FinishedIndex.of(trial.study)
    unfinished = index.update(trial.study.get_trials(deepcopy=False))
    may_turn = False
    for other in [*index.by_params.get(key, ()), *unfinished]:
        if (other.number, other.datetime_start) == own or str(other.user_attrs.get("reason") or "").startswith(
                NOT_TRAINED):
            continue
        earlier, same = _created_before(other, own), other.params == params
        if same and other.state in TWIN_STATES and (earlier or other.state != TrialState.RUNNING):
            return other  # of two running twins, the one created first trains
        if not other.state.is_finished() and (earlier or same) and all(
                params.get(name, _MISSING) == value for name, value in other.params.items()):
            # still open with parameters short of or equal to ours: an earlier one may yet become our twin, a later
            # twin may finish before it sees us (at its last report)
            may_turn = True
    if not may_turn:
        _SETTLED[trial] = key
    return None


def _created_before(other, own):
    """Whether trial `other` was created before the trial known as `own` (number, start); a queued trial has no
    start yet, its number decides."""
    if other.number != own[0] or other.datetime_start is None or own[1] is None:
        return other.number < own[0]
    return other.datetime_start < own[1]


TWIN_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def _params_key(params):
    return json.dumps(params, sort_keys=True, default=str)


class FinishedIndex:
    """This process's index of a study's finished trials by parameters. A finished trial never changes, so each
    update looks only at the trials that were unfinished at the last one and at those added since (the list of a
    study's trials only grows, in the order they were created)."""
    _studies = weakref.WeakKeyDictionary()  # by Study object: gone with it

    def __init__(self):
        self.by_params, self.length, self.open = {}, 0, []

    @classmethod
    def of(cls, study):
        return cls._studies.setdefault(study, cls())

    def update(self, trials):
        """Index the trials that finished since the last update; return those not finished yet."""
        still_open = []
        for position in [*self.open, *range(self.length, len(trials))]:
            trial = trials[position]
            if trial.state.is_finished():
                self.by_params.setdefault(_params_key(trial.params), []).append(trial)
            else:
                still_open.append(position)
        self.open, self.length = still_open, len(trials)
        return [trials[position] for position in still_open]


class TwinFound(Exception):
    """A trial's configuration turned out, while it trained, to be trained by an earlier trial too."""

    def __init__(self, twin):
        super().__init__(f"trial {twin.number} trains the same configuration")
        self.twin = twin


def yield_to_twin(trial, twin, several):
    """Leave the configuration to its twin: take the twin's accuracy when it has one, else prune."""
    trial.set_user_attr("reason", f"{TWIN} {twin.number}; not trained again")
    if twin.state == TrialState.COMPLETE and not several:
        if twin.user_attrs.get("validation"):
            trial.set_user_attr("validation", twin.user_attrs["validation"])
        return trial_accuracy(twin)
    raise optuna.TrialPruned(f"the configuration of trial {twin.number}, which was pruned or is training")
