"""The promises of the ranking, the promotion and the final stage, each checked in this process at the function
that keeps it: equal scores go to the cheaper network; the promotion scores the moving average of the weights and
trains its own epochs, reusing a score only for the same recipe; a finished retrain is reused; checkpoints record
their thread count; evaluation is fp32; the ONNX check compares two engines; a final stage with other settings is
another stage; a trial's seed is its study's."""
import json
from types import SimpleNamespace

import optuna
import pytest
import torch

from conftest import DATA_DIR, load_script
from data import load_search_data, promotion_training_set
from mnist_optuna import checkpoints, final, promotion, studies, training
from mnist_optuna.outcome import Outcome
from mnist_optuna.reporting import by_rank
from mnist_optuna.training import TrainConfig
from models import build_model

NET = {"conv": [{"channels": 4, "kernel": 3, "pool": True}, {"channels": 8, "kernel": 3, "pool": True}],
       "fc": [16], "dropout": 0.0}
RECIPE = {"epochs": 1, "batch_size": 50, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 5e-4, "l1": 0.0,
          "schedule": "onecycle", "label_smoothing": 0.0, "augment": False, "compile": False}


@pytest.fixture(scope="module")
def small():
    return load_search_data(DATA_DIR, torch.device("cpu"), val_size=500, train_subset=500)


def trial_of(value, mmac, number=0, model=NET, seed=7):
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
    model = build_model(NET)
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
        _, _, first, seconds = training.retrain_and_test(NET, recipe, small.train_x, small.train_y, 5, test,
                                                         tmp_path / "model.pt", {})
    finally:
        torch.set_num_threads(threads)
    meta = checkpoints.load_checkpoint(tmp_path / "model.pt")[1]["meta"]
    assert meta["threads"] == 2 and meta["test_accuracy"] == first

    def no_training(*args, **kwargs):
        raise AssertionError("a finished checkpoint of the same training was trained again")
    monkeypatch.setattr(training, "train", no_training)
    again = training.retrain_and_test(NET, recipe, small.train_x, small.train_y, 5, test, tmp_path / "model.pt", {})
    assert again[2] == first and again[3] == seconds
    with pytest.raises(AssertionError, match="trained again"):  # another seed is another training
        training.retrain_and_test(NET, recipe, small.train_x, small.train_y, 6, test, tmp_path / "model.pt", {})


def test_evaluation_is_fp32_whatever_precision_trained_the_network(small):
    torch.manual_seed(0)
    model = build_model(NET).eval()
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        expected = model(small.val_x[:300]).float()
    assert torch.equal(training.predict_logits(model, small.val_x[:300]), expected)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # what bf16 scoring would give: not that
        assert not torch.equal(model(small.val_x[:300]).float(), expected)


def test_the_onnx_check_compares_onnx_runtime_with_pytorch(tmp_path, small):
    torch.manual_seed(0)
    exported, other = build_model(NET).eval(), build_model(NET).eval()
    path = checkpoints.export_onnx(exported, tmp_path / "model.onnx")
    same_diff, same_agree = checkpoints.onnx_parity(exported, path, small.val_x[:100])
    assert same_diff < 1e-4 and same_agree == 1.0
    other_diff, _ = checkpoints.onnx_parity(other, path, small.val_x[:100])
    assert other_diff > 1e-2  # the file against another network's PyTorch logits: the check sees it
