"""The compute budget, the choice at the final fidelity, and --evaluate of several checkpoints."""
import json
import re

import optuna
import pytest
import torch

from conftest import DATA_DIR, TINY, TINY_CNN, assert_one_line_error, frozen, run_in_process
from data import load_search_data, promotion_training_set
from mnist_optuna import final, promotion
from mnist_optuna.checkpoints import load_checkpoint
from mnist_optuna.evaluation import load_test
from mnist_optuna.training import accuracy_on, predict_logits, seed_everything, train
from models import build_model

BUDGET = ["--kernel-sizes", "3", "5", "--max-mmac", "0.2"]


def journal_trials(out_dir, name="mnist-cnn-seed0"):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out_dir / "study.journal")))
    return optuna.load_study(study_name=name, storage=storage).trials


def test_a_network_over_budget_is_never_trained(run_here, tmp_path):
    out = tmp_path / "budget"
    result = run_here("MNIST-optuna.py", *TINY, *TINY_CNN, *BUDGET, "--seeds", "0", "--n-trials", "4",
                        "--n-startup-trials", "2", "--no-final", "--no-plots", "--out-dir", out)
    assert result.returncode == 0, result.stderr
    trials = journal_trials(out)
    over = [t for t in trials if t.user_attrs["mmac"] > 0.2]
    within = [t for t in trials if t.user_attrs["mmac"] <= 0.2]
    assert over, "the space should have networks over this budget"
    for trial in over:  # pruned before the first epoch, with the reason and Optuna's constraint
        assert trial.state == optuna.trial.TrialState.PRUNED and not trial.intermediate_values
        assert trial.user_attrs["reason"].startswith("over budget")
        assert trial.constraints["mmac_over_budget"] > 0
    # the budget's prunes do not count: the run still trained --n-trials networks
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in within) == 4
    assert all(t.intermediate_values for t in within)
    assert re.search(r"PRUNED .*\(\d+\.\d MMAC\).*\[over budget", result.stdout)
    frame = (out / "trials.csv").read_text().splitlines()[0]
    assert "user_attrs_mmac" in frame


def test_a_budget_below_the_smallest_network_is_refused(capsys, tmp_path):
    result = run_in_process(capsys, "MNIST-optuna.py", *TINY, *TINY_CNN, "--max-mmac", "0.001",
                            "--out-dir", tmp_path / "x")
    assert "--max-mmac" in assert_one_line_error(result)



def test_promotion_trains_on_every_image_outside_validation():
    data = load_search_data(DATA_DIR, torch.device("cpu"), val_size=1000, train_subset=1000)
    x, y = promotion_training_set(data)
    assert len(y) == len(data.all_y) - 1000 > len(data.train_y)
    # no validation image among them (compared as pixels)
    val = {bytes(image.numpy().tobytes()) for image in data.val_x[:200]}
    assert not any(bytes(image.numpy().tobytes()) in val for image in x.contiguous())


def test_promotion_ranks_by_validation_after_the_final_training(tmp_path):
    # the search ranked a 9-feature network first and a real CNN last; trained like the final model, the
    # CNN wins on validation, and the promotion must say so whatever the search said
    starved = {"conv": [{"channels": 1, "kernel": 1, "pool": True}, {"channels": 1, "kernel": 1, "pool": True},
                        {"channels": 1, "kernel": 1, "pool": True}], "fc": [], "dropout": 0.0}
    cnn = {"conv": [{"channels": 8, "kernel": 3, "pool": True}, {"channels": 16, "kernel": 3, "pool": True}],
           "fc": [], "dropout": 0.0}
    data = load_search_data(DATA_DIR, torch.device("cpu"), val_size=1000, train_subset=1000)
    args = final.FinalConfig(epochs=2, subset=4000)
    candidates = [frozen(starved, 0.99, 1), frozen(cnn, 0.50, 2)]
    promoted = promotion.promote(candidates, data, args, tmp_path)
    assert promoted["ranking"][0] is candidates[1]
    rows = promoted["record"]["rows"]
    assert rows[0]["promoted_val"] > rows[1]["promoted_val"] and promoted["record"]["spearman"] == -1.0
    assert promoted["record"]["train_images"] == 4000 and promoted["record"]["epochs"] == 2

    # each score is what that training gives on the validation split (trained again here, by hand)
    x, y = promotion_training_set(data, 4000)
    seed_everything(2)
    model = build_model(cnn)
    train(model, x, y, promotion.final_recipe(candidates[1], args), 2)
    assert accuracy_on(model, data.val_x, data.val_y) == pytest.approx(rows[0]["promoted_val"], abs=1e-9)

    # a rerun in the same folder takes the scores from promotion.json instead of training again
    cached = json.loads((tmp_path / "promotion.json").read_text())
    for entry in cached.values():
        entry["val_accuracy"] = 1.0 - entry["val_accuracy"]  # a marker only a cached read can return
    (tmp_path / "promotion.json").write_text(json.dumps(cached))
    again = promotion.promote(candidates, data, args, tmp_path)
    assert again["ranking"][0] is candidates[0]


