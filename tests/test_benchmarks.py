"""The benchmarks still run (at toy sizes; their numbers are only meaningful at full size)."""
import re
import subprocess
import sys

from conftest import DATA_DIR, LONG, ROOT


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_pipeline_benchmark_prints_a_ratio(capsys):
    import pipeline  # in this process (its main()): no new Python to start

    pipeline.main(["--data-dir", str(DATA_DIR), "--device", "cpu", "--data-images", "3200", "--model-images", "320",
                   "--repeats", "2"])
    assert re.search(r"^ratio: \d+\.\dx$", capsys.readouterr().out, re.MULTILINE)


def test_members_benchmark_times_both_ways_and_prints_their_ratio(capsys):
    import torch

    import members  # in this process (its main()); the side-by-side members are processes of their own

    threads = torch.get_num_threads()
    try:
        members.main(["--network", "adv backbone + FC 512", "--train-images", "1000", "--threads", "2",
                      "--data-dir", str(DATA_DIR)])
    finally:  # main() sets the thread count of this process, which the tests after this one rely on
        torch.set_num_threads(threads)
    output = capsys.readouterr().out
    serial = float(re.search(r"^one after another, \d+ thread\(s\) each: ([\d.]+) s$", output, re.M).group(1))
    both = re.search(r"^side by side, \d+ thread\(s\) each: ([\d.]+) s \(their training alone: ([\d.]+) s, ([\d.]+) s;",
                     output, re.M)
    assert both, output
    wall, own = float(both.group(1)), [float(both.group(2)), float(both.group(3))]
    assert max(own) <= wall  # each member's own training lies inside the side-by-side wall time
    ratio = float(re.search(r"^ratio side by side / one after another: ([\d.]+)x$", output, re.M).group(1))
    assert abs(ratio - wall / serial) <= 0.005 + wall / serial * (0.05 / wall + 0.05 / serial)  # (printed to 0.1 s)


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


def test_time_to_accuracy_benchmark_compares_the_recipes(capsys, tmp_path):
    import time_to_accuracy  # in this process (its main())

    results = tmp_path / "runs.json"
    # the adv script's backbone (1.8 MMAC) rather than the 22-MMAC hand recipe: the same code, a fraction of the time
    args = ["--networks", "adv backbone + FC 512", "--data-dir", str(DATA_DIR), "--device", "cpu", "--seeds", "0",
            "--train-images", "1500", "--val-size", "300", "--old-epochs", "2", "--new-epochs", "1",
            "--results", str(results)]
    time_to_accuracy.main(args)
    output = capsys.readouterr().out
    assert re.search(r"^old fp32 +\(1 seed\(s\)\): +\d+\.\d s/epoch, 2 epochs", output, re.MULTILINE)
    assert re.search(r"^new fp32 +\(1 seed\(s\)\): +\d+\.\d s/epoch, 1 epochs", output, re.MULTILINE)
    assert re.search(r"^ratio new fp32 time to the target / old fp32 training: (\d+\.\d\dx|n/a)", output,
                     re.MULTILINE)
    assert "test accuracy" in output and "shift TTA" in output
    # a rerun with the same results file trains nothing again and reports the same
    time_to_accuracy.main(args)
    again = capsys.readouterr().out
    assert " seed 0: val " not in again
    header = "==== adv backbone + FC 512 ===="
    assert header in output and again.split(header)[1] == output.split(header)[1]


def test_coordination_benchmark_runs_the_projects_calls_and_prints_the_ratio():
    result = run("benchmarks/coordination.py", "--trials", "120", "--workers", "8")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^120 trials, 8 open at once, 3 reports each, journal storage", result.stdout, re.MULTILINE)
    assert re.search(r"^ratio per report at 100-199 trials / at 0-99: \d+\.\d\dx   \(without Optuna's list of the "
                     r"trials: \d+\.\d\dx; per trial: \d+\.\d\dx\)$", result.stdout, re.MULTILINE)


