"""MNIST-optuna-adv.py: the distinct FC grid, its seed lock and pruning (resume after a kill: tests/test_resume.py)."""
import json
import re

import pandas as pd
import pytest

from conftest import (
    QUICK_ADV,
    TINY_ADV,
    assert_one_line_error,
    load_script,
    model_test_accuracy,
    run_in_process,
    study_trials,
)


adv = load_script("MNIST-optuna-adv.py")
FINISHED = ("COMPLETE", "PRUNED")


def finished(out_dir):
    frame = pd.read_csv(out_dir / "trials.csv")
    return frame[frame["state"].isin(FINISHED)]


@pytest.mark.parametrize("depths, widths, size", [
    ([1, 2, 3, 4], [[128, 256, 512, 1024, 2048], [256, 512, 1024], [128, 256, 512], [128, 256, 512, 1024]], 245),
    ([1], [[8, 16, 32]], 3),
    ([2], [[8, 16], [4, 8, 16]], 6),
    ([1, 3], [[8], [4, 8], [2, 4]], 1 + 4),
])
def test_grid_holds_each_distinct_network_once(depths, widths, size):
    heads = adv.head_grid(depths, widths)
    assert len(heads) == len(set(heads)) == size


def test_default_constants_give_the_documented_grid():
    assert len(adv.head_grid(adv.FC_DEPTHS, adv.FC_WIDTHS)) == 245


@QUICK_ADV
def test_quick_run_end_to_end(quick_adv_run):
    out, stdout = quick_adv_run
    assert "grid size: 6" in stdout
    assert re.search(r"\d+ complete, \d+ pruned, \d+ failed", stdout)
    assert re.search(r"best trial: val .* conv backbone \+ FC \d+", stdout)
    heads = finished(out)["params_fc"].astype(str)
    assert len(heads) == 6 and heads.is_unique
    # the printed and recorded test accuracy is what model.pt, the best head, scores on the test set
    summary = json.loads((out / "summary.json").read_text())
    accuracy, meta = model_test_accuracy(out)
    assert accuracy == summary["test_accuracy"] == meta["test_accuracy"]
    assert f"test accuracy: {100 * accuracy:.2f} %" in stdout
    best = finished(out).sort_values("value_val_accuracy", ascending=False, kind="stable").iloc[0]
    assert meta["trial"] == summary["best"]["trial"] and summary["best"]["value"] == best["value_val_accuracy"]


def test_same_seed_same_order_and_values(run_here, tmp_path):
    args = [*TINY_ADV, "--fc-depths", "1", "2", "--fc-widths", "8,16", "8", "--no-final"]
    frames = []
    for name in ("a", "b"):
        result = run_here("MNIST-optuna-adv.py", *args, "--seed", "3", "--out-dir", tmp_path / name)
        assert result.returncode == 0, result.stderr
        frames.append(pd.read_csv(tmp_path / name / "trials.csv")[["number", "params_fc", "state", "value_val_accuracy"]])
    pd.testing.assert_frame_equal(*frames)
    # the grid is trained in the order of its seed, which another seed changes
    heads = adv.head_grid([1, 2], [[8, 16], [8]])
    assert frames[0].sort_values("number")["params_fc"].astype(str).tolist() == adv.grid_order(heads, 3)
    assert adv.grid_order(heads, 3) != adv.grid_order(heads, 4)


def test_median_pruner_prunes_a_crippled_network(run_here, tmp_path):
    heads = adv.head_grid([1], [[1, 32, 64, 128]])
    # a grid seed that does not put the width-1 network among the trials the pruner waits for
    seed = next(s for s in range(100) if adv.grid_order(heads, s)[-1] == "1")
    out = tmp_path / "prune"
    # two reports per epoch: the pruner may stop a trial at the first, never after the last
    result = run_here("MNIST-optuna-adv.py", *TINY_ADV, "--fc-depths", "1", "--fc-widths", "1,32,64,128",
                        "--median-startup-trials", "1", "--reports-per-epoch", "2", "--seed", seed, "--no-final",
                        "--out-dir", out)
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(out / "trials.csv")
    crippled = frame[frame["params_fc"].astype(str) == "1"]
    assert crippled["state"].tolist() == ["PRUNED"]
    assert "COMPLETE" in frame["state"].tolist()


@pytest.mark.parametrize("content, says", [("{not json", "not valid JSON"), ('{"model": {}}', "no 'model'")])
def test_bad_backbone_file_is_one_line_exit_2(capsys, tmp_path, content, says):
    path = tmp_path / "backbone.json"
    path.write_text(content)
    result = run_in_process(capsys, "MNIST-optuna-adv.py", "--quick", "--backbone", path, "--out-dir", tmp_path / "out")
    assert says in assert_one_line_error(result)


def test_backbone_from_a_stage_one_run(tmp_path):
    best = {"model": {"conv": [{"channels": 6, "kernel": 5, "slope": 0.1, "batch_norm": True, "pool": True}],
                      "fc": [99], "dropout": 0.3}}
    (tmp_path / "best_params.json").write_text(json.dumps(best))
    conv = adv.backbone_of(adv.build_parser().parse_args(["--backbone", str(tmp_path / "best_params.json")]))
    assert conv == best["model"]["conv"]


def test_a_backbone_that_does_not_fit_is_refused_before_any_trial_and_the_fixed_grid_trains_every_point(run_here, tmp_path):
    out = tmp_path / "run"
    grid = ["--fc-depths", "1", "--fc-widths", "8,16,32", "--no-final", "--no-plots", "--out-dir", out]
    bad = tmp_path / "bad.json"  # five pools do not fit a 28x28 image: refused in one line, before any trial
    bad.write_text(json.dumps({"model": {"conv": [{"channels": 4, "kernel": 3, "pool": True}] * 5, "fc": []}}))
    first = run_here("MNIST-optuna-adv.py", *TINY_ADV[:-2], "--backbone", bad, *grid)
    assert "too many pooling layers" in assert_one_line_error(first)
    assert not (out / "study.journal").exists()  # no failed trial left behind
    fixed = run_here("MNIST-optuna-adv.py", *TINY_ADV, *grid, "--resume-anyway")
    assert fixed.returncode == 0, fixed.stderr
    done = [t.params["fc"] for t in study_trials(out / "study.journal", "mnist-fc-grid")
            if t.state.name in ("COMPLETE", "PRUNED")]
    assert sorted(done) == ["16", "32", "8"]  # every point, the one that failed included


def test_the_grid_order_follows_the_seed():
    adv = load_script("MNIST-optuna-adv.py")
    heads = adv.head_grid([1, 2], [[8, 16, 32], [8, 16]])
    orders = {seed: adv.grid_order(heads, seed) for seed in range(4)}
    assert all(sorted(order) == sorted(heads) for order in orders.values())
    assert len({tuple(order) for order in orders.values()}) == 4
    assert adv.grid_order(heads, 2) == orders[2]
