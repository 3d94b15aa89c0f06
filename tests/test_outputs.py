"""What a run leaves for people: plots, ONNX with a parity check, progress bars only on a terminal, the dashboard."""
import fcntl
import json
import os
import pty
import re
import shutil
import socket
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from conftest import (
    DATA_DIR,
    QUICK_ADV,
    QUICK_MAIN,
    ROOT,
    SEARCH,
    TINY,
    TINY_ADV,
    TINY_CNN,
    load_script,
    run_in_process,
)
from mnist_optuna import checkpoints
from mnist_optuna.evaluation import load_test

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@QUICK_ADV
def test_plots_are_valid_pngs(quick_adv_run):
    out, _ = quick_adv_run
    pngs = sorted((out / "plots").glob("*.png"))
    assert len(pngs) >= 3
    for path in pngs:
        content = path.read_bytes()
        assert content.startswith(PNG_SIGNATURE) and len(content) > 5_000, path
    assert (out / "plots" / "final_training.png").is_file()


@QUICK_ADV
def test_onnx_model_matches_pytorch(quick_adv_run, data_dir):
    # computed here with ONNX Runtime, not read from the run's own parity line
    import numpy as np
    import onnxruntime
    import torch

    from mnist_optuna.evaluation import load_test
    from mnist_optuna.checkpoints import load_checkpoint

    out, _ = quick_adv_run
    model, payload = load_checkpoint(out / "model.pt")
    images = load_test(data_dir, torch.device("cpu"), payload["meta"]["mean"], payload["meta"]["std"])[0][:300]
    model.eval()
    with torch.no_grad():
        expected = model(images.contiguous()).numpy()
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": images.contiguous().numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4 and (got.argmax(1) == expected.argmax(1)).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["onnx_max_abs_diff"] < 1e-4 and summary["onnx_label_agreement"] == 1.0


@QUICK_ADV
def test_backbone_accepts_a_checkpoint(quick_adv_run, run_here, tmp_path):
    out, _ = quick_adv_run
    result = run_here("MNIST-optuna-adv.py", *TINY_ADV[:-2], "--backbone", out / "model.pt", "--fc-depths", "1",
                      "--fc-widths", "8", "--no-final", "--out-dir", tmp_path / "chained")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "chained" / "best_params.json").read_text())
    assert config["model"]["conv"] == json.loads((out / "best_params.json").read_text())["model"]["conv"]