@LONG
def test_fidelity_and_search_quality_benchmarks_measure_what_they_print(capsys, tmp_path):
    # in this process (the benchmarks' main()), which spares a new Python per run
    import json

    import pytest

    from errors import UserError
    from mnist_optuna.promotion import spearman
    from mnist_optuna.scores import unpack_correct

    import fidelity as fidelity_benchmark
    import search_quality as quality_benchmark

    def run_main(module, *args):
        module.main([*map(str, args)])
        return capsys.readouterr().out

    fidelity = tmp_path / "fidelity.json"
    args = ["--quick", "--data-dir", DATA_DIR, "--device", "cpu", "--results", fidelity]
    output = run_main(fidelity_benchmark, *args)
    stored = json.loads(fidelity.read_text())
    names = list(stored["settings"]["recipes"])
    assert len(stored["settings"]["networks"]) == 3 and len(names) == 5 and names[-1] == "final"
    # every candidate once, the final fidelity twice, for each network; each with the images it got right
    assert len(stored["runs"]) == 3 * (len(names) + 1)
    for run_ in stored["runs"].values():
        correct = unpack_correct(run_["correct"], run_["images"])
        assert abs(correct.mean() - run_["accuracy"]) < 1e-6 and run_["nll"] > 0
    # the printed rho of today's trial fidelity is Spearman's of the stored scores against the mean final accuracy
    final = [sum(stored["runs"][json.dumps(["final", net, seed])]["accuracy"] for seed in (0, 1)) / 2
             for net in range(3)]
    trial = [stored["runs"][json.dumps([names[0], net, 0])]["accuracy"] for net in range(3)]
    rho = spearman(trial, final)
    line = next(line for line in output.splitlines() if line.startswith(names[0]))
    assert line.split()[len(names[0].split())] == f"{rho:+.2f}"
    assert re.search(r"^fidelity: most rank correlation per training second: .+, rho [+-]\d\.\d\d at \d+ CPU s per trial; "
                     r"noise ceiling [+-]\d\.\d\d \(3 networks\)$", output, re.MULTILINE)
    again = run_main(fidelity_benchmark, *args)  # a rerun trains nothing and prints the same table
    assert " seed 0: val " not in again
    assert again.split("==== fidelity")[1] == output.split("==== fidelity")[1]

    quality = tmp_path / "quality.json"
    output = run_main(quality_benchmark, "--quick", "--pairs", "0", "1", "--random-draws", "3", "--data-dir",
                      DATA_DIR, "--device", "cpu", "--fidelity-results", fidelity, "--results", quality)
    held = json.loads(quality.read_text())
    choice = held["search"]["0 1"]
    # the search arm is the promotion's choice, and trained at the final fidelity twice
    assert re.search(rf"chosen by the rule: .*trial {choice['trial']}", output) and len(choice["finals"]) == 2
    assert "random: 3 of 3 draws have their 2 final runs" in output
    margin = re.search(r"^search vs random: ([+-]\d+\.\d{3}) \+- (nan|\d+\.\d{3}) points of final validation accuracy "
                       r"\(1 study seed pair\(s\), 3 random draws", output, re.MULTILINE)
    assert margin, output
    assert output.strip().splitlines()[-1].startswith("search vs random: ")  # the run's summary line comes last
    search_mean = sum(r["accuracy"] for r in choice["finals"].values()) / 2
    random_mean = sum(final) / 3  # the random arm is the fidelity benchmark's final runs
    assert float(margin.group(1)) == round(100 * (search_mean - random_mean), 3)
    assert re.search(r"^search vs hand: [+-]\d+\.\d{3} \+- ", output, re.MULTILINE)
    # another final recipe against the same fidelity file: refused before anything trains
    with pytest.raises(UserError, match="another final recipe, data or sizes"):
        run_main(quality_benchmark, "--quick", "--train-images", "1500", "--data-dir", DATA_DIR,
                 "--fidelity-results", fidelity, "--results", tmp_path / "other.json")
    assert not (tmp_path / "other.json").exists()
