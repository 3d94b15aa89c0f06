import optuna
import pytest
import torch
from torch import nn

from data import load_search_data
from mnist_optuna import checkpoints, devices, studies, training
from mnist_optuna.studies import run_trial
from mnist_optuna.training import Divergence, TrainConfig, l1_penalty, train
from mnist_optuna.workers import TWIN
from models import build_model


@pytest.fixture(scope="module")
def small(data_dir):
    return load_search_data(data_dir, torch.device("cpu"), val_size=500, train_subset=1000, split_seed=0)


CONFIG = {"conv": [{"channels": 4, "kernel": 3, "pool": True}, {"channels": 8, "kernel": 3, "pool": True}],
          "fc": [16], "dropout": 0.1}


def test_l1_penalty_is_the_sum_of_absolute_weights_only():
    model = build_model(CONFIG)
    for p in model.parameters():
        nn.init.uniform_(p, -1, 1)  # biases and BN parameters non-zero too, so leaving them out shows
    expected = 0.0
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            expected += sum(abs(v) for v in module.weight.detach().flatten().tolist())
    everything = sum(abs(v) for p in model.parameters() for v in p.detach().flatten().tolist())
    assert l1_penalty(model).item() == pytest.approx(expected, rel=1e-5)
    assert everything > expected + 1


def test_training_learns_and_is_reproducible(small):
    cfg = TrainConfig(epochs=2, batch_size=50, lr=3e-3)
    results = []
    for _ in range(2):
        training.seed_everything(7)
        model = build_model(CONFIG)
        history = train(model, small.train_x, small.train_y, cfg, seed=7, val=(small.val_x, small.val_y))
        results.append((history, model.state_dict()))
    (h1, s1), (h2, s2) = results
    assert h1[-1]["val_accuracy"] > 0.6  # chance is 0.1
    assert [e["train_loss"] for e in h1] == [e["train_loss"] for e in h2]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("optimizer, kind", [("adam", torch.optim.Adam), ("sgd", torch.optim.SGD),
                                             ("adamw", torch.optim.AdamW)])
def test_each_optimizer_is_the_named_one_and_learns(small, optimizer, kind):
    # what each schedule, L2, L1 and smoothing do is checked step by step in test_promises*.py
    cfg = TrainConfig(epochs=2, batch_size=50, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3)
    made = training.make_optimizer(build_model(CONFIG), cfg)
    assert type(made) is kind and made.param_groups[0]["lr"] == cfg.lr
    assert optimizer != "sgd" or made.param_groups[0]["nesterov"]
    training.seed_everything(0)  # the same initial weights whatever ran before in this process
    history = train(build_model(CONFIG), small.train_x, small.train_y, cfg, seed=0, val=(small.val_x, small.val_y))
    assert history[1]["train_loss"] < history[0]["train_loss"] and history[1]["val_accuracy"] > 0.5


def test_report_callback_sees_every_step(small):
    steps = []
    train(build_model(CONFIG), small.train_x, small.train_y, TrainConfig(epochs=2, batch_size=50), seed=0,
          val=(small.val_x, small.val_y), on_report=lambda step, acc: steps.append((step, acc)), reports_per_epoch=2)
    assert [s for s, _ in steps] == [1, 2, 3, 4]
    assert all(0 <= a <= 1 for _, a in steps)


def test_divergence_prunes_the_trial_with_its_reason(small):
    trial = optuna.trial.FixedTrial({})
    cfg = TrainConfig(epochs=1, batch_size=50, lr=1e6, optimizer="sgd", schedule="none")
    with pytest.raises(optuna.TrialPruned):
        run_trial(trial, CONFIG, cfg, small, 0)
    assert trial.user_attrs["reason"].startswith("diverged")
    with pytest.raises(Divergence):
        train(build_model(CONFIG), small.train_x, small.train_y, cfg, seed=0)


def test_checkpoint_round_trip(tmp_path, small):
    model = build_model(CONFIG)
    checkpoints.save_checkpoint(tmp_path / "m.pt", model, TrainConfig(), {"seed": 1})
    loaded, payload = checkpoints.load_checkpoint(tmp_path / "m.pt")
    assert payload["meta"]["seed"] == 1 and payload["config"]["fc"] == [16]
    model.eval(), loaded.eval()
    assert torch.equal(model(small.val_x[:8]), loaded(small.val_x[:8]))


def test_device_choice():
    assert devices.resolve_device("cpu").type == "cpu"
    best = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert devices.resolve_device("auto").type == best  # auto takes the accelerator there is


def test_auto_takes_a_cuda_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    assert devices.resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(training.UserError, match="no CUDA GPU"):
        devices.resolve_device("cuda")
    with pytest.raises(training.UserError, match="choose one of"):
        devices.resolve_device("nonsense")


def test_of_two_trials_that_start_one_configuration_together_only_the_earlier_trains(small, monkeypatch):
    # the race of two workers on a shared storage, in one process: the later trial checks for a twin before
    # the earlier one has written its parameters, so only a check during training can find it
    study = optuna.create_study(direction="maximize")
    earlier, later = study.ask(), study.ask()
    later.suggest_int("width", 8, 8)
    real_train = studies.train

    def train_while_the_earlier_trial_starts(*args, **kwargs):
        earlier.suggest_int("width", 8, 8)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(studies, "train", train_while_the_earlier_trial_starts)
    cfg = TrainConfig(epochs=2, batch_size=100)
    with pytest.raises(optuna.TrialPruned):
        run_trial(later, CONFIG, cfg, small, 0)
    assert later.user_attrs["reason"] == f"{TWIN} {earlier.number}; not trained again"
    study.tell(later, state=optuna.trial.TrialState.PRUNED)
    monkeypatch.setattr(studies, "train", real_train)
    assert run_trial(earlier, CONFIG, cfg, small, 0) > 0.1  # the later one does not hold the earlier one back
    assert "reason" not in earlier.user_attrs
