"""Beyond stage 1: the optimization-HP search, the ensemble, on-device augmentation, --evaluate."""
import json
import re

import optuna
import pytest
import torch

from conftest import (
    LONG,
    ROOT,
    SEARCH,
    TINY,
    TINY_CNN,
    assert_one_line_error,
    folder_files,
    load_script,
    run_in_process,
    run_script,
)
from data import random_affine
from mnist_optuna.reporting import trained

main = load_script("MNIST-optuna.py")
RECIPE = {"epochs": 1, "batch_size": 64, "optimizer": "adamw", "lr": 3e-3, "momentum": 0.9, "weight_decay": 5e-4,
          "l1": 0.0, "schedule": "onecycle", "label_smoothing": 0.05, "augment": False, "compile": False}


def batch():
    """16 images, each a bright 4x4 square at its own place on a 4x4 grid (6 pixels apart)."""
    images = torch.zeros(16, 1, 28, 28)
    for i in range(16):
        row, col = 3 + 6 * (i // 4), 3 + 6 * (i % 4)
        images[i, 0, row:row + 4, col:col + 4] = 3.0
    return images.contiguous(memory_format=torch.channels_last) - 0.42


def centres(images):
    weights = (images + 0.42).clamp(min=0)[:, 0]
    grid = torch.arange(28.0)
    total = weights.sum((1, 2))
    return torch.stack([(weights.sum(2) * grid).sum(1) / total, (weights.sum(1) * grid).sum(1) / total], 1)


def test_augmentation_keeps_shape_dtype_and_order():
    x = batch()
    moved = random_affine(x, torch.Generator().manual_seed(1), background=-0.42)
    assert moved.shape == x.shape and moved.dtype == x.dtype and not torch.equal(moved, x)
    # blank borders stay blank: what shifts in is background, not mean grey
    assert moved[:, :, 0, :].max().item() == pytest.approx(-0.42, abs=1e-5)
    # the batch keeps its order (labels stay aligned): with shifts of at most 2 pixels each square
    # stays within 3 pixels of where it was, closer than to any other image's square
    shifted = random_affine(x, torch.Generator().manual_seed(1), -0.42, degrees=0, shift=2, scale=(1, 1))
    distance = torch.cdist(centres(shifted), centres(x))
    assert torch.equal(distance.argmin(1), torch.arange(16)) and distance.diagonal().max() < 3


def test_augmentation_is_seeded_and_identity_without_motion():
    x = batch()
    a = random_affine(x, torch.Generator().manual_seed(5), background=-0.42)
    b = random_affine(x, torch.Generator().manual_seed(5), background=-0.42)
    c = random_affine(x, torch.Generator().manual_seed(6), background=-0.42)
    assert torch.equal(a, b) and not torch.equal(a, c)
    still = random_affine(x, torch.Generator().manual_seed(5), -0.42, degrees=0, shift=0, scale=(1, 1))
    assert torch.allclose(still, x, atol=1e-5)


def test_stage_two_ensemble_augment_and_evaluate(run_here, tmp_path):
    out = tmp_path / "optim"
    result = run_here("MNIST-optuna.py", *TINY, "--stage", "optim", "--seeds", "0", "--n-trials", "3",
                        "--backbone", ROOT / "tests" / "tiny_backbone.json", "--optim-epochs", "1", "2",
                        "--ensemble", "2", "--augment", "--no-plots", "--out-dir", out)
    assert result.returncode == 0, result.stderr
    best = json.loads((out / "best_params.json").read_text())
    assert {"lr", "optimizer", "weight_decay", "batch_size", "epochs", "label_smoothing"} <= best["params"].keys()
    assert best["model"]["conv"][0]["channels"] == 4 and best["train"]["augment"] is True
    assert "(with augmentation)" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["ensemble"]["members"]) == 2 and (out / "ensemble-1.pt").is_file()
    assert re.search(r"ensemble of 2 \(averaged softmax\): test accuracy: \d+\.\d\d %", result.stdout)

    evaluated = run_here("MNIST-optuna.py", "--evaluate", out / "model.pt")
    assert evaluated.returncode == 0, evaluated.stderr
    line = evaluated.stdout.strip().splitlines()[-1]
    assert f"test accuracy: {100 * summary['test_accuracy']:.2f} % (with augmentation)" in line
    assert "MMAC/image: 0.1" in line and "parameters:" in line


def test_stage_two_needs_a_backbone(capsys, tmp_path):
    result = run_in_process(capsys, "MNIST-optuna.py", *TINY, *TINY_CNN, "--stage", "optim",
                            "--out-dir", tmp_path / "x")
    assert "--backbone" in assert_one_line_error(result)


def journal_study(out, name):
    backend = optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(backend))


