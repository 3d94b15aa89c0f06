"""A run's search as its ending takes it: one object, built by a script's loop over its studies and read by the
wait for the other workers, the ranking, the summary and the final stage."""
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Outcome:
    """What a search leaves for its ending. `studies`: (key, study) of each study searched, in order; a key is what
    tells a script's studies apart (a seed), `label` what it is called in the summary ("seed 0") and `key_name` in
    best_params.json and the checkpoints' metadata. The budgets (`pick_mmac`, `max_mmac`: a budget lowered since the
    search rules trials out too) limit the ranking; `extra` goes into summary.json, `meta` into the checkpoints."""
    run: object                    # studies.Run: device, data, run folder, storage, tracker
    describe_trial: Callable       # a trial in a few words: its network, or its training recipe
    label: str = "seed"
    key_name: str = "study_seed"
    objectives: tuple = ("accuracy",)
    pick_mmac: float = None
    max_mmac: float = None
    extra: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    studies: list = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    interrupted: bool = False      # the search was stopped (Ctrl-C, SIGTERM): the ending says how to resume
    keyed_lines: bool = True       # trial lines begin with their study's key (a run of several studies)

    def add(self, key, study):
        self.studies.append((key, study))
        return study

    def trial_label(self, key):
        """What begins the trial lines of the study of `key`: 'seed 0  ', or nothing."""
        return f"{self.label} {key}  " if self.keyed_lines else ""

    def seconds(self):
        return time.perf_counter() - self.started
