"""The benchmarks still run (at toy sizes; their numbers are only meaningful at full size)."""
import re
import subprocess
import sys

from conftest import DATA_DIR, ROOT


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_pipeline_benchmark_prints_a_ratio():
    result = run("benchmarks/pipeline.py", "--data-dir", DATA_DIR, "--device", "cpu", "--data-images", "3200",
                 "--model-images", "320", "--repeats", "2")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^ratio: \d+\.\dx$", result.stdout, re.MULTILINE)


def test_throughput_benchmark_reports_utilisation():
    # compiling would take minutes: the eager variants only
    result = run("benchmarks/throughput.py", "--device", "cpu", "--batch-sizes", "32", "--images", "64",
                 "--repeats", "1", "--variants", "eager channels_last", "eager contiguous", "--eval-images", "500")
    assert result.returncode == 0, result.stderr
    assert "fp32 matmul peak" in result.stdout and result.stdout.count("%") >= 4
    assert re.search(r"^ratio eager contiguous / eager channels_last: \d+\.\d\dx$", result.stdout, re.MULTILINE)
    assert len(re.findall(r"^evaluation, hand recipe, batch +\d+: plain +\d+ img/s, folded BN +\d+ img/s$",
                          result.stdout, re.MULTILINE)) == 3
    # a ratio where bf16 is native, a reason where it is not: never silence
    assert re.search(r"^bf16/fp32 training ratio: (\d+\.\d\dx \(the CPU has |not measured: bf16 is not native)",
                     result.stdout, re.MULTILINE)


def test_time_to_accuracy_benchmark_compares_the_recipes(tmp_path):
    results = tmp_path / "runs.json"
    # the shipped stage-2 network (10.8 MMAC) rather than the 22-MMAC hand recipe: the same code, half the CI time
    args = ["benchmarks/time_to_accuracy.py", "--networks", "stage2 (shipped)", "--data-dir", DATA_DIR,
            "--device", "cpu", "--seeds", "0",
            "--train-images", "1500", "--val-size", "300", "--old-epochs", "2", "--new-epochs", "1",
            "--results", results]
    result = run(*args)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^old fp32 +\(1 seed\(s\)\): +\d+\.\d s/epoch, 2 epochs", result.stdout, re.MULTILINE)
    assert re.search(r"^new fp32 +\(1 seed\(s\)\): +\d+\.\d s/epoch, 1 epochs", result.stdout, re.MULTILINE)
    assert re.search(r"^ratio new fp32 time to the target / old fp32 training: (\d+\.\d\dx|n/a)", result.stdout,
                     re.MULTILINE)
    assert "test accuracy" in result.stdout and "shift TTA" in result.stdout
    # a rerun with the same results file trains nothing again and reports the same
    again = run(*args)
    assert again.returncode == 0 and " seed 0: val " not in again.stdout
    header = "==== stage2 (shipped) ===="
    assert header in result.stdout and again.stdout.split(header)[1] == result.stdout.split(header)[1]


def test_coordination_benchmark_runs_the_projects_calls_and_prints_the_ratio():
    result = run("benchmarks/coordination.py", "--trials", "120", "--workers", "8")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^120 trials, 8 open at once, 3 reports each, journal storage", result.stdout, re.MULTILINE)
    assert re.search(r"^ratio per report at 100-199 trials / at 0-99: \d+\.\d\dx   \(without Optuna's list of the "
                     r"trials: \d+\.\d\dx; per trial: \d+\.\d\dx\)$", result.stdout, re.MULTILINE)