def backbone_with_recipe(tmp_path, **changes):
    payload = json.loads((ROOT / "tests" / "tiny_backbone.json").read_text())
    path = tmp_path / "backbone.json"
    path.write_text(json.dumps({**payload, "train": {**RECIPE, **changes}}))
    return path


def test_stage_two_tries_the_backbone_recipe_first_once_and_repeats_the_final_seeds(run_here, tmp_path):
    out, backbone = tmp_path / "optim", backbone_with_recipe(tmp_path)
    command = [*TINY, "--stage", "optim", "--seeds", "0", "--backbone", backbone, "--optim-epochs", "1", "2",
               "--no-plots", "--out-dir", out]
    result = run_here("MNIST-optuna.py", *command, "--n-trials", "2", "--final-seeds", "3")
    assert result.returncode == 0, result.stderr
    study = journal_study(out, "mnist-cnn-optim-seed0")
    # trial 0 trained exactly the backbone's recipe (what the trial recorded, not only what was asked)
    assert study.trials[0].state.name == "COMPLETE"
    assert {k: study.trials[0].user_attrs["train"][k] for k in RECIPE} == RECIPE
    summary = json.loads((out / "summary.json").read_text())

    runs = summary["final_seeds"]["runs"]
    assert [run["repeat"] for run in runs] == [0, 1, 2] and len({run["seed"] for run in runs}) == 3
    assert runs[0]["test_accuracy"] == summary["test_accuracy"]
    assert runs[0]["seed"] == study.best_trial.user_attrs["seed"]
    assert (out / "seed-1.pt").is_file() and (out / "seed-2.pt").is_file()
    accuracies = [100 * run["test_accuracy"] for run in runs]
    assert 100 * summary["final_seeds"]["mean"] == pytest.approx(sum(accuracies) / 3)
    assert re.search(r"final recipe over 3 seeds: test accuracy \d+\.\d\d ± \d+\.\d\d %", result.stdout)
    for repeat in (1, 2):  # each repeat's checkpoint holds the accuracy it was reported with
        checkpoint = torch.load(out / f"seed-{repeat}.pt", weights_only=True)
        assert checkpoint["meta"]["repeat"] == repeat
        assert checkpoint["meta"]["test_accuracy"] == runs[repeat]["test_accuracy"]

    # resuming with more trials adds trials but never the recipe a second time
    again = run_here("MNIST-optuna.py", *command, "--n-trials", "3", "--no-final")
    assert again.returncode == 0, again.stderr
    # (the resumed TPE start-up draws repeat the first run's: those repeats are not trained and do not count)
    done = [t for t in journal_study(out, "mnist-cnn-optim-seed0").trials if trained(t)]
    assert len(done) == 3
    assert sum(t.user_attrs["train"]["lr"] == RECIPE["lr"] and t.user_attrs["train"]["label_smoothing"]
               == RECIPE["label_smoothing"] for t in done) == 1


def test_a_recipe_outside_the_stage_two_space_is_not_enqueued():
    args = main.build_parser().parse_args(["--optim-lr", "1e-3", "1e-2", "--optim-epochs", "1", "5"])
    params, why = main.recipe_params(RECIPE, args)
    assert why is None and params["lr"] == RECIPE["lr"] and params["optimizer"] == "adamw"
    assert "use_l1" in params and "l1" not in params
    params, why = main.recipe_params({**RECIPE, "lr": 0.5}, args)
    assert params is None and "lr" in why
    params, why = main.recipe_params({**RECIPE, "batch_size": 100}, args)
    assert params is None and "batch_size" in why
    fixed = main.build_parser().parse_args(["--optim-optimizers", "adamw", "--optim-epochs", "1", "5"])
    assert "optimizer" not in main.recipe_params(RECIPE, fixed)[0]  # a fixed choice is not a parameter


@LONG
def test_the_same_command_gives_the_same_weights_with_augmentation(run_here, tmp_path):
    """What the README promises for the shipped model: rerun its command, get its weights, bit for bit (once in a
    process of its own, once in this one, where other tests may have trained before)."""
    args = [*TINY, *TINY_CNN, "--n-trials", "2", "--seeds", "3", "--augment"]
    states = []
    for name, run in (("a", run_script), ("b", run_here)):
        result = run("MNIST-optuna.py", *args, "--out-dir", tmp_path / name)
        assert result.returncode == 0, result.stderr
        states.append(torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_stage_two_into_the_stage_one_folder_is_refused_and_changes_nothing(run_here, tmp_path):
    out = tmp_path / "run"
    assert run_here("MNIST-optuna.py", *SEARCH, "--promote", "0", "--out-dir", out).returncode == 0
    before = folder_files(out)
    result = run_here("MNIST-optuna.py", *TINY, "--seeds", "0", "--n-trials", "1", "--stage", "optim",
                        "--backbone", out / "best_params.json", "--out-dir", out)
    assert "--stage model" in assert_one_line_error(result)
    assert folder_files(out) == before
