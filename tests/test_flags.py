"""Flags and the one-line errors of values beyond what the libraries take: ranges, steps, splits, lists, budgets."""
import re

import pytest

from conftest import SEARCH, TINY, TINY_CNN, assert_one_line_error, load_script, run_in_process


@pytest.mark.parametrize("script, flags, says", [
    ("MNIST-optuna.py", ["--storage", "postgresql:/host/db"], "lacks '//'"),
    ("MNIST-optuna-adv.py", ["--fc-width", "8"], "unrecognized arguments: --fc-width"),  # not a prefix here
    ("MNIST-optuna.py", ["--seeds", str(2**40)], "--seeds"),
    ("MNIST-optuna.py", ["--lr", "inf"], "--lr"),
    ("MNIST-optuna.py", ["--weight-decay", "nan"], "--weight-decay"),
    ("MNIST-optuna-adv.py", ["--seed", "-1"], "--seed"),
    ("MNIST-optuna.py", ["--out-dir", "/proc/mnist-optuna-out"], "--out-dir"),
])
def test_values_beyond_what_the_libraries_take_are_one_line(capsys, tmp_path, script, flags, says):
    args = ["--quick", *flags] + ([] if "--out-dir" in flags else ["--out-dir", tmp_path / "out"])
    assert says in assert_one_line_error(run_in_process(capsys, script, *args))


def test_the_budget_advice_names_a_budget_that_is_accepted(capsys, tmp_path):
    refused = run_in_process(capsys, "MNIST-optuna.py", *SEARCH, "--max-mmac", "0.01", "--out-dir", tmp_path / "o")
    advised = re.search(r"needs ([0-9.]+) MMAC", assert_one_line_error(refused)).group(1)
    script = load_script("MNIST-optuna.py")
    args = script.build_parser().parse_with_preset([*map(str, SEARCH), "--max-mmac", advised], "--quick", script.QUICK)
    script.validate(args)  # no refusal at the advised budget


@pytest.mark.parametrize("flags, words", [
    (["--conv-filters", "8", "16", "32"], "--conv-filters: step 32 is larger than the range 8..16"),
    (["--fc-width", "64", "128", "100"], "--fc-width: step 100 is larger than the range 64..128"),
])
def test_a_step_past_its_range_is_refused(capsys, tmp_path, flags, words):
    result = run_in_process(capsys, "MNIST-optuna.py", *TINY, *TINY_CNN, *flags, "--out-dir", tmp_path / "o")
    assert words in assert_one_line_error(result)
    assert not (tmp_path / "o").exists()


def test_one_value_as_a_range_is_still_allowed(capsys, tmp_path):
    # LOW = HIGH is one value on purpose: it passes the check (and stops later only at the bad flag after it)
    result = run_in_process(capsys, "MNIST-optuna.py", *TINY, *TINY_CNN, "--conv-filters", "8", "8", "8",
                            "--kernel-sizes", "4", "--out-dir", tmp_path / "o")
    assert "--kernel-sizes must be odd" in assert_one_line_error(result)


@pytest.mark.parametrize("script", ["MNIST-optuna.py", "MNIST-optuna-adv.py"])
@pytest.mark.parametrize("sizes", [["--val-size", "1"], ["--train-subset", "1"], ["--val-size", "99"]])
def test_a_split_too_small_to_score_anything_is_refused(capsys, tmp_path, script, sizes):
    result = run_in_process(capsys, script, *TINY, *sizes, "--out-dir", tmp_path / "o")
    assert "needs at least 100 images" in assert_one_line_error(result)
    assert not (tmp_path / "o").exists()


def test_conv_blocks_given_as_one_json_list_say_how_to_pass_them(capsys, tmp_path):
    result = run_in_process(capsys, "MNIST-optuna-adv.py", *TINY, "--conv-blocks",
                            '[{"channels": 8, "kernel": 3, "pool": true}]', "--out-dir", tmp_path / "o")
    line = assert_one_line_error(result)
    assert "conv block 0 is a list" in line and "one argument per block" in line
