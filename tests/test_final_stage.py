"""The ranking, the promotion and the final stage keep their promises, most checked in this process at the function
that keeps each: equal scores go to the cheaper network; the promotion scores the moving average of the weights and
trains its own epochs, reusing a score only for the same recipe, and its choice is the network retrained; a
finished retrain is reused; checkpoints record their thread count; evaluation is fp32; the ONNX check compares two
engines; a final stage with other settings is another stage; a stopped, full-disk or lowered-budget final stage
leaves files all of one network; the ensemble is the average of its members."""
import errno
import json
import os
import shlex
from types import SimpleNamespace

import optuna
import pytest
import torch

import models
from conftest import (
    SEARCH,
    TINY,
    TINY_CNN,
    TINY_NET,
    assert_one_line_error,
    folder_files,
    frozen,
    load_script,
    run_in_process,
    run_script,
    stop_after,
    study_trials,
)
from data import final_training_set, load_search_data, promotion_training_set
from mnist_optuna import checkpoints, evaluation, final, promotion, studies, training
from mnist_optuna.outcome import Outcome
from mnist_optuna.reporting import by_rank
from mnist_optuna.training import TrainConfig
from models import build_model

RECIPE = {"epochs": 1, "batch_size": 50, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 5e-4, "l1": 0.0,
          "schedule": "onecycle", "label_smoothing": 0.0, "augment": False, "compile": False}


def trial_of(value, mmac, number=0, model=TINY_NET, seed=7):
    return optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=value, user_attrs={
        "model": model, "train": RECIPE, "seed": seed, "study": "s", "mmac": mmac, "number": number})


def test_equal_validation_accuracies_go_to_the_cheaper_network():
    costly, cheap, best = trial_of(0.99, 20.0), trial_of(0.99, 10.0), trial_of(0.995, 30.0)
    assert by_rank([costly, cheap, best]) == [best, cheap, costly]
    study = optuna.create_study(direction="maximize")
    study.add_trials([costly, cheap, best])
    ranked, _ = studies.rank(Outcome(None, str, studies=[(0, study)]))
    assert [trial.user_attrs["mmac"] for _, trial in ranked] == [30.0, 10.0, 20.0]


def test_a_trials_seed_is_its_studys_and_its_parameters_not_its_number():
    params = {"width": 16, "rate": 0.1}
    assert studies.trial_seed(0, params) != studies.trial_seed(1, params) != studies.trial_seed(2, params)
    assert studies.trial_seed(3, params) == studies.trial_seed(3, dict(reversed(params.items())))
    assert studies.trial_seed(3, params) != studies.trial_seed(3, {**params, "width": 32})


def test_the_main_search_prunes_with_hyperband():
    script = load_script("MNIST-optuna.py")
    args = script.build_parser().parse_args(["--epochs", "4"])
    run = SimpleNamespace(storage=optuna.storages.InMemoryStorage(), data=SimpleNamespace(fingerprint="x"))
    study = script.seed_study(args, run, 0, None, None)
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner)


def test_a_final_stage_with_other_settings_is_another_stage():
    trial = trial_of(0.99, 10.0)
    base = final.FinalConfig(promote=2, epochs=8, promote_epochs=3, ema=0.5, seeds=1, ensemble=0)
    changes = dict(promote=3, epochs=9, promote_epochs=4, ema=0.0, tta=True, precision="bf16", subset=1000, seeds=3,
                   ensemble=3, augment=True)
    keys = {final.final_key(trial, base)}
    for name, value in changes.items():
        other = final.final_key(trial, final.FinalConfig(**{**vars(base), name: value}))
        assert other not in keys, f"a final stage with another {name} would take this one's claim and result"
        keys.add(other)


