"""`python -m mnist_optuna workers N -- COMMAND`: N workers of a script on one machine against one storage, one per GPU
or a share of the cores each; every trial trained once, one final stage; Ctrl-C stops them all and the study
resumes."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DATA_DIR, LONG, ROOT, TINY, TINY_CNN, assert_one_line_error, study_trials, trained_networks
from mnist_optuna import launch

pytestmark = pytest.mark.timeout(600)


def launcher(n, *command, restarts=2):
    return [sys.executable, "-m", "mnist_optuna", "workers", str(n), "--restarts", str(restarts), "--",
            sys.executable, str(ROOT / "MNIST-optuna.py"), *map(str, command), "--data-dir", str(DATA_DIR)]


def test_one_worker_per_gpu_and_on_a_cpu_a_share_of_the_cores_each(monkeypatch):
    assert launch.placements(4, ["0", "1"], 16) == [{"CUDA_VISIBLE_DEVICES": gpu} for gpu in ("0", "1", "0", "1")]
    assert launch.placements(2, ["3", "5", "7"], 16) == [{"CUDA_VISIBLE_DEVICES": "3"}, {"CUDA_VISIBLE_DEVICES": "5"}]
    assert launch.placements(4, [], 16) == [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "4"}] * 4
    assert launch.placements(4, [], 2) == [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}] * 4
    # the GPUs a machine shows: CUDA_VISIBLE_DEVICES when it is set, else every device torch counts
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert launch.visible_gpus() == ["2", "3"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    import torch
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert launch.visible_gpus() == ["0", "1", "2"]


@pytest.mark.parametrize("argv, says", [
    (["4", "python", "MNIST-optuna.py"], "after --"),
    (["4", "--"], "is empty"),
    (["4", "--", "python", "MNIST-optuna.py", "--quick"], "add --storage"),
    (["0", "--", "python", "MNIST-optuna.py", "--storage", "x.journal"], "an integer >= 1"),
])
def test_a_launch_without_a_shared_storage_or_a_command_is_one_line(argv, says):
    result = subprocess.run([sys.executable, "-m", "mnist_optuna", "workers", *argv], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert says in assert_one_line_error(result)


@LONG
def test_workers_share_one_search_a_dead_one_is_restarted_each_network_trains_once_and_one_runs_the_final_stage(
        tmp_path):
    journal, out = tmp_path / "study.journal", tmp_path / "runs"
    command = [*TINY, *TINY_CNN, "--train-subset", "3000", "--epochs", "2", "--seeds", "0", "--n-trials", "2",
               "--no-plots", "--storage", journal, "--out-dir", out]
    process = subprocess.Popen(launcher(2, *command), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    log, deadline = out / "worker-0.log", time.monotonic() + 300
    while time.monotonic() < deadline and not (log.is_file() and " trial " in log.read_text()):
        time.sleep(0.2)
    (victim,) = processes_with(f"--out-dir {out / 'worker-0'}")
    # a worker dies as a machine's OOM killer would end it: while it trains (a kill in the milliseconds it holds the
    # journal's lock would make every worker wait Optuna's 30 s for the lock, a cost this test does not measure)
    training = f"{socket.gethostname()}:{victim}"
    while time.monotonic() < deadline and Path(f"/proc/{victim}").exists() and not any(
            t.state.name == "RUNNING" and t.user_attrs.get("worker") == training and "model" in t.user_attrs
            for t in study_trials(journal)):
        time.sleep(0.05)
    time.sleep(0.1)  # past the journal writes that start the training
    os.kill(victim, signal.SIGKILL)
    output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output
    assert "no GPU: " in output and "1 thread(s) per worker" in output
    assert "worker 0 ended with exit code -9; starting it again (start 2 of 3)" in output
    assert len(trained_networks(journal, "mnist-cnn-seed0")) == 4  # 2 workers x 2 trials, the lost one retried
    summaries = [json.loads((out / f"worker-{k}" / "summary.json").read_text()) for k in range(2)]
    ran = [k for k, summary in enumerate(summaries) if not summary.get("final_stage_by")]
    assert len(ran) == 1 and f"final stage: worker {ran[0]}" in output and str(out / f"worker-{ran[0]}") in output
    for k in range(2):  # each worker with its share of the two cores, and on no GPU
        assert "device: cpu (1 threads)" in (out / f"worker-{k}.log").read_text()


@LONG
def test_ctrl_c_stops_every_worker_and_the_same_command_resumes(tmp_path):
    journal, out = tmp_path / "study.journal", tmp_path / "runs"
    command = [*TINY, *TINY_CNN, "--train-subset", "3000", "--epochs", "2", "--seeds", "0", "--n-trials", "2",
               "--no-final", "--storage", journal, "--out-dir", out]
    process = subprocess.Popen(launcher(2, *command), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline = time.monotonic() + 300
    logs = [out / f"worker-{k}.log" for k in range(2)]
    while time.monotonic() < deadline and process.poll() is None:
        if all(log.is_file() and " trial " in log.read_text() for log in logs):
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "run the same command again to resume" in output
    assert len(trained_networks(journal, "mnist-cnn-seed0")) < 4  # the workers stopped, not finished
    again = subprocess.run(launcher(2, *command), cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(trained_networks(journal, "mnist-cnn-seed0")) == 4  # 2 workers x 2, each once


def processes_with(text):
    """The pids of this machine's processes whose command line holds `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found
