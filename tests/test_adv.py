"""MNIST-optuna-adv.py: the distinct FC grid, its seed lock, resume after a kill, and pruning."""
import json
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from conftest import (
    DATA_DIR,
    QUICK_ADV,
    ROOT,
    TINY_ADV,
    assert_one_line_error,
    load_script,
    run_script,
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


def test_same_seed_same_order_and_values(tmp_path):
    args = [*TINY_ADV, "--fc-depths", "1", "2", "--fc-widths", "8,16", "8", "--no-final"]
    frames = []
    for name in ("a", "b"):
        result = run_script("MNIST-optuna-adv.py", *args, "--seed", "3", "--out-dir", tmp_path / name)
        assert result.returncode == 0, result.stderr
        frames.append(pd.read_csv(tmp_path / name / "trials.csv")[["number", "params_fc", "state", "value"]])
    pd.testing.assert_frame_equal(*frames)
    # the grid is trained in the order of its seed, which another seed changes
    heads = adv.head_grid([1, 2], [[8, 16], [8]])
    assert frames[0].sort_values("number")["params_fc"].astype(str).tolist() == adv.grid_order(heads, 3)
    assert adv.grid_order(heads, 3) != adv.grid_order(heads, 4)


def test_killed_run_resumes_and_finishes_every_network_once(tmp_path):
    out = tmp_path / "run"
    args = [*TINY_ADV, "--fc-depths", "1", "2", "--fc-widths", "8,16,32", "8,16", "--no-final", "--out-dir", out,
            "--data-dir", DATA_DIR]
    worker = subprocess.Popen([sys.executable, str(ROOT / "MNIST-optuna-adv.py"), *map(str, args)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trial_lines = 0
    for line in worker.stdout:
        trial_lines += line.lstrip().startswith("trial")
        if trial_lines == 2:
            break
    time.sleep(0.3)  # let it get into the next trial
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    assert worker.returncode == -signal.SIGKILL

    result = run_script("MNIST-optuna-adv.py", *args[:-2], "--data-dir", DATA_DIR)
    assert result.returncode == 0, result.stderr
    heads = finished(out)["params_fc"].astype(str)
    assert sorted(heads) == sorted(adv.head_grid([1, 2], [[8, 16, 32], [8, 16]]))  # all 9, each once
    rows = len(pd.read_csv(out / "trials.csv"))
    rerun = run_script("MNIST-optuna-adv.py", *args[:-2], "--data-dir", DATA_DIR)
    assert rerun.returncode == 0 and "grid is finished already" in rerun.stdout
    assert len(pd.read_csv(out / "trials.csv")) == rows  # nothing trained again


def test_median_pruner_prunes_a_crippled_network(tmp_path):
    heads = adv.head_grid([1], [[1, 32, 64, 128]])
    # a grid seed that does not put the width-1 network among the trials the pruner waits for
    seed = next(s for s in range(100) if adv.grid_order(heads, s)[-1] == "1")
    out = tmp_path / "prune"
    # two reports per epoch: the pruner may stop a trial at the first, never after the last
    result = run_script("MNIST-optuna-adv.py", *TINY_ADV, "--fc-depths", "1", "--fc-widths", "1,32,64,128",
                        "--median-startup-trials", "1", "--reports-per-epoch", "2", "--seed", seed, "--no-final",
                        "--out-dir", out)
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(out / "trials.csv")
    crippled = frame[frame["params_fc"].astype(str) == "1"]
    assert crippled["state"].tolist() == ["PRUNED"]
    assert "COMPLETE" in frame["state"].tolist()


@pytest.mark.parametrize("content, says", [("{not json", "not valid JSON"), ('{"model": {}}', "no 'model'")])
def test_bad_backbone_file_is_one_line_exit_2(tmp_path, content, says):
    path = tmp_path / "backbone.json"
    path.write_text(content)
    result = run_script("MNIST-optuna-adv.py", "--quick", "--backbone", path, "--out-dir", tmp_path / "out")
    assert says in assert_one_line_error(result)


def test_backbone_from_a_stage_one_run(tmp_path):
    best = {"model": {"conv": [{"channels": 6, "kernel": 5, "slope": 0.1, "batch_norm": True, "pool": True}],
                      "fc": [99], "dropout": 0.3}}
    (tmp_path / "best_params.json").write_text(json.dumps(best))
    conv = adv.backbone_of(adv.build_parser().parse_args(["--backbone", str(tmp_path / "best_params.json")]))
    assert conv == best["model"]["conv"]