def test_promotion_scores_the_moving_average_trains_its_own_epochs_and_reuses_a_score_only_for_its_recipe(
        tmp_path, small):
    candidate = trial_of(0.9, 1.0)
    cfg = final.FinalConfig(promote=2, epochs=5, promote_epochs=1, ema=0.5, subset=1000)
    record = promotion.promote([candidate], small, cfg, tmp_path)["record"]
    assert record["epochs"] == 1  # --promote-epochs, not --final-epochs
    stored = json.loads((tmp_path / "promotion.json").read_text())
    (score,) = stored.values()
    assert len(score["val_curve"]) == 1
    # the same training by hand: the averaged weights (BatchNorm refitted) against the last ones
    x, y = promotion_training_set(small, 1000)
    recipe = promotion.final_recipe(candidate, cfg, 1)
    training.seed_everything(7)
    model = build_model(TINY_NET)
    history = training.train(model, x, y, recipe, 7, val=(small.val_x, small.val_y), also_last=True)
    assert history[-1]["val_accuracy"] != history[-1]["val_accuracy_last"]  # the two differ here, so this tells
    assert record["chosen"]["promoted_val"] == history[-1]["val_accuracy"]
    # another recipe of the promotion trains again; the same one reuses its score
    promotion.promote([candidate], small, final.FinalConfig(**{**vars(cfg), "ema": 0.0}), tmp_path)
    promotion.promote([candidate], small, final.FinalConfig(**{**vars(cfg), "augment": True}), tmp_path)
    promotion.promote([candidate], small, cfg, tmp_path)
    assert len(json.loads((tmp_path / "promotion.json").read_text())) == 3


def test_a_finished_retrain_is_reused_and_records_the_threads_it_ran_on(tmp_path, small, monkeypatch):
    recipe = TrainConfig.from_dict({**RECIPE, "precision": "fp32"})
    test = (small.val_x[:200], small.val_y[:200])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, _, first, seconds = training.retrain_and_test(TINY_NET, recipe, small.train_x, small.train_y, 5, test,
                                                         tmp_path / "model.pt", {})
    finally:
        torch.set_num_threads(threads)
    meta = checkpoints.load_checkpoint(tmp_path / "model.pt")[1]["meta"]
    assert meta["threads"] == 2 and meta["test_accuracy"] == first

    def no_training(*args, **kwargs):
        raise AssertionError("a finished checkpoint of the same training was trained again")
    monkeypatch.setattr(training, "train", no_training)
    again = training.retrain_and_test(TINY_NET, recipe, small.train_x, small.train_y, 5, test, tmp_path / "model.pt", {})
    assert again[2] == first and again[3] == seconds
    with pytest.raises(AssertionError, match="trained again"):  # another seed is another training
        training.retrain_and_test(TINY_NET, recipe, small.train_x, small.train_y, 6, test, tmp_path / "model.pt", {})


def test_evaluation_is_fp32_whatever_precision_trained_the_network(small):
    torch.manual_seed(0)
    model = build_model(TINY_NET).eval()
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        expected = model(small.val_x[:300]).float()
    assert torch.equal(training.predict_logits(model, small.val_x[:300]), expected)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # what bf16 scoring would give: not that
        assert not torch.equal(model(small.val_x[:300]).float(), expected)


def test_the_onnx_check_compares_onnx_runtime_with_pytorch(tmp_path, small):
    torch.manual_seed(0)
    exported, other = build_model(TINY_NET).eval(), build_model(TINY_NET).eval()
    path = checkpoints.export_onnx(exported, tmp_path / "model.onnx")
    same_diff, same_agree = checkpoints.onnx_parity(exported, path, small.val_x[:100])
    assert same_diff < 1e-4 and same_agree == 1.0
    other_diff, _ = checkpoints.onnx_parity(other, path, small.val_x[:100])
    assert other_diff > 1e-2  # the file against another network's PyTorch logits: the check sees it


