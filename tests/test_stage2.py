"""Beyond stage 1: the optimization-HP search, the ensemble, on-device augmentation, --evaluate."""
import json
import re

import pytest
import torch

from conftest import TINY, TINY_CNN, ROOT, run_script
from data import random_affine


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


def test_stage_two_ensemble_augment_and_evaluate(tmp_path):
    out = tmp_path / "optim"
    result = run_script("MNIST-optuna.py", *TINY, "--stage", "optim", "--seeds", "0", "--n-trials", "3",
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

    evaluated = run_script("MNIST-optuna.py", "--evaluate", out / "model.pt")
    assert evaluated.returncode == 0, evaluated.stderr
    line = evaluated.stdout.strip().splitlines()[-1]
    assert f"test accuracy: {100 * summary['test_accuracy']:.2f} % (with augmentation)" in line
    assert "MMAC/image: 0.1" in line and "parameters:" in line


def test_stage_two_needs_a_backbone(tmp_path):
    result = run_script("MNIST-optuna.py", *TINY, *TINY_CNN, "--stage", "optim", "--out-dir", tmp_path / "x")
    assert result.returncode == 2 and "--backbone" in result.stderr and "Traceback" not in result.stderr
