"""Each promise of the README checked by what the code does, not by what the run prints about it.
Each test names its promise; breaking the promise at its one place fails the test (each was tried with such a
break)."""
import json

import numpy as np
import optuna
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import QUICK_MAIN, TINY, TINY_CNN, frozen, load_script, run_script
from data import final_training_set, load_search_data
from errors import UserError
from mnist_optuna import checkpoints, evaluation, final, storages, training
from mnist_optuna.outcome import Outcome
from mnist_optuna.settings import search_settings
from mnist_optuna.training import TrainConfig, train
from models import build_model

pytestmark = pytest.mark.timeout(600)
CONFIG = {"conv": [{"channels": 4, "kernel": 3, "pool": True}, {"channels": 8, "kernel": 3, "pool": True}],
          "fc": [16], "dropout": 0.0}


@pytest.fixture(scope="module")
def small(data_dir):
    return load_search_data(data_dir, torch.device("cpu"), val_size=500, train_subset=1000, split_seed=0)


def test_promise_label_smoothing_is_the_smoothed_cross_entropy(small):
    # a training of one batch reports the loss of that batch before its step: with smoothing 0.1 it must be
    # (1 - 0.1) * NLL + 0.1 * the mean over classes of -log p, computed here by hand from the same weights
    x, y = small.train_x[:100], small.train_y[:100]
    torch.manual_seed(0)
    model = build_model(CONFIG)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    history = train(model, x, y, TrainConfig(epochs=1, batch_size=100, label_smoothing=0.1, schedule="none",
                                             precision="fp32"), seed=0)
    model.load_state_dict(start)
    model.train()
    with torch.no_grad():
        log_p = torch.log_softmax(model(x).float(), 1)
    nll = -log_p[torch.arange(len(y)), y].mean()
    by_hand = 0.9 * nll + 0.1 * (-log_p.mean(1)).mean()
    assert history[0]["train_loss"] == pytest.approx(by_hand.item(), rel=1e-5)
    assert abs(by_hand.item() - nll.item()) > 1e-3  # the smoothing makes a difference this test can see


def sgd_step(small, **recipe):
    torch.manual_seed(0)
    model = build_model(CONFIG)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = TrainConfig(epochs=1, batch_size=100, optimizer="sgd", momentum=0.9, lr=0.1, schedule="none",
                      precision="fp32", **recipe)
    train(model, small.train_x[:100], small.train_y[:100], cfg, seed=0)
    return before, dict(model.named_parameters())


def test_promise_l2_is_the_optimizers_weight_decay(small):
    # one Nesterov-SGD step from zero momentum moves w by -lr * (1 + momentum) * gradient, and weight decay adds
    # decay * w to every parameter's gradient: the difference of the two steps is exactly that
    decay = 1e-2
    before, plain = sgd_step(small, weight_decay=0.0)
    _, decayed = sgd_step(small, weight_decay=decay)
    for name, start in before.items():
        expected = -0.1 * 1.9 * decay * start
        assert torch.allclose(decayed[name].detach() - plain[name].detach(), expected, atol=1e-6), name
    for optimizer in ("adam", "adamw"):
        assert training.make_optimizer(build_model(CONFIG), TrainConfig(optimizer=optimizer, weight_decay=decay)) \
            .param_groups[0]["weight_decay"] == decay


def learning_rates(small, schedule, epochs=2):
    """The learning rate of every optimizer step of a training, as the optimizer saw it."""
    seen = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append(optimizer.param_groups[0]["lr"]))
    try:
        train(build_model(CONFIG), small.train_x[:500], small.train_y[:500],
              TrainConfig(epochs=epochs, batch_size=50, lr=1e-2, schedule=schedule, precision="fp32"), seed=0)
    finally:
        hook.remove()
    return seen


def test_promise_the_schedule_sets_the_learning_rate_of_every_step(small):
    onecycle, cosine, constant = (learning_rates(small, name) for name in ("onecycle", "cosine", "none"))
    assert len(onecycle) == len(cosine) == len(constant) == 20
    assert constant == [1e-2] * 20
    # one-cycle: up from lr/25 to lr over the first quarter, then down to almost nothing
    peak = int(np.argmax(onecycle))
    assert onecycle[0] == pytest.approx(1e-2 / 25) and max(onecycle) == pytest.approx(1e-2, rel=0.05)
    assert 3 <= peak <= 6 and onecycle[-1] < 1e-2 / 100
    assert all(a <= b for a, b in zip(onecycle[:peak], onecycle[1:peak + 1]))
    assert all(a >= b for a, b in zip(onecycle[peak:], onecycle[peak + 1:]))
    # cosine: from lr down along half a cosine
    steps = np.arange(20)
    assert np.allclose(cosine, 1e-2 * (1 + np.cos(np.pi * steps / 20)) / 2, rtol=1e-6)


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

    def retrain(config=CONFIG, recipe=cfg, seed=0, images=(x, y), data="fingerprint-a"):
        return training.retrain_and_test(config, recipe, *images, seed, test, path, {"training_data": data})

    retrain()
    first = path.read_bytes()
    retrain()
    assert path.read_bytes() == first  # the same training: reused, not trained again
    changes = {"network": dict(config={**CONFIG, "fc": [32]}), "recipe": dict(recipe=TrainConfig(
        epochs=1, batch_size=50, lr=1e-3, precision="fp32")), "seed": dict(seed=1),
        "images": dict(images=(small.train_x[:400], small.train_y[:400])), "data": dict(data="fingerprint-b")}
    for what, change in changes.items():
        retrain()
        reused = path.read_bytes()
        retrain(**change)
        assert path.read_bytes() != reused, f"a checkpoint of another {what} was reused"


