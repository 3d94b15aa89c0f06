"""The searched skeleton (depth and pooling) and the multi-objective search: the accuracy-vs-MMAC front."""
import json
import re

import optuna
import pandas as pd
import pytest
import torch

from conftest import TINY, load_script
from errors import UserError
from mnist_optuna import studies
from mnist_optuna.outcome import Outcome
from mnist_optuna.storages import JOURNAL_NAME, open_study

pytestmark = pytest.mark.timeout(600)

# a searched skeleton small enough for seconds per trial: 1-4 blocks, at most 2 pools, 2-8 base filters
SEARCHED = ["--skeleton", "searched", "--conv-depth", "1", "4", "--max-pools", "2", "--conv-filters", "2", "8", "2",
            "--kernel-sizes", "3", "--fc-width", "16", "32", "16"]
# study seed 1: its six draws leave a front of three networks, so the pick by budget below chooses among several;
# with the plots (a front's own plot among them)
FRONT = [*(arg for arg in TINY if arg != "--no-plots"), *SEARCHED, "--objectives", "accuracy", "mmac", "--seeds", "1",
         "--n-trials", "6", "--n-startup-trials", "6", "--promote", "0"]


def test_a_block_the_network_lacks_has_no_parameters():
    script = load_script("MNIST-optuna.py")
    args = script.build_parser().parse_args(["--skeleton", "searched", "--conv-depth", "2", "5", "--max-pools", "2"])
    study = optuna.create_study()
    for depth in (2, 5, 3):
        # pools after blocks 1 and 2 spend the two allowed: no later block may pool, or even ask
        study.enqueue_trial({"conv_blocks": depth, "conv1_pool": True, "conv2_pool": True})
        trial = study.ask()
        model = script.suggest_model(trial, args)
        assert len(model["conv"]) == depth
        blocks = {int(m.group(1)) for m in (re.match(r"conv(\d+)_", name) for name in trial.params) if m}
        assert blocks == set(range(1, depth + 1)), trial.params
        assert [b["pool"] for b in model["conv"]] == [True, True] + [False] * (depth - 2)
        assert not any(f"conv{i}_pool" in trial.params for i in range(3, depth + 1))
        # each pool before a block doubles (FILTER_GROWTH) its base filter count
        for i, block in enumerate(model["conv"], start=1):
            assert block["channels"] == trial.params[f"conv{i}_base_filters"] * 2 ** min(i - 1, 2)
        study.tell(trial, 0.5)


def study_of(points, objectives):
    """An in-memory study with one complete trial per (accuracy, mmac) point."""
    study = optuna.create_study(study_name="s", directions=["maximize", "minimize"][:len(objectives)])
    for accuracy, mmac in points:
        study.add_trial(optuna.trial.create_trial(values=[accuracy, mmac][:len(objectives)], params={},
                                                  distributions={}, user_attrs={"mmac": mmac, "study": "s"}))
    return study


def test_pick_mmac_takes_the_most_accurate_front_network_within_the_budget():
    points = [(0.90, 1.0), (0.95, 4.0), (0.93, 6.0), (0.96, 4.5), (0.97, 10.0), (0.97, 12.0)]
    study = study_of(points, ["accuracy", "mmac"])

    def outcome(study, objectives, pick=None):
        return Outcome(None, str, objectives=objectives, pick_mmac=pick, studies=[(0, study)])

    def chosen(pick):
        ranked, _ = studies.rank(outcome(study, ["accuracy", "mmac"], pick))
        return ranked[0][1].number if ranked else None

    _, front = studies.rank(outcome(study, ["accuracy", "mmac"]))
    assert {t.number for _, t in front} == {t.number for t in study.best_trials} == {0, 1, 3, 4}
    assert [t.number for _, t in front] == [0, 1, 3, 4]  # cheapest first
    assert chosen(None) == 4
    assert chosen(5) == 3 and chosen(4.4) == 1 and chosen(1) == 0
    assert chosen(0.5) is None
    # one objective: every complete trial within the budget competes, not only a front
    ranked, none = studies.rank(outcome(study_of(points, ["accuracy"]), ["accuracy"], 7))
    assert none is None and [t.number for _, t in ranked] == [3, 1, 2, 0]


