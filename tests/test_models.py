import random

import pytest
import torch
from torch import nn

from conftest import TINY, assert_one_line_error, run_in_process
from models import ConfigError, build_model, count_macs, count_parameters, dropout_feeds_batchnorm


def block(channels, kernel=3, pool=False, batch_norm=True):
    return {"channels": channels, "kernel": kernel, "slope": 0.05, "batch_norm": batch_norm, "pool": pool}


def test_shapes_and_printed_layers():
    config = {"conv": [block(8, pool=True), block(16, kernel=5, pool=True)], "fc": [32, 16], "dropout": 0.3}
    model = build_model(config)
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    text = str(model)
    for layer in ("Conv2d(1, 8", "Conv2d(8, 16, kernel_size=(5, 5)", "BatchNorm2d(16", "LeakyReLU(negative_slope=0.05)",
                  "MaxPool2d", "Linear(in_features=784, out_features=32", "Dropout(p=0.3"):
        assert layer in text


def test_no_dropout_ever_feeds_a_batchnorm():
    rng = random.Random(0)
    for _ in range(50):
        conv = [block(rng.choice([4, 8]), rng.choice([3, 5]), pool=rng.random() < 0.4, batch_norm=rng.random() < 0.7)
                for _ in range(rng.randint(1, 4))]
        model = build_model({"conv": conv, "fc": [rng.choice([8, 16])] * rng.randint(0, 3),
                             "dropout": rng.choice([0.0, 0.2, 0.5])})
        order = list(model.modules())
        assert not dropout_feeds_batchnorm(order)
        dropouts = [i for i, m in enumerate(order) if isinstance(m, nn.Dropout)]
        norms = [i for i, m in enumerate(order) if isinstance(m, nn.BatchNorm2d)]
        assert not dropouts or not norms or max(norms) < min(dropouts)


def test_the_rule_detects_a_bad_order():
    assert dropout_feeds_batchnorm([nn.Dropout(0.5), nn.Conv2d(1, 1, 3), nn.BatchNorm2d(1)])
    assert not dropout_feeds_batchnorm([nn.Conv2d(1, 1, 3), nn.BatchNorm2d(1), nn.Dropout(0.5)])


def test_parameter_count_and_macs_match_hand_computation():
    config = {"conv": [block(4, kernel=3, pool=True, batch_norm=False)], "fc": [10], "dropout": 0.0}
    model = build_model(config)
    conv_params = 4 * 1 * 9 + 4
    fc_params = (4 * 14 * 14) * 10 + 10 + 10 * 10 + 10
    assert count_parameters(model) == conv_params + fc_params
    assert count_macs(model) == 28 * 28 * 4 * 9 + 4 * 14 * 14 * 10 + 10 * 10


@pytest.mark.parametrize("config, message", [
    ({"fc": []}, "misses conv"),
    ({"conv": [block(4, kernel=4)], "fc": []}, "odd"),
    ({"conv": [block(4)], "fc": [0]}, "positive"),
    ({"conv": [block(4, pool=True)] * 6, "fc": []}, "too many pooling"),
])
def test_bad_configs_are_rejected(config, message):
    with pytest.raises(ConfigError, match=message):
        build_model(config)


def test_a_backbone_with_a_nan_slope_is_one_line_before_any_training(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"conv": [{"channels": 4, "kernel": 3, "slope": NaN, "pool": true}], "fc": []}}')
    result = run_in_process(capsys, "MNIST-optuna-adv.py", "--quick", "--backbone", bad, "--out-dir", tmp_path / "o")
    assert "slope" in assert_one_line_error(result)
    assert not (tmp_path / "o").exists()


def test_a_backbone_of_another_number_of_classes_is_refused(capsys, tmp_path):
    from mnist_optuna.checkpoints import save_checkpoint
    from mnist_optuna.training import TrainConfig
    from models import build_model

    twelve = tmp_path / "twelve.pt"
    save_checkpoint(twelve, build_model({"conv": [{"channels": 4, "kernel": 3, "pool": True}], "fc": [8],
                                         "num_classes": 12}), TrainConfig(), {})
    for script, flags in (("MNIST-optuna.py", ["--stage", "optim"]), ("MNIST-optuna-adv.py", [])):
        result = run_in_process(capsys, script, *TINY, *flags, "--backbone", twelve, "--out-dir", tmp_path / "o")
        assert "classifies 12 classes, MNIST has 10" in assert_one_line_error(result)
    assert not (tmp_path / "o").exists()
