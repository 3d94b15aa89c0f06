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