def run_in_terminal(args, timeout=300):
    """Run a script with stdout on a pseudo-terminal, as in an interactive shell; return all it wrote."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # 30 rows, 100 columns
    worker = subprocess.Popen([sys.executable, str(ROOT / "MNIST-optuna-adv.py"), *map(str, args)], cwd=ROOT,
                              stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closes when the process ends
            break
        if not chunk:
            break
        chunks.append(chunk)
    worker.wait(timeout=30)
    os.close(controller)
    return worker.returncode, b"".join(chunks).decode(errors="replace")


def test_progress_bars_only_on_a_terminal(run_here, tmp_path):
    args = [*TINY_ADV, "--fc-depths", "1", "--fc-widths", "8,16", "--final-epochs", "2", "--data-dir", DATA_DIR]
    code, screen = run_in_terminal([*args, "--out-dir", tmp_path / "tty"])
    assert code == 0, screen
    assert "grid seed 0 trials:" in screen and "final epochs:" in screen
    piped = run_here("MNIST-optuna-adv.py", *args, "--out-dir", tmp_path / "pipe")  # output not to a terminal
    assert piped.returncode == 0
    written = piped.stdout + piped.stderr
    assert "grid seed 0 trials:" not in written and "final epochs:" not in written and "\r" not in written


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@QUICK_ADV
def test_dashboard_lists_the_study(quick_adv_run):
    out, _ = quick_adv_run
    port = free_port()
    executable = shutil.which("optuna-dashboard") or str(Path(sys.executable).with_name("optuna-dashboard"))
    dashboard = subprocess.Popen([executable, str(out / "study.journal"),
                                  "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, body = time.time() + 60, None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    body = json.loads(response.read())
            except OSError:
                if dashboard.poll() is not None:
                    pytest.fail("optuna-dashboard exited: " + dashboard.stdout.read())
                time.sleep(0.5)
        assert body is not None, "optuna-dashboard did not answer within 60 s"
        assert [study["study_name"] for study in body["study_summaries"]] == ["mnist-fc-grid"]
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)


def test_a_finished_run_leaves_no_temporary_files(run_here, tmp_path):
    out = tmp_path / "run"
    assert run_here("MNIST-optuna.py", *SEARCH, "--ensemble", "2", "--out-dir", out).returncode == 0
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_an_interrupted_write_leaves_the_previous_file(tmp_path, monkeypatch):
    from mnist_optuna import rundir

    path = tmp_path / "summary.json"
    rundir.write_json(path, {"old": 1})

    def crash(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(rundir.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        rundir.write_json(path, {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1} and list(tmp_path.iterdir()) == [path]


def test_the_same_command_twice_at_once_in_one_folder_runs_once(run_here, tmp_path):
    import subprocess
    import sys

    from conftest import DATA_DIR, ROOT

    out = tmp_path / "twice"
    command = [sys.executable, str(ROOT / "MNIST-optuna.py"), *TINY, *TINY_CNN, "--seeds", "0", "--n-trials", "2",
               "--no-plots", "--out-dir", str(out), "--data-dir", str(DATA_DIR)]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the second starts once the first holds the folder (its config.json is written right after the lock)
    import time
    deadline = time.monotonic() + 120
    while not (out / "config.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    output, errors = first.communicate(timeout=300)
    assert first.returncode == 0, errors
    assert second.returncode == 2 and "another run is using --out-dir" in second.stderr, second.stderr
    assert len([line for line in second.stderr.splitlines() if line.strip()]) == 1
    rows = (out / "trials.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == 2  # --n-trials 2, trained once
    # and once the first has ended, the same command in the folder resumes as always
    again = run_here("MNIST-optuna.py", *TINY, *TINY_CNN, "--seeds", "0", "--n-trials", "2", "--out-dir", out)
    assert again.returncode == 0, again.stderr


def test_a_publish_killed_half_way_is_finished_by_the_next_run_before_it_reads_the_folder(capsys, tmp_path):
    import json

    from mnist_optuna.rundir import PUBLISHING, STAGING

    out = tmp_path / "run"
    args = [*TINY, *TINY_CNN, "--seeds", "0", "--n-trials", "2", "--promote", "0", "--out-dir", out]
    assert run_in_process(capsys, "MNIST-optuna.py", *args, "--final-seeds", "2").returncode == 0
    # a later stage (one seed) killed while its files moved: model.pt is already the new one, the rest is not
    staging = out / STAGING
    staging.mkdir()
    for name, text in (("model.pt", b"new model"), ("summary.json", b'{"stage": "new"}'),
                       ("best_params.json", b'{"stage": "new"}')):
        (staging / name).write_bytes(text)
    (staging / PUBLISHING).write_text(json.dumps({"names": ["best_params.json", "model.pt", "summary.json"],
                                                  "previous": ["seed-1.pt"]}))
    (staging / "model.pt").replace(out / "model.pt")  # the one move done before the kill
    assert (out / "seed-1.pt").exists() and json.loads((out / "summary.json").read_text()).get("stage") != "new"
    # the next run in the folder finishes the moves first, before it reads anything
    again = run_in_process(capsys, "MNIST-optuna.py", *args, "--retrain-only", "--no-final")
    assert again.returncode == 0, again.stderr
    assert "the move is finished" in again.stdout + again.stderr
    assert (out / "model.pt").read_bytes() == b"new model" and not (out / "seed-1.pt").exists()
    assert not staging.exists()


def test_finish_publish_completes_every_move_once(tmp_path):
    import json

    from mnist_optuna.rundir import PUBLISHING, STAGING, finish_publish

    staging = tmp_path / STAGING
    staging.mkdir()
    (tmp_path / "summary.json").write_text("old")
    (tmp_path / "ensemble-1.pt").write_text("old member")
    (staging / "summary.json").write_text("new")
    (staging / ".lock").write_text("")
    (staging / PUBLISHING).write_text(json.dumps({"names": ["summary.json", "model.pt"],
                                                  "previous": ["ensemble-1.pt"]}))
    (tmp_path / "model.pt").write_text("new model")  # moved before the kill
    assert finish_publish(tmp_path)
    assert (tmp_path / "summary.json").read_text() == "new" and (tmp_path / "model.pt").read_text() == "new model"
    assert not (tmp_path / "ensemble-1.pt").exists() and not staging.exists()
    assert not finish_publish(tmp_path)  # nothing left to finish


@QUICK_MAIN
def test_onnx_file_gives_the_logits_of_model_pt(quick_main_run, data_dir):
    import onnxruntime

    out, _ = quick_main_run
    model, payload = checkpoints.load_checkpoint(out / "model.pt")
    images, _ = load_test(data_dir, torch.device("cpu"), payload["meta"]["mean"], payload["meta"]["std"])
    images = images[:500].contiguous()
    model.eval()
    with torch.no_grad():
        expected = model(images).numpy()
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": images.numpy()})[0]
    assert got.shape == (500, 10) and np.abs(got - expected).max() < 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()


@QUICK_MAIN
def test_promise_the_run_records_what_ran(quick_main_run):
    out, _ = quick_main_run
    script = load_script("MNIST-optuna.py")
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == script.LR and config["seeds"] == script.QUICK.get("SEEDS", script.SEEDS)
    assert config["precision"] in ("fp32", "bf16") and "--quick" in config["command"]
    model, payload = checkpoints.load_checkpoint(out / "model.pt")
    best = json.loads((out / "best_params.json").read_text())
    meta = payload["meta"]
    assert payload["config"] == best["model"] and payload["train"]["lr"] == script.LR
    assert meta["seed"] == best["seed"] and meta["trial"] == best["trial"] and meta["study_seed"] == best["study_seed"]
    assert meta["train_images"] == script.QUICK["FINAL_SUBSET"] and meta["source"] == config["source"]
    assert meta["command"] == config["command"] and meta["precision"] == config["precision"]
    summary = json.loads((out / "summary.json").read_text())
    assert meta["test_accuracy"] == summary["test_accuracy"] and len(meta["history"]) == script.QUICK["FINAL_EPOCHS"]


def test_the_plots_draw_the_runs_studies_and_its_final_training_curves(tmp_path, monkeypatch):
    from mnist_optuna import plots

    drawn, figures = {}, []

    def spy(name, real):
        def draw(studies, **kwargs):
            drawn[name] = (studies, kwargs)
            return real(studies, **kwargs)
        return draw
    monkeypatch.setattr(plots, "SEARCH_PLOTS", {name: spy(name, real) for name, real in plots.SEARCH_PLOTS.items()})
    subplots = plots.plt.subplots
    monkeypatch.setattr(plots.plt, "subplots", lambda *a, **k: figures.append(subplots(*a, **k)) or figures[-1])

    def study(objectives, seed):
        made = optuna.create_study(directions=["maximize"] + ["minimize"] * (objectives - 1),
                                   sampler=optuna.samplers.RandomSampler(seed))
        for _ in range(6):
            trial = made.ask()
            width = trial.suggest_int("width", 1, 100)
            rate = trial.suggest_float("rate", 0.0, 1.0)
            for step in (1, 2) if objectives == 1 else ():  # Optuna takes reports of one objective only
                trial.report(width / 100 * step / 2, step)
            made.tell(trial, [width / 100 + rate / 10, float(width)][:objectives])
        return made

    history = [{"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.90, "val_accuracy": 0.95},
               {"epoch": 2, "train_loss": 0.3, "train_accuracy": 0.96, "val_accuracy": 0.97}]
    searched = [study(1, 0), study(1, 1)]
    (tmp_path / "one").mkdir(), (tmp_path / "front").mkdir()
    written = plots.write_plots(tmp_path / "one", searched, searched[1], final_history=history)
    assert {path.name for path in written} == {f"{name}.png" for name in plots.SEARCH_PLOTS} | {"final_training.png"}
    assert drawn["optimization_history"][0] == searched  # the history of every study of the run
    assert all(drawn[name][0] is searched[1] for name in plots.SEARCH_PLOTS if name != "optimization_history")
    _, (loss, accuracy) = figures[-1]  # the final curves, drawn last: the history's own numbers, per epoch
    assert list(loss.lines[0].get_xdata()) == [1, 2] and list(loss.lines[0].get_ydata()) == [0.5, 0.3]
    assert [list(line.get_ydata()) for line in accuracy.lines] == [[90.0, 96.0], [95.0, 97.0]]
    # a Pareto front: its plot, accuracy as the other plots' target, and no intermediate values (never pruned)
    drawn.clear()
    front = study(2, 2)
    front.set_metric_names(["val_accuracy", "mmac"])  # as the run names them
    written = plots.write_plots(tmp_path / "front", [front], front, front_study=front)
    assert "pareto_front.png" in {path.name for path in written} and "intermediate_values" not in drawn
    trial = front.trials[0]
    assert drawn["param_importances"][1]["target"](trial) == trial.values[0]


def test_the_closing_time_line_puts_each_phase_beside_its_estimate():
    from mnist_optuna.reporting import PhaseTimes

    phases = PhaseTimes()
    phases.estimate("search", 600, at_most=True)
    phases.took("search", 30)
    phases.estimate("promotion", 50)
    phases.took("promotion", 20)
    phases.took("promotion", 25)  # a phase timed in parts adds up
    phases.estimate("final trainings", 100)  # announced but never reached (a stop): not listed as if it ran
    line = phases.line()
    assert line.startswith("time by phase: search 30 s (estimated at most 10 min), promotion 45 s (estimated "
                           "50 s); the whole run "), line


@QUICK_MAIN
def test_a_run_ends_with_the_time_of_each_phase_beside_its_estimate(quick_main_run):
    out, output = quick_main_run
    (line,) = [line for line in output.splitlines() if line.startswith("time by phase: ")]
    phases = re.findall(r"(\w[\w ]*?) (\d+(?:\.\d)?) (s|min)(?: \(estimated (?:at most )?[\d.]+ (?:s|min)\))?(?:, |;)",
                        line.split(": ", 1)[1])
    assert [name for name, _, _ in phases] == ["search", "promotion", "final trainings", "plots"], line
    assert "search" in line and "(estimated at most " in line and "promotion" in line
    wall = float(re.search(r"^search wall time: ([\d.]+) s$", output, re.MULTILINE).group(1))
    search = float(phases[0][1]) * (60 if phases[0][2] == "min" else 1)
    assert abs(search - wall) <= 0.5 + 0.05 * wall  # the search's own clock, rounded
    whole = re.search(r"the whole run (\d+(?:\.\d)?) (s|min)$", line)
    total = float(whole.group(1)) * (60 if whole.group(2) == "min" else 1)
    assert total >= sum(float(t) * (60 if unit == "min" else 1) for _, t, unit in phases) - 2
