"""A sampler whose draws for a trial are a function of the study's seed and the trial's position, so a search stopped
and resumed (or a worker lost and its trial queued again) draws what an uninterrupted search draws."""
import hashlib

import optuna

from mnist_optuna.training import derive_seed
from mnist_optuna.workers import lost_numbers


def position(study, trial):
    """The trial's place among the study's trials that count: those created before it, less the ones lost to a stop
    or a dead worker (their retries take their places, with their parameters)."""
    trials = study.get_trials(deepcopy=False)
    lost = lost_numbers(trials)
    return sum(1 for other in trials if other.number < trial.number and other.number not in lost)


class PositionSeeded(optuna.samplers.BaseSampler):
    """Optuna's own sampler (`make(seed)`, e.g. a TPESampler), made anew before each trial with a seed derived from
    the study's seed and the trial's position (each parameter drawn alone from a stream of its position and name). A
    seeded sampler alone draws from one random stream that restarts at
    its seed in every new process: after a stop, the resumed search drew the first trials' values again and trained
    other networks than an uninterrupted one. Now the stream of each trial depends only on where it stands.
    (Optuna's HyperbandPruner assigns a trial's bracket, and the trials the sampler sees, by trial number; with more
    than one bracket a lost trial's retry can still change them.)"""

    def __init__(self, seed, make):
        self.seed, self.make = seed, make
        self.inner, self.position = make(seed), 0

    def before_trial(self, study, trial):
        self.position = position(study, trial)
        self.inner = self.make(derive_seed(self.seed, self.position))
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        # each parameter from a stream of its own: a lost trial's retry, whose parameters drawn before the stop are
        # fixed and draw nothing, draws the rest as the lost trial would have
        name = int(hashlib.sha256(param_name.encode()).hexdigest()[:8], 16)
        sampler = self.make(derive_seed(self.seed, self.position, name))
        return sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self):
        self.inner.reseed_rng()
