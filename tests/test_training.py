import numpy as np
import optuna
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import TINY_NET
from mnist_optuna import checkpoints, devices, studies, training
from mnist_optuna.studies import run_trial
from mnist_optuna.training import Divergence, TrainConfig, l1_penalty, train
from mnist_optuna.workers import TWIN
from models import build_model


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


def test_auto_takes_the_accelerator_there_is_and_a_named_device_is_taken_as_named(monkeypatch):
    import functools

    def answering(function, value):  # torch's own availability check, answering `value` (wrapped: torch reads it)
        return functools.wraps(function)(lambda: value)

    # machines without a GPU, with Apple's MPS only: auto takes what there is, in that order
    monkeypatch.setattr(torch.cuda, "is_available", answering(torch.cuda.is_available, False))
    monkeypatch.setattr(torch.backends.mps, "is_available", answering(torch.backends.mps.is_available, False))
    assert devices.resolve_device("auto").type == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", answering(torch.backends.mps.is_available, True))
    assert devices.resolve_device("auto").type == "mps"
    assert devices.resolve_device("cpu").type == "cpu"  # asked for: even where an accelerator is


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


def learning_rates(small, schedule, epochs=2):
    """The learning rate of every optimizer step of a training, as the optimizer saw it."""
    seen = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append(optimizer.param_groups[0]["lr"]))
    try:
        train(build_model(TINY_NET), small.train_x[:500], small.train_y[:500],
              TrainConfig(epochs=epochs, batch_size=50, lr=1e-2, schedule=schedule, precision="fp32"), seed=0)
    finally:
        hook.remove()
    return seen


def sgd_step(small, **recipe):
    torch.manual_seed(0)
    model = build_model(TINY_NET)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = TrainConfig(epochs=1, batch_size=100, optimizer="sgd", momentum=0.9, lr=0.1, schedule="none",
                      precision="fp32", **recipe)
    train(model, small.train_x[:100], small.train_y[:100], cfg, seed=0)
    return before, dict(model.named_parameters())


def one_step(small, **recipe):
    """(weights before, weights after) of one SGD step on 100 images."""
    torch.manual_seed(0)
    model = build_model(TINY_NET)
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
    weights = {f"{name}.weight" for name, module in build_model(TINY_NET).named_modules()
               if isinstance(module, (nn.Conv2d, nn.Linear))}
    for name, start_value in before.items():
        expected = -0.1 * 1.9 * strength * torch.sign(start_value) if name in weights else torch.zeros_like(start_value)
        assert torch.allclose(with_l1[name].detach() - plain[name].detach(), expected, atol=1e-6), name


def test_augmentation_changes_what_the_model_sees(small):
    seen = {}
    for augment in (False, True):
        torch.manual_seed(0)
        model = build_model(TINY_NET)
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


def test_promise_label_smoothing_is_the_smoothed_cross_entropy(small):
    # a training of one batch reports the loss of that batch before its step: with smoothing 0.1 it must be
    # (1 - 0.1) * NLL + 0.1 * the mean over classes of -log p, computed here by hand from the same weights
    x, y = small.train_x[:100], small.train_y[:100]
    torch.manual_seed(0)
    model = build_model(TINY_NET)
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
        assert training.make_optimizer(build_model(TINY_NET), TrainConfig(optimizer=optimizer, weight_decay=decay)) \
            .param_groups[0]["weight_decay"] == decay


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