def printed_front(output):
    """(trial numbers, MMACs) of the front block a run printed."""
    block = output.split("==== Pareto front")[1].split("\n\n")[0]
    rows = re.findall(r"^\s+[\d.]+ %\s+([\d.]+)\s+\S+\s+(\d+)\s+conv", block, flags=re.M)
    return [int(number) for _, number in rows], [float(mmac) for mmac, _ in rows]


def test_the_front_is_optunas_and_pick_mmac_retrains_within_budget(run_here, tmp_path):
    out = tmp_path / "front"
    result = run_here("MNIST-optuna.py", *FRONT, "--out-dir", out)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="mnist-cnn-seed1", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / JOURNAL_NAME))))
    numbers, mmacs = printed_front(result.stdout)
    assert sorted(numbers) == sorted(t.number for t in study.best_trials) and len(numbers) >= 2
    assert mmacs == sorted(mmacs)
    table = pd.read_csv(out / "trials.csv")
    assert {"values_val_accuracy", "values_mmac"} <= set(table.columns)
    assert (out / "plots" / "pareto_front.png").stat().st_size > 0 and "test accuracy:" in result.stdout
    most_accurate = max(study.best_trials, key=lambda t: (t.values[0], -t.values[1]))
    assert json.loads((out / "best_params.json").read_text())["trial"] == most_accurate.number

    # the budget of the front's second most expensive network: the most accurate one within it, never the one an
    # unbounded pick took (on an accuracy-vs-MACs front the most expensive network is the most accurate)
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    chosen = front[-2]
    assert chosen.number != most_accurate.number
    budget = chosen.user_attrs["mmac"]
    again = run_here("MNIST-optuna.py", *FRONT, "--retrain-only", "--pick-mmac", budget, "--out-dir", out,
                       "--no-plots")
    assert again.returncode == 0, again.stderr
    assert f"within {budget:g} MMAC" in again.stdout and "test accuracy:" in again.stdout
    assert json.loads((out / "best_params.json").read_text())["trial"] == chosen.number
    assert json.loads((out / "summary.json").read_text())["pick_mmac"] == budget
    # and model.pt holds that network, not the most accurate one of the whole front
    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["config"] == chosen.user_attrs["model"] and payload["meta"]["trial"] == chosen.number


def test_a_study_keeps_its_objectives_and_reads_settings_it_predates():
    storage = optuna.storages.InMemoryStorage()
    settings = {"objectives": ["accuracy"], "max_pools": 2, "epochs": 1}

    def reopen(search, objectives=("accuracy",), resume_anyway=False):
        return open_study("s", storage, None, None, search, resume_anyway, objectives=objectives)

    study = reopen(settings)
    # a study begun before a setting existed is read as searched with that setting's old behaviour ...
    study.set_user_attr("search", {k: v for k, v in settings.items() if k != "objectives"})
    reopen(settings)
    # ... and that old behaviour is 3 pools at most: this search's 2 differ, so it is refused
    study.set_user_attr("search", {k: v for k, v in settings.items() if k != "max_pools"})
    with pytest.raises(UserError, match="--max-pools"):
        reopen(settings)
    # other objectives are another study: refused even with --resume-anyway
    for anyway in (False, True):
        with pytest.raises(UserError, match="--objectives"):
            reopen({**settings, "objectives": ["accuracy", "mmac"]}, ("accuracy", "mmac"), anyway)


@pytest.mark.parametrize("flags, says", [
    (["--objectives", "mmac", "accuracy"], "--objectives"),
    (["--objectives", "accuracy", "accuracy"], "--objectives"),
    (["--objectives", "accuracy", "speed"], "--objectives"),
    (["--pick-mmac", "0"], "--pick-mmac"),
    (["--max-pools", "5"], "--max-pools"),
    (["--skeleton", "deep"], "--skeleton"),
    (["--conv-depth", "4", "2"], "--conv-depth"),
])
def test_bad_front_flags_are_refused_before_any_work(capsys, flags, says):
    # in-process (the one-line, exit-2 form of these errors is cli.run's, tested end to end elsewhere)
    script = load_script("MNIST-optuna.py")
    with pytest.raises((SystemExit, UserError)) as refused:
        script.validate(script.build_parser().parse_with_preset(["--quick", *flags], "--quick", script.QUICK))
    message = str(refused.value) if refused.type is UserError else capsys.readouterr().err
    assert says in message and (refused.type is UserError or refused.value.code == 2)
