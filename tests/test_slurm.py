"""deploy/slurm/workers.sbatch on a real SLURM: a one-node cluster that .ci/run starts (deploy/slurm/local-cluster.sh)
runs a job array of workers against PostgreSQL; every network trains once and one task runs the final stage."""
import json
import os
import re
import subprocess
import time
import uuid

import pytest

from conftest import DATA_DIR, GRID, GRID_HEADS, LONG, ROOT, TINY_ADV, postgres_or_skip, trained_networks

SBATCH = ROOT / "deploy" / "slurm" / "workers.sbatch"


def slurm_or_skip():
    conf = os.environ.get("MNIST_OPTUNA_SLURM")
    if conf:
        return conf
    if os.environ.get("MNIST_OPTUNA_SLURM_UNAVAILABLE"):  # .ci/run tried and could not (the reason, in the summary)
        pytest.skip(os.environ["MNIST_OPTUNA_SLURM_UNAVAILABLE"])
    if os.environ.get("CI"):
        pytest.fail("CI must provide SLURM: .ci/run starts deploy/slurm/local-cluster.sh and sets MNIST_OPTUNA_SLURM")
    pytest.skip("no SLURM here: deploy/slurm/local-cluster.sh start DIR, then MNIST_OPTUNA_SLURM=DIR/slurm.conf")


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}


def wait_for_array(job, conf, timeout=300):
    """{task: (state, exit code)} once every task of the array ended (polled here: `sbatch --wait` looks only every
    so many seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30,
                               env={**os.environ, "SLURM_CONF": conf}).stdout
        tasks = {int(task): (state, code) for task, state, code in re.findall(
            r"ArrayTaskId=(\d+) .*?JobState=(\w+) .*?ExitCode=(\S+)", shown, re.DOTALL)}
        if tasks and all(state in FINAL_STATES for state, _ in tasks.values()):
            return tasks
        time.sleep(0.2)
    raise AssertionError(f"the array job {job} did not end within {timeout} s:\n{shown}")


@LONG
def test_a_job_array_of_four_workers_searches_once_and_runs_one_final_stage(tmp_path):
    conf, storage = slurm_or_skip(), postgres_or_skip()
    name, out = f"slurm-{uuid.uuid4().hex[:8]}", tmp_path / "runs"
    env = {"MNIST_OPTUNA_STORAGE": storage, "MNIST_OPTUNA_SCRIPT": "MNIST-optuna-adv.py",
           "MNIST_OPTUNA_OUT": str(out), "MNIST_DATA_DIR": str(DATA_DIR)}
    result = subprocess.run(
        ["sbatch", "--parsable", "--array=0-3", "--cpus-per-task=1", f"--output={tmp_path}/task-%a.log",
         str(SBATCH), *TINY_ADV, *GRID, "--study-name", name],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "SLURM_CONF": conf, **env})
    assert result.returncode == 0, result.stderr
    tasks = wait_for_array(result.stdout.strip(), conf)
    logs = "\n".join(f"--- task {k}\n" + (tmp_path / f"task-{k}.log").read_text()
                     for k in range(4) if (tmp_path / f"task-{k}.log").exists())
    assert tasks == {k: ("COMPLETED", "0:0") for k in range(4)}, logs
    job = result.stdout.strip()
    for k in range(4):  # each task one worker of the array, in its own run folder, with its one CPU's thread
        assert f"worker {k} of array job {job} on " in logs and f"run folder {out}/worker-{k}" in logs
        assert "device: cpu (1 threads)" in (tmp_path / f"task-{k}.log").read_text()
    networks = trained_networks(storage, name)  # fails on a configuration trained twice
    assert sorted(dict(key)["fc"] for key in networks) == sorted(GRID_HEADS)
    assert all(state == "COMPLETE" for state, _ in networks.values())
    summaries = [json.loads((out / f"worker-{k}" / "summary.json").read_text()) for k in range(4)]
    ran = [k for k, summary in enumerate(summaries) if not summary.get("final_stage_by")]
    assert len(ran) == 1 and (out / f"worker-{ran[0]}" / "model.pt").is_file(), summaries
    assert all(summary.get("final_stage_by") for k, summary in enumerate(summaries) if k != ran[0])


@pytest.mark.parametrize("env, says", [
    ({"SLURM_ARRAY_TASK_ID": ""}, "submit this as an array: sbatch --array=0-N"),
    ({"SLURM_ARRAY_TASK_ID": "0", "MNIST_OPTUNA_STORAGE": ""}, "set MNIST_OPTUNA_STORAGE"),
])
def test_the_array_script_run_wrongly_says_what_to_do_in_one_line(tmp_path, env, says):
    result = subprocess.run(["bash", str(SBATCH)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SLURM_ARRAY_JOB_ID": "7", **env})
    assert result.returncode == 2 and says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