def test_promise_a_study_refuses_a_rerun_that_changes_its_data_or_recipe(tmp_path):
    script = load_script("MNIST-optuna.py")

    def settings(*flags):
        args = script.build_parser().parse_with_preset(["--quick", *flags], "--quick", script.QUICK)
        return search_settings(args, network=None, training_data="x")

    storage = optuna.storages.InMemoryStorage()
    storages.open_study("s", storage, None, None, settings())
    changed = {"--lr": "1e-4", "--epochs": "3", "--batch-size": "32", "--optimizer": "sgd", "--weight-decay": "0.1",
               "--l1": "1e-4", "--label-smoothing": "0.2", "--schedule": "cosine", "--val-size": "700",
               "--train-subset": "900", "--split-seed": "5", "--augment": None}
    for flag, value in changed.items():
        flags = [flag] if value is None else [flag, value]
        with pytest.raises(UserError, match=flag):
            storages.open_study("s", storage, None, None, settings(*flags))
    storages.open_study("s", storage, None, None, settings("--final-epochs", "3", "--promote", "4"))  # not the search


def test_promise_the_ensemble_is_the_averaged_softmax_of_its_members(tmp_path, data_dir):
    out = tmp_path / "run"
    result = run_script("MNIST-optuna.py", *TINY, *TINY_CNN, "--seeds", "0", "--n-trials", "3", "--promote", "0",
                        "--ensemble", "3", "--final-seeds", "2", "--final-subset", "1500", "--no-plots",
                        "--out-dir", out)
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


@QUICK_MAIN
def test_promise_the_run_records_what_ran(quick_main_run):
    out, _ = quick_main_run
    script = load_script("MNIST-optuna.py")
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == script.LR and config["seeds"] == script.QUICK.get("SEEDS", script.SEEDS)
    assert config["precision"] in ("fp32", "bf16") and "--quick" in config["command"]
    model, payload = checkpoints.load_checkpoint(out / "model.pt")
    best = json.loads((out / "best_params.json").read_text())
    meta = payload["meta"]
    assert payload["config"] == best["model"] and payload["train"]["lr"] == script.LR
    assert meta["seed"] == best["seed"] and meta["trial"] == best["trial"] and meta["study_seed"] == best["study_seed"]
    assert meta["train_images"] == script.QUICK["FINAL_SUBSET"] and meta["source"] == config["source"]
    assert meta["command"] == config["command"] and meta["precision"] == config["precision"]
    summary = json.loads((out / "summary.json").read_text())
    assert meta["test_accuracy"] == summary["test_accuracy"] and len(meta["history"]) == script.QUICK["FINAL_EPOCHS"]


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


def test_promise_a_grid_study_recorded_under_the_old_dropout_name_resumes_under_head_dropout():
    # the head grid's fixed dropout was DROPOUT, a range in the other script; studies that recorded it as
    # "dropout" resume under --head-dropout, and a changed value is still refused under its new name
    script = load_script("MNIST-optuna-adv.py")

    def settings(*flags):
        args = script.build_parser().parse_with_preset(["--quick", *flags], "--quick", script.QUICK)
        return search_settings(args, backbone=[], training_data="x")

    storage = optuna.storages.InMemoryStorage()
    study = storages.open_study("grid", storage, None, None, settings())
    old = dict(study.user_attrs["search"])
    old["dropout"] = old.pop("head_dropout")
    study.set_user_attr("search", old)
    storages.open_study("grid", storage, None, None, settings())
    assert "head_dropout" in study.user_attrs["search"] and "dropout" not in study.user_attrs["search"]
    study.set_user_attr("search", old)
    with pytest.raises(UserError, match="--head-dropout 0.2, this run asks for 0.3"):
        storages.open_study("grid", storage, None, None, settings("--head-dropout", "0.3"))
    # the other script's DROPOUT is a range of its own: its studies' "dropout" is never read as --head-dropout
    main = load_script("MNIST-optuna.py")
    args = main.build_parser().parse_with_preset(["--quick"], "--quick", main.QUICK)
    study = storages.open_study("cnn", storage, None, None, search_settings(args, network=None, training_data="x"))
    storages.open_study("cnn", storage, None, None, search_settings(args, network=None, training_data="x"))
    assert study.user_attrs["search"]["dropout"] == [0.0, 0.5] and "head_dropout" not in study.user_attrs["search"]
    args.dropout = (0.0, 0.3)
    with pytest.raises(UserError, match="--dropout 0.0 0.5, this run asks for 0.0 0.3"):
        storages.open_study("cnn", storage, None, None, search_settings(args, network=None, training_data="x"))