def test_the_promoted_choice_is_the_retrained_model_and_evaluate_averages_the_ensemble(run_here, tmp_path):
    out = tmp_path / "run"
    result = run_here("MNIST-optuna.py", *TINY, *TINY_CNN, "--seeds", "0", "1", "--n-trials", "2",
                        "--promote", "3", "--ensemble", "2", "--no-plots", "--out-dir", out)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["promotion"]["rows"]
    # the most accurate first, unless others are within noise of it: then the cheapest of those (the stated rule)
    tied = [r for r in rows if r["promoted_val"] == max(x["promoted_val"] for x in rows)]
    tied += [r for r in rows for c in summary["promotion"]["against_most_accurate"]
             if (c["study"], c["trial"]) == (r["study"], r["trial"]) and not c["beyond_noise"]]
    assert len(rows) == 3 and rows[0] is min(tied, key=lambda r: (r["mmac"], -r["promoted_val"]))
    assert [r["promoted_val"] for r in rows[1:]] == sorted((r["promoted_val"] for r in rows[1:]), reverse=True)
    assert "chosen by the rule: " in result.stdout
    assert "rank correlation of search and promoted validation (Spearman)" in result.stdout
    chosen = rows[0]
    meta = load_checkpoint(out / "model.pt")[1]["meta"]
    assert (meta["study"], meta["trial"]) == (chosen["study"], chosen["trial"])
    best = json.loads((out / "best_params.json").read_text())
    assert best["trial"] == chosen["trial"] and best["promoted_val"] == chosen["promoted_val"]
    # the ensemble's members follow the promoted ranking
    second = load_checkpoint(out / "ensemble-1.pt")[1]["meta"]
    assert (second["study"], second["trial"]) == (rows[1]["study"], rows[1]["trial"])
    # each retrained network with its own study's seed (not the search best's), and the summary's "best"
    # is the chosen network
    seed = int(chosen["study"].removeprefix("mnist-cnn-seed"))
    assert meta["study_seed"] == best["study_seed"] == summary["best"]["seed"] == seed
    assert summary["best"]["trial"] == chosen["trial"]
    assert second["study"] == f"mnist-cnn-seed{second['study_seed']}"

    # --evaluate with several checkpoints: each one's test accuracy, then that of their averaged softmax
    paths = [out / "model.pt", out / "ensemble-1.pt"]
    evaluated = run_here("MNIST-optuna.py", "--evaluate", *paths)
    assert evaluated.returncode == 0, evaluated.stderr

    probabilities, accuracies = 0, []
    for path in paths:
        model, payload = load_checkpoint(path)
        test_x, test_y = load_test(DATA_DIR, torch.device("cpu"), payload["meta"]["mean"], payload["meta"]["std"])
        logits = predict_logits(model, test_x)
        accuracies.append((logits.argmax(1) == test_y).float().mean().item())
        probabilities = probabilities + torch.softmax(logits, 1)
    ensemble = (probabilities.argmax(1) == test_y).float().mean().item()
    for path, accuracy in zip(paths, accuracies):
        line = rf"{re.escape(str(path))}: test accuracy: {100 * accuracy:.2f} %.*MMAC/image: \d"
        assert re.search(line, evaluated.stdout)
    assert f"ensemble test accuracy: {100 * ensemble:.2f} %" in evaluated.stdout


def test_a_promotion_score_in_the_shared_store_is_named_by_its_training_and_its_validation_split():
    from types import SimpleNamespace

    import torch

    from mnist_optuna.promotion import split_digest, store_score_id

    def name(key, data, y):
        return store_score_id(key, split_digest(data, y))

    labels = torch.arange(100) % 10
    split = SimpleNamespace(val_y=labels[:40])
    other_split = SimpleNamespace(val_y=labels[:40].flip(0))  # the same labels, another split's order
    train = labels[40:]
    assert name('["a"]', split, train) == name('["a"]', SimpleNamespace(val_y=labels[:40]), train)
    assert name('["a"]', split, train) != name('["b"]', split, train)
    assert name('["a"]', split, train) != name('["a"]', other_split, train)
    assert name('["a"]', split, train) != name('["a"]', split, train.flip(0))
