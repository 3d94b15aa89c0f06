"""A study's identity: the settings that define its trials (a script's search block, and what --backbone and the data
resolved to), recorded with the study when it begins and compared at every later start, so a rerun never silently
answers another question; studies from before the record are read from their trials."""
import json
import time

from optuna.trial import TrialState

from data import CANONICAL_FINGERPRINT
from errors import UserError
from mnist_optuna.rundir import json_default


def check_settings(study, name, search, resume_anyway=False):
    """Record `search` (the settings that define the study's trials) with the study, or compare it with the record
    of an earlier run: a difference is refused in one line unless --resume-anyway, and a difference in what the
    finished trials are of (FIXED) even then. A record that predates a setting's new name (RENAMED_SETTINGS), an
    added setting (ADDED_SETTINGS) or a retired one (RETIRED_SETTINGS) is read as it would be written now."""
    search = json.loads(json.dumps(search, default=json_default))
    before = study.user_attrs.get("search")
    if before is None:  # a study from before settings were recorded: what its trials agree on stands in
        before = settings_of_trials(study, search)
    if before is not None:
        before = {key: value for key, value in before.items() if key not in RETIRED_SETTINGS}
    for old_name, new_name in RENAMED_SETTINGS.items():
        # only where this run's settings have the new name and not the old (another script may still have the old)
        if before is not None and old_name in before and new_name not in before and new_name in search \
                and old_name not in search:
            before = {**before, new_name: before[old_name]}
            del before[old_name]
    if before is not None:  # a setting added after the study began had, then, the value below
        added = json.loads(json.dumps(ADDED_SETTINGS))
        before = {**{key: value for key, value in added.items() if key in search}, **before}
    differ = [key for key in sorted(set(before or {}) | set(search)) if before.get(key) != search.get(key)] \
        if before is not None else []
    fixed = [key for key in differ if key in FIXED]
    if fixed and study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        key = fixed[0]
        raise UserError(f"study {name} trains {_setting_text(key, before.get(key))}, this run asks for "
                        f"{_setting_text(key, search.get(key))}; not even --resume-anyway changes that (its finished "
                        "trials would answer for another network): pass a new --out-dir (or --study-prefix / "
                        "--study-name) for a new search")
    if differ and not resume_anyway:
        key = differ[0]
        raise UserError(f"study {name} was searched with {_setting_text(key, before.get(key))}, this run asks for "
                        f"{_setting_text(key, search.get(key), flag=False)}"
                        f"{f' (and {len(differ) - 1} more setting(s))' if len(differ) > 1 else ''}; pass a new "
                        "--out-dir (or --study-prefix / --study-name) for a new search, or --resume-anyway to "
                        "continue this one with the new settings")
    if study.user_attrs.get("search") != search:
        study.set_user_attr("search", search)
        # two workers that start together on a new study both write; the later write stands, and the worker
        # whose settings it is not learns it here (a moment later, once the other's write is visible)
        time.sleep(SETTLE_SECONDS)
        if study.user_attrs.get("search") != search and not resume_anyway:
            raise UserError(f"study {name} was just started by another worker with other settings; pass the same "
                            "settings as that worker, or a new --out-dir (or --study-prefix / --study-name)")


SETTLE_SECONDS = 0.5


# what a study's trials are of without being among their parameters: changing it would let its finished trials
# answer for another network (a twin takes their accuracy, the ranking lists them)
FIXED = {"network", "backbone"}


# how the settings that are not flags read in a message
DESCRIBED = {"network": "the network of --backbone", "backbone": "heads on the --backbone conv blocks",
             "training_data": "the training files with fingerprint"}


def _setting_text(key, value, flag=True):
    """How a setting reads in a refusal: `--lr 0.001` (or `0.001` with flag False) or the described value."""
    if key in DESCRIBED:
        return f"{DESCRIBED[key]} {_flag_text(value)}"
    return f"--{key.replace('_', '-')} {_flag_text(value)}" if flag else _flag_text(value)


def _flag_text(value, longest=80):
    if isinstance(value, list) and not any(isinstance(item, (dict, list)) for item in value):
        text = " ".join(map(str, value))
    else:
        text = "(not set)" if value is None else value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= longest else text[:longest - 3] + "..."


def settings_of_trials(study, search):
    """The settings of a study that recorded none (it predates the record), as far as its trials tell: each
    training setting every trial recorded alike, and the conv blocks of a head grid. None without such trials.
    A search whose trials each draw their own recipe (stage optim) tells nothing this way."""
    trials = [t for t in study.get_trials(deepcopy=False) if isinstance(t.user_attrs.get("train"), dict)]
    if not trials or search.get("network") is not None:
        return None
    recipes = [t.user_attrs["train"] for t in trials]
    told = {key: recipes[0][key] for key in recipes[0]
            if key in search and all(r.get(key) == recipes[0][key] for r in recipes)}
    if "backbone" in search and isinstance(trials[0].user_attrs.get("model"), dict):
        told["backbone"] = trials[0].user_attrs["model"].get("conv")
    return {**search, **json.loads(json.dumps(told))}


# settings that studies once recorded but that no longer define a search: a record's value of one is not compared
RETIRED_SETTINGS = {"renamed"}  # the head grid's table of renamed settings, once (wrongly) a flag
# settings renamed since studies recorded them: {old name: new name}
RENAMED_SETTINGS = {"dropout": "head_dropout"}  # the head grid's fixed dropout, a range in the other script


# settings added after studies existed, with the behaviour a study that does not record them was searched with
ADDED_SETTINGS = {"objectives": ["accuracy"], "skeleton": "fixed", "conv_depth": (2, 6), "max_pools": 3,
                  "training_data": CANONICAL_FINGERPRINT}


def search_settings(args, **resolved):
    """The settings that define a study's trials: the flags of the script's search block (cli.Settings), and what
    --backbone resolved to (its network, not its path)."""
    return {**{key: getattr(args, key) for key in args.search_keys}, **resolved}
