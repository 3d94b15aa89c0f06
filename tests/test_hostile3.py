"""Input that would silently mean something else, found by a hostile pass: refused in one line before any work."""
import pytest

from conftest import TINY, TINY_CNN, assert_one_line_error, run_in_process


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
