"""Tests that fail when a promise breaks (L1, augmentation, out-of-memory, ONNX, grid seed, ensembles,
a stop before training); Ctrl-C and SIGTERM end to end: tests/test_distributed.py."""
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from conftest import QUICK_MAIN, load_script
from data import load_search_data
from mnist_optuna import checkpoints, studies, training, workers
from mnist_optuna.evaluation import load_test
from mnist_optuna.training import TrainConfig, train
from models import build_model

CONFIG = {"conv": [{"channels": 4, "kernel": 3, "pool": True}, {"channels": 8, "kernel": 3, "pool": True}],
          "fc": [16], "dropout": 0.0}


@pytest.fixture(scope="module")
def small(data_dir):
    return load_search_data(data_dir, torch.device("cpu"), val_size=500, train_subset=1000, split_seed=0)


def one_step(small, **recipe):
    """(weights before, weights after) of one SGD step on 100 images."""
    torch.manual_seed(0)
    model = build_model(CONFIG)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = TrainConfig(epochs=1, batch_size=100, optimizer="sgd", momentum=0.9, lr=0.1, weight_decay=0.0,
                      schedule="none", **recipe)
    train(model, small.train_x[:100], small.train_y[:100], cfg, seed=0)
    return before, dict(model.named_parameters())


def test_l1_moves_each_weight_by_its_sign_and_nothing_else(small):
    # one Nesterov-SGD step from zero momentum moves w by -lr * (1 + momentum) * gradient; L1 adds
    # l1 * sign(w) to the gradient of conv and linear weights and nothing to biases or BatchNorm
    strength = 1e-3
    before, plain = one_step(small)
    _, with_l1 = one_step(small, l1=strength)
    weights = {f"{name}.weight" for name, module in build_model(CONFIG).named_modules()
               if isinstance(module, (nn.Conv2d, nn.Linear))}
    for name, start_value in before.items():
        expected = -0.1 * 1.9 * strength * torch.sign(start_value) if name in weights else torch.zeros_like(start_value)
        assert torch.allclose(with_l1[name].detach() - plain[name].detach(), expected, atol=1e-6), name


def test_augmentation_changes_what_the_model_sees(small):
    seen = {}
    for augment in (False, True):
        torch.manual_seed(0)
        model = build_model(CONFIG)
        batches = []
        model.register_forward_pre_hook(lambda module, inputs: batches.append(inputs[0].detach().clone())
                                        if module.training else None)
        cfg = TrainConfig(epochs=1, batch_size=100, augment=augment)
        train(model, small.train_x[:300], small.train_y[:300], cfg, seed=3, background=small.background)
        seen[augment] = (batches, {k: v.clone() for k, v in model.state_dict().items()})
    plain, moved = seen[False][0], seen[True][0]
    assert len(plain) == len(moved) == 3
    assert all(not torch.allclose(a, b) for a, b in zip(plain, moved))
    assert any(not torch.equal(seen[False][1][k], seen[True][1][k]) for k in seen[False][1])


def test_an_out_of_memory_trial_fails_with_its_reason_and_the_study_goes_on(small):
    calls = {"n": 0}

    def objective(trial):
        trial.suggest_int("width", 8, 8)
        model_config = dict(CONFIG)
        calls["n"] += 1
        if calls["n"] == 1:  # the first trial's first forward pass runs out of memory
            original = training.train

            def explode(*_):
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

            def train_oom(model, *args, **kwargs):
                model.register_forward_pre_hook(explode)
                return original(model, *args, **kwargs)
            studies.train = train_oom
            try:
                return studies.run_trial(trial, model_config, TrainConfig(epochs=1, batch_size=100), small, 0)
            finally:
                studies.train = original
        return studies.run_trial(trial, model_config, TrainConfig(epochs=1, batch_size=100), small, calls["n"])

    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=2, catch=studies.CATCH)
    first, second = study.trials
    assert first.state.name == "FAIL" and first.user_attrs["reason"].startswith("out of memory")
    assert second.state.name == "COMPLETE" and second.value > 0.1


@QUICK_MAIN
def test_onnx_file_gives_the_logits_of_model_pt(quick_main_run, data_dir):
    import onnxruntime

    out, _ = quick_main_run
    model, payload = checkpoints.load_checkpoint(out / "model.pt")
    images, _ = load_test(data_dir, torch.device("cpu"), payload["meta"]["mean"], payload["meta"]["std"])
    images = images[:500].contiguous()
    model.eval()
    with torch.no_grad():
        expected = model(images).numpy()
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": images.numpy()})[0]
    assert got.shape == (500, 10) and np.abs(got - expected).max() < 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_the_grid_order_follows_the_seed():
    adv = load_script("MNIST-optuna-adv.py")
    heads = adv.head_grid([1, 2], [[8, 16, 32], [8, 16]])
    orders = {seed: adv.grid_order(heads, seed) for seed in range(4)}
    assert all(sorted(order) == sorted(heads) for order in orders.values())
    assert len({tuple(order) for order in orders.values()}) == 4
    assert adv.grid_order(heads, 2) == orders[2]


def test_ctrl_c_before_training_still_queues_the_trial_again():
    # a stop that lands while the trial is being set up (its parameters drawn, nothing trained yet) is an
    # interruption like one in training: the rerun must queue the trial again, not count it as a failure
    def suggest(trial):
        trial.suggest_int("width", 8, 64)
        raise KeyboardInterrupt

    study = optuna.create_study(direction="maximize")
    objective = studies.run_objective(SimpleNamespace(run_id="run", data=None), suggest, 0)
    with pytest.raises(KeyboardInterrupt):
        study.optimize(objective, n_trials=1)
    (stopped,) = study.trials
    assert stopped.state.name == "FAIL" and stopped.user_attrs["reason"] == "interrupted"
    assert not workers.counted(stopped)
    assert workers.requeue_lost_trials(study) == 1
    assert study.get_trials(states=(optuna.trial.TrialState.WAITING,))[0].params == stopped.params
