"""The final recipe: the precision choice, bf16 training, the moving average of the weights, shift TTA."""
import csv
import json

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from conftest import DATA_DIR, QUICK_MAIN, TINY_NET
from mnist_optuna import checkpoints, devices, final, promotion, training
from mnist_optuna.training import TrainConfig, UserError, train
from models import build_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags, expected", [(set(), "fp32"), ({"avx512f", "avx2"}, "fp32"),
                                             ({"avx512f", "avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16")])
def test_auto_chooses_bf16_only_where_the_cpu_has_it(monkeypatch, flags, expected):
    monkeypatch.setattr(devices, "cpu_flags", lambda: set(flags))
    precision, why = devices.resolve_precision("auto", CPU)
    assert precision == expected
    assert why.startswith("auto: ") and ("avx512_bf16" in why or "amx_bf16" in why)
    # an explicit choice is kept whatever the CPU has
    assert devices.resolve_precision("fp32", CPU)[0] == "fp32"
    assert devices.resolve_precision("bf16", CPU)[0] == "bf16"


def test_an_unknown_precision_is_refused():
    with pytest.raises(UserError, match="choose one of auto, fp32, bf16"):
        devices.resolve_precision("fp16", CPU)
    with pytest.raises(UserError, match="precision"):
        TrainConfig(precision="auto")  # a recipe holds what auto resolved to


def test_bf16_trains_in_bf16_and_its_checkpoint_scores_what_it_recorded(small, tmp_path):
    # the same seed and data in both precisions: autocast must change the arithmetic, so the weights differ
    weights = {}
    for precision in ("fp32", "bf16"):
        recipe = TrainConfig(epochs=2, batch_size=50, precision=precision)
        model, _, accuracy, _ = training.retrain_and_test(TINY_NET, recipe, small.train_x, small.train_y, 3,
                                                          (small.val_x, small.val_y), tmp_path / f"{precision}.pt",
                                                          {"mean": small.mean, "std": small.std})
        weights[precision] = model.state_dict()
        assert accuracy > 0.3  # chance is 0.1
    assert not torch.equal(weights["fp32"]["features.0.weight"], weights["bf16"]["features.0.weight"])
    payload = torch.load(tmp_path / "bf16.pt", weights_only=True)
    assert payload["meta"]["precision"] == "bf16" and payload["train"]["precision"] == "bf16"
    # --evaluate scores a bf16 checkpoint in fp32, as its run scored it: the accuracy it recorded
    loaded, _ = checkpoints.load_checkpoint(tmp_path / "bf16.pt")
    assert training.accuracy_on(loaded, small.val_x, small.val_y) == payload["meta"]["test_accuracy"]


class WeightAverage:
    """An exponential moving average of the weights an optimizer steps, kept beside training through torch's
    public hook on every optimizer step: what the saved weights must equal."""

    def __init__(self, decay):
        self.decay, self.average, self.last = decay, None, None

    def __call__(self, optimizer, args, kwargs):
        self.last = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
        if self.average is None:
            self.average = [p.clone() for p in self.last]
        else:
            for average, value in zip(self.average, self.last):
                average.lerp_(value, 1 - self.decay)


def test_the_moving_average_of_the_weights_is_what_is_saved(small, tmp_path):
    recipe = TrainConfig(epochs=2, batch_size=50, ema=0.5)
    steps = len(small.train_y) // 50  # per epoch; the average spans half of one, at most a fifth of all
    beside = WeightAverage(decay=1 - 1 / min(0.5 * steps, 2 * steps / 5))
    handle = register_optimizer_step_post_hook(beside)
    try:
        model, _, _, _ = training.retrain_and_test(TINY_NET, recipe, small.train_x, small.train_y, 5,
                                                   (small.val_x, small.val_y), tmp_path / "ema.pt", {})
    finally:
        handle.remove()
    saved, _ = checkpoints.load_checkpoint(tmp_path / "ema.pt")
    for index, (name, weight) in enumerate(saved.named_parameters()):
        assert torch.allclose(weight, beside.average[index], atol=1e-6), name  # the average is saved ...
        if name.endswith("weight") and weight.dim() > 1:
            assert not torch.allclose(weight, beside.last[index], atol=1e-4), name  # ... not the last weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
    # the averaged weights carry BatchNorm statistics of their own, measured after training
    assert saved.features[1].running_mean.abs().sum() > 0


def test_averaged_weights_get_batchnorm_statistics_of_their_own(small):
    # the running statistics training keeps belong to the last weights (and an average of them to no weights at
    # all: measured 60 % instead of 96 % validation accuracy after one short epoch): the average's are measured
    training.seed_everything(0)
    model = build_model(TINY_NET)
    train(model, small.train_x, small.train_y, TrainConfig(epochs=1, batch_size=50, ema=0.5), 0)
    with torch.no_grad():
        first = model.features[0](small.train_x[:training.BN_IMAGES])  # the conv before the first BatchNorm
    norm = model.features[1]
    assert torch.allclose(norm.running_mean, first.mean((0, 2, 3)), atol=3e-4)
    assert torch.allclose(norm.running_var, first.var((0, 2, 3)), rtol=1e-3)


