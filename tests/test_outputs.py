"""What a run leaves for people: plots, ONNX with a parity check, progress bars only on a terminal, the dashboard."""
import fcntl
import json
import os
import pty
import shutil
import socket
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import DATA_DIR, QUICK_ADV, ROOT, TINY_ADV, run_script

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
def test_backbone_accepts_a_checkpoint(quick_adv_run, tmp_path):
    out, _ = quick_adv_run
    result = run_script("MNIST-optuna-adv.py", *TINY_ADV[:-2], "--backbone", out / "model.pt", "--fc-depths", "1",
                        "--fc-widths", "8", "--no-final", "--no-plots", "--out-dir", tmp_path / "chained")
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


def test_progress_bars_only_on_a_terminal(tmp_path):
    args = [*TINY_ADV, "--fc-depths", "1", "--fc-widths", "8,16", "--final-epochs", "2", "--no-plots",
            "--data-dir", DATA_DIR]
    code, screen = run_in_terminal([*args, "--out-dir", tmp_path / "tty"])
    assert code == 0, screen
    assert "grid seed 0 trials:" in screen and "final epochs:" in screen
    piped = run_script("MNIST-optuna-adv.py", *args, "--out-dir", tmp_path / "pipe")
    assert piped.returncode == 0
    assert "grid seed 0 trials:" not in piped.stdout and "final epochs:" not in piped.stdout and "\r" not in piped.stdout


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