def test_a_final_stage_stopped_anywhere_leaves_the_previous_files_all_of_one_network(run_here, tmp_path):
    out = tmp_path / "run"
    assert run_here("MNIST-optuna.py", *SEARCH, "--promote", "0", "--final-seeds", "2", "--out-dir", out).returncode == 0
    before = folder_files(out)
    # a new choice (the cheapest network within --pick-mmac) stopped after its test accuracy, during the ONNX export
    # (exported here, unlike the other tiny runs: without it the files may be published before the stop lands)
    with_onnx = [arg for arg in SEARCH if arg != "--no-onnx"]
    args = [*with_onnx, "--promote", "0", "--retrain-only", "--pick-mmac", "0.3", "--final-epochs", "2",
            "--out-dir", out]
    code, output = stop_after(out, "test accuracy:", *args)
    assert code == 130, output
    after = folder_files(out)
    assert {name: after[name] for name in before if name != "config.json"} == \
        {name: before[name] for name in before if name != "config.json"}
    # the rerun finishes it: every file of the new stage together, the old seed repeat gone with its stage
    again = run_here(*["MNIST-optuna.py", *args])
    assert again.returncode == 0, again.stderr
    model = torch.load(out / "model.pt", weights_only=True)
    chosen = json.loads((out / "best_params.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert model["config"] == chosen["model"] and model["meta"]["trial"] == chosen["trial"] == summary["best"]["trial"]
    assert model["meta"]["test_accuracy"] == summary["test_accuracy"]
    assert not (out / "seed-1.pt").exists() and not (out / ".final-stage").exists()


def test_a_lowered_budget_applies_to_the_answer(run_here, tmp_path):
    out = tmp_path / "it's a run"  # a name the printed reproduce line must quote for a shell
    # a process of its own: its printed command line is read
    first = run_script("MNIST-optuna.py", *SEARCH, "--n-trials", "3", "--promote", "0", "--out-dir", out)
    assert first.returncode == 0, first.stderr
    words = shlex.split(next(line for line in first.stdout.splitlines() if line.startswith("reproduce: "))[11:])
    assert words[words.index("--out-dir") + 1] == str(out)
    chosen = torch.load(out / "model.pt", weights_only=True)["config"]
    budget = models.mmac(chosen) * 0.999  # just below the answer's network
    cheaper = [t for t in study_trials(out / "study.journal")
               if t.state.name == "COMPLETE" and t.user_attrs["mmac"] <= budget]
    lowered = run_here("MNIST-optuna.py", *SEARCH, "--n-trials", "3", "--promote", "0", "--retrain-only",
                       "--max-mmac", str(budget), "--out-dir", out)
    if cheaper:  # the best of the cheaper networks is retrained
        assert lowered.returncode == 0, lowered.stderr
        assert models.mmac(torch.load(out / "model.pt", weights_only=True)["config"]) <= budget
    else:  # none fits: nothing is retrained, and the run says why
        assert lowered.returncode == 1 and "--max-mmac" in lowered.stdout
        assert torch.load(out / "model.pt", weights_only=True)["config"] == chosen


def test_a_full_disk_at_the_final_save_is_one_line_and_keeps_everything(run_here, capsys, tmp_path, monkeypatch):
    from mnist_optuna import checkpoints

    out = tmp_path / "run"
    assert run_here("MNIST-optuna.py", *SEARCH, "--promote", "0", "--out-dir", out).returncode == 0
    before = folder_files(out)

    def full(path, content):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(checkpoints, "write_atomic", full)
    result = run_in_process(capsys, "MNIST-optuna.py", *SEARCH, "--promote", "0", "--retrain-only",
                            "--final-epochs", "2", "--out-dir", out)
    line = assert_one_line_error(result)
    assert "No space left on device" in line and "rerun the same command" in line
    assert {k: v for k, v in folder_files(out).items() if k != "config.json"} == \
        {k: v for k, v in before.items() if k != "config.json"}


def test_an_ensemble_of_checkpoints_of_different_tasks_is_one_line(capsys, tmp_path):
    from mnist_optuna import checkpoints, training

    paths = []
    for classes in (10, 7):
        config = models.normalise_config({"conv": [{"channels": 4, "kernel": 3, "pool": True}], "fc": [],
                                          "num_classes": classes})
        paths.append(tmp_path / f"c{classes}.pt")
        checkpoints.save_checkpoint(paths[-1], models.build_model(config), training.TrainConfig(), {})
    result = run_in_process(capsys, "MNIST-optuna.py", "--evaluate", *paths)
    assert "one set of classes" in assert_one_line_error(result)


def test_a_stopped_final_stage_leaves_nothing_that_the_next_stage_publishes(run_here, tmp_path):
    import json

    import torch

    out = tmp_path / "run"
    first = [*SEARCH, "--promote", "0", "--out-dir", out]
    assert run_here("MNIST-optuna.py", *first).returncode == 0
    # another final stage (3 seeds, 2 epochs) stopped once its repeat 1 is made: seed-1.pt waits in the staging folder
    code, output = stop_after(out, "final recipe, repeat 1", *first, "--retrain-only", "--final-seeds", "3",
                              "--final-epochs", "2")
    assert code == 130, output
    again = run_here("MNIST-optuna.py", *first, "--retrain-only")
    assert again.returncode == 0, again.stderr
    names = {path.name for path in out.iterdir()}
    assert "seed-1.pt" not in names and not (out / ".final-stage").exists()
    # every file is of this stage: summary.json names model.pt's accuracy and no seed repeats
    model = torch.load(out / "model.pt", weights_only=True)
    summary = json.loads((out / "summary.json").read_text())
    assert model["meta"]["test_accuracy"] == summary["test_accuracy"] and "final_seeds" not in summary
    assert model["train"]["epochs"] != 2


def test_promise_the_final_retrain_uses_train_and_validation(small):
    x, y = final_training_set(small)
    assert len(y) == len(small.all_y) == len(small.train_y) + len(small.val_y) + 58_500  # the subset is left behind
    images = {image.numpy().tobytes() for image in x}
    assert all(image.numpy().tobytes() in images for image in small.val_x)
    assert all(image.numpy().tobytes() in images for image in small.train_x)
    drawn, labels = final_training_set(small, 1500, seed=0)
    assert len(labels) == 1500 and not torch.equal(drawn[:1000], small.train_x)


def test_promise_a_checkpoint_is_reused_only_for_the_same_training(small, tmp_path):
    test = (small.val_x[:200], small.val_y[:200])
    x, y = small.train_x[:300], small.train_y[:300]
    cfg = TrainConfig(epochs=1, batch_size=50, precision="fp32")
    path = tmp_path / "model.pt"

    def retrain(config=TINY_NET, recipe=cfg, seed=0, images=(x, y), data="fingerprint-a"):
        return training.retrain_and_test(config, recipe, *images, seed, test, path, {"training_data": data})

    retrain()
    first = path.read_bytes()
    retrain()
    assert path.read_bytes() == first  # the same training: reused, not trained again
    changes = {"network": dict(config={**TINY_NET, "fc": [32]}), "recipe": dict(recipe=TrainConfig(
        epochs=1, batch_size=50, lr=1e-3, precision="fp32")), "seed": dict(seed=1),
        "images": dict(images=(small.train_x[:400], small.train_y[:400])), "data": dict(data="fingerprint-b")}
    for what, change in changes.items():
        retrain()
        reused = path.read_bytes()
        retrain(**change)
        assert path.read_bytes() != reused, f"a checkpoint of another {what} was reused"


def test_promise_the_ensemble_is_the_averaged_softmax_of_its_members(run_here, tmp_path, data_dir):
    out = tmp_path / "run"
    result = run_here("MNIST-optuna.py", *TINY, *TINY_CNN, "--seeds", "0", "--n-trials", "3", "--promote", "0",
                      "--ensemble", "3", "--final-seeds", "2", "--final-subset", "1500", "--out-dir", out)
    assert result.returncode == 0, result.stderr
    paths = [out / "model.pt", out / "ensemble-1.pt", out / "ensemble-2.pt"]
    probabilities, accuracies = 0, []
    for path in paths:
        model, payload = checkpoints.load_checkpoint(path)
        test_x, test_y = evaluation.load_test(data_dir, torch.device("cpu"), payload["meta"]["mean"],
                                         payload["meta"]["std"])
        logits = training.predict_logits(model, test_x)
        accuracies.append((logits.argmax(1) == test_y).float().mean().item())
        probabilities = probabilities + torch.softmax(logits, 1)
    summary = json.loads((out / "summary.json").read_text())
    averaged = (probabilities.argmax(1) == test_y).float().mean().item()
    assert summary["ensemble"]["test_accuracy"] == pytest.approx(averaged, abs=1e-9)
    assert [m["test_accuracy"] for m in summary["ensemble"]["members"]] == pytest.approx(accuracies, abs=1e-9)
    # every final training (the model, its seed repeat, each member) on the --final-subset of train+validation
    for path in [*paths, out / "seed-1.pt"]:
        assert checkpoints.load_checkpoint(path)[1]["meta"]["train_images"] == 1500, path
    # and the members are distinct configurations (network and recipe)
    members = [checkpoints.load_checkpoint(path)[1] for path in paths]
    assert len({json.dumps([m["config"], m["train"]], sort_keys=True) for m in members}) == 3


def test_promise_the_promoted_choice_is_the_network_retrained(tmp_path, data_dir):
    # the search ranked a 9-feature network first and a real CNN second; the promotion must reorder them, and
    # the final model, best_params.json and summary.json must then all be the CNN

    from mnist_optuna import studies
    from models import normalise_config

    starved = {"conv": [{"channels": 1, "kernel": 1, "pool": True}] * 3, "fc": [], "dropout": 0.0}
    cnn = {"conv": [{"channels": 8, "kernel": 3, "pool": True}, {"channels": 16, "kernel": 3, "pool": True}],
           "fc": [], "dropout": 0.0}
    data = load_search_data(data_dir, torch.device("cpu"), val_size=1000, train_subset=1000)
    run = studies.Run(torch.device("cpu"), data_dir, data, tmp_path, None, "run")
    ranked = [(0, frozen(starved, 0.99, 1)), (1, frozen(cnn, 0.50, 2))]
    cfg = final.FinalConfig(promote=2, epochs=1, promote_epochs=2, subset=4000)
    with final.StagedFiles(tmp_path) as staged:
        summary, model, _, best = final.retrain_chosen(cfg, Outcome(run, str), ranked, {"best": {"seed": 0}}, staged)
        staged.publish()
    assert best is ranked[1][1] and model.config == normalise_config(cnn)
    assert json.loads((tmp_path / "best_params.json").read_text())["model"] == cnn
    assert summary["best"]["seed"] == 1 and summary["search_best"] == {"seed": 0}
    assert checkpoints.load_checkpoint(tmp_path / "model.pt")[1]["meta"]["study_seed"] == 1


def test_promise_a_final_stage_leaves_no_model_file_of_the_stage_before(tmp_path):
    # the stage before made model.pt, model.onnx and a seed repeat; this one (--no-onnx, one seed) makes model.pt only:
    # a model.onnx left beside it would be another network's
    for name in ("model.pt", "model.onnx", "seed-1.pt", "notes.txt"):
        (tmp_path / name).write_text("the stage before")
    with final.StagedFiles(tmp_path) as staged:
        staged.path("model.pt").write_text("this stage")
        staged.publish()
    assert (tmp_path / "model.pt").read_text() == "this stage"
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "seed-1.pt").exists()
    assert (tmp_path / "notes.txt").read_text() == "the stage before"  # not a model: kept