def test_a_shift_moves_every_pixel_and_fills_with_background():
    x = torch.arange(2 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    right = training.shifted(x, 0, 1, background=-7.0)
    assert torch.equal(right[..., :, 1:], x[..., :, :-1]) and (right[..., :, 0] == -7).all()
    down = training.shifted(x, 1, 0, background=-7.0)
    assert torch.equal(down[..., 1:, :], x[..., :-1, :]) and (down[..., 0, :] == -7).all()
    up_left = training.shifted(x, -1, -1, background=0.0)
    assert torch.equal(up_left[..., :-1, :-1], x[..., 1:, 1:])
    assert training.shifted(x, 0, 0, 0.0) is x


def test_tta_averages_the_softmax_of_the_image_and_its_four_shifts(small):
    training.seed_everything(0)
    model = build_model(TINY_NET).eval()
    x = small.val_x[:64]
    views = [x]
    for shift, dim in ((1, 2), (-1, 2), (1, 3), (-1, 3)):  # rolled, then the wrapped-round line made blank
        view = torch.roll(x, shift, dim)
        view.select(dim, 0 if shift > 0 else -1).fill_(small.background)
        views.append(view)
    with torch.no_grad():
        expected = sum(torch.softmax(model(view.contiguous(memory_format=torch.channels_last)), 1) for view in views) / 5
    got = training.predict_logits(model, x, tta=True, background=small.background).exp()
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(training.predict_logits(model, x).softmax(1), expected, atol=1e-3)


def trial_values(path):
    """(seed, trial number, state, value) of each trial of a trials.csv."""
    with open(path, newline="") as handle:
        return [(row["seed"], row["number"], row["state"], row["value_val_accuracy"]) for row in csv.DictReader(handle)]


@QUICK_MAIN
def test_tta_is_labelled_and_never_changes_the_search(run_here, quick_main_run, tmp_path):
    out, plain_output = quick_main_run
    result = run_here("MNIST-optuna.py", "--quick", "--tta", "--out-dir", tmp_path / "tta", "--no-plots",
                        "--no-onnx")
    assert result.returncode == 0, result.stderr
    # the search's values are the plain validation accuracies, TTA or not
    assert trial_values(tmp_path / "tta" / "trials.csv") == trial_values(out / "trials.csv")
    # TTA scores the promoted networks (on validation) and the final model, and says so
    assert "scored on validation with shift TTA" in result.stdout
    assert "(shift TTA)" in result.stdout.split("test accuracy:")[1].splitlines()[0]
    assert "(shift TTA)" not in plain_output
    summary = json.loads((tmp_path / "tta" / "summary.json").read_text())
    assert summary["tta"] is True and summary["promotion"]["tta"] is True
    evaluated = run_here("MNIST-optuna.py", "--evaluate", tmp_path / "tta" / "model.pt")
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"test accuracy: {100 * summary['test_accuracy']:.2f} % (shift TTA)" in evaluated.stdout
    # the score is the softmax averaged over the image and its four one-pixel shifts, recomputed here by hand
    from mnist_optuna.checkpoints import load_checkpoint
    from mnist_optuna.evaluation import load_test

    model, payload = load_checkpoint(tmp_path / "tta" / "model.pt")
    mean, std = payload["meta"]["mean"], payload["meta"]["std"]
    images, labels = load_test(DATA_DIR, "cpu", mean, std)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), value=-mean / std)  # a blank pixel, normalised
    with torch.no_grad():
        model.eval()
        averaged = sum(torch.softmax(model(padded[:, :, 1 + dy:29 + dy, 1 + dx:29 + dx]), 1)
                       for dy, dx in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)))
    by_hand = (averaged.argmax(1) == labels).float().mean().item()
    assert abs(by_hand - summary["test_accuracy"]) <= 1 / len(labels)  # a tie in float order may flip one image


@QUICK_MAIN
def test_the_run_records_its_precision_in_its_trials_and_checkpoint(quick_main_run):
    out, output = quick_main_run
    precision = json.loads((out / "config.json").read_text())["precision"]
    assert precision in ("fp32", "bf16")
    assert f"precision: {precision} (auto: " in output
    assert torch.load(out / "model.pt", weights_only=True)["train"]["precision"] == precision
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))
    study = optuna.load_study(study_name="mnist-cnn-seed0", storage=storage)
    # like the device, how a trial's arithmetic ran: each trial records it, the study's search does not
    assert {trial.user_attrs["train"]["precision"] for trial in study.trials if "train" in trial.user_attrs} == {
        precision}
    assert "precision" not in study.user_attrs["search"]


def test_final_recipe_takes_the_runs_precision_and_average():
    trial = type("T", (), {"user_attrs": {"train": TrainConfig(epochs=3, precision="fp32").to_dict()}})()
    cfg = final.FinalConfig(epochs=7, promote_epochs=2, ema=0.5, precision="bf16")
    recipe = promotion.final_recipe(trial, cfg)
    assert (recipe.epochs, recipe.precision, recipe.ema) == (7, "bf16", 0.5)
    assert promotion.final_recipe(trial, cfg, cfg.promote_epochs).epochs == 2


def test_a_finished_model_scored_with_tta_on_a_rerun_records_how_it_was_scored(small, tmp_path):
    # a rerun with --tta (a final-stage flag, free to change) reuses the finished model.pt instead of training it
    # again; the file must then say TTA and carry the accuracy the run reports, or --evaluate of it disagrees
    from mnist_optuna.checkpoints import load_checkpoint
    from mnist_optuna.training import retrain_and_test

    cfg, path = TrainConfig(epochs=1, batch_size=50), tmp_path / "model.pt"
    args = (TINY_NET, cfg, small.train_x, small.train_y, 3, (small.val_x, small.val_y), path,
            {"mean": small.mean, "std": small.std})
    retrain_and_test(*args, background=small.background)
    before = load_checkpoint(path)[1]
    assert before["meta"]["tta"] is False
    _, _, shifted, _ = retrain_and_test(*args, background=small.background, tta=True)
    after = load_checkpoint(path)[1]
    assert after["meta"]["tta"] is True and after["meta"]["test_accuracy"] == shifted
    assert after["meta"]["history"] == before["meta"]["history"]  # the same training, not another
    assert all(torch.equal(a, b) for a, b in zip(before["state_dict"].values(), after["state_dict"].values()))
