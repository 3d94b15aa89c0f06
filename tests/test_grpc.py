"""Optuna's gRPC storage proxy between workers and one storage (`python -m mnist_optuna proxy`)."""
import socket
import subprocess
import sys
import time

import optuna
import pytest

from conftest import (
    LONG,
    ROOT,
    TINY,
    TINY_CNN,
    assert_one_line_error,
    finish,
    run_in_process,
    start,
    trained_networks,
    wait_for_trial_lines,
)
from mnist_optuna.reporting import trained

pytestmark = pytest.mark.timeout(600)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def proxy(tmp_path):
    """The proxy in front of a journal file, started as a user would; its grpc:// URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mnist_optuna", "proxy", str(tmp_path / "behind.journal"),
                               "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    assert "storage proxy for" in server.stdout.readline()
    deadline = time.time() + 30
    while time.time() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    yield f"grpc://127.0.0.1:{port}", tmp_path / "behind.journal"
    server.terminate()
    server.wait(timeout=30)


def test_two_workers_through_the_grpc_proxy_share_one_study(proxy, tmp_path):
    url, journal = proxy
    common = [*TINY, *TINY_CNN, "--seeds", "0", "--n-trials", "2", "--promote", "0", "--storage", url]
    workers = [start("MNIST-optuna.py", *common, "--out-dir", tmp_path / f"w{i}") for i in range(2)]
    outputs = [finish(worker) for worker in workers]
    assert all(code == 0 for code, _ in outputs), outputs
    study = optuna.load_study(study_name="mnist-cnn-seed0", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))  # what the proxy wrote, read without it
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED") and trained(t)]
    assert len(done) == 4 and len({t.user_attrs["worker"] for t in done}) == 2
    assert len({tuple(sorted(t.params.items())) for t in done}) == 4  # no network trained twice
    assert sum("test accuracy:" in output for _, output in outputs) == 1  # one final stage between them


def test_an_unreachable_proxy_is_one_line(capsys, tmp_path):
    result = run_in_process(capsys, "MNIST-optuna.py", "--quick", "--storage", f"grpc://127.0.0.1:{free_port()}",
                            "--out-dir", tmp_path / "o")
    assert "python -m mnist_optuna proxy" in assert_one_line_error(result)
    assert not (tmp_path / "o").exists()


def test_a_port_in_use_an_impossible_port_and_an_unknown_host_are_one_line(proxy, tmp_path):
    port = int(proxy[0].rsplit(":", 1)[1])
    cases = [(["--host", "127.0.0.1", "--port", str(port)], f"port {port} on 127.0.0.1 is in use"),
             (["--port", "99999"], "99999 is not a port (1-65535)"),
             (["--host", "nohost.invalid", "--port", str(free_port())], "--host nohost.invalid:")]
    for flags, words in cases:
        second = subprocess.run([sys.executable, "-m", "mnist_optuna", "proxy", str(tmp_path / "second.journal"),
                                 *flags], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert words in second.stderr and len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert "storage proxy for" not in second.stdout  # it never said it listens
    assert not (tmp_path / "second.journal").exists()


@pytest.mark.parametrize("url, words", [
    ("grpc://[::1]:{port}", "cannot reach the storage proxy at [::1]:"),  # an IPv6 literal is an address, not a typo
    ("grpc://127.0.0.1:99999", "a port 1-65535"),
    ("grpc://[::1", "write grpc://HOST:PORT"),
])
def test_grpc_urls_take_ipv6_literals_and_refuse_impossible_ports(capsys, tmp_path, url, words):
    result = run_in_process(capsys, "MNIST-optuna.py", "--quick", "--storage", url.format(port=free_port()),
                            "--out-dir", tmp_path / "o")
    assert words in assert_one_line_error(result)


@LONG
def test_a_proxy_lost_under_a_worker_is_one_line_and_a_new_proxy_resumes_the_study(tmp_path):
    journal, out = tmp_path / "behind.journal", tmp_path / "w"

    def serve():
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "mnist_optuna", "proxy", str(journal), "--host", "127.0.0.1",
                                   "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        assert "storage proxy for" in server.stdout.readline()
        return server, f"grpc://127.0.0.1:{port}"

    search = [*TINY, *TINY_CNN, "--train-subset", "3000", "--epochs", "2", "--seeds", "0", "--n-trials", "2",
              "--no-final", "--out-dir", out]
    server, url = serve()
    worker = start("MNIST-optuna.py", *search, "--storage", url)
    seen = wait_for_trial_lines(worker, 1)
    server.kill()  # the proxy dies under a worker that is training its next trial
    server.wait(timeout=30)
    code, output = finish(worker)
    output = seen + output
    assert code == 2 and "Traceback" not in output, output
    assert "error: the storage stopped answering (StatusCode.UNAVAILABLE)" in output
    # a new proxy in front of the same journal: the same command resumes, the stopped trial runs again
    server, url = serve()
    try:
        code, output = finish(start("MNIST-optuna.py", *search, "--storage", url))
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert code == 0, output
    assert len(trained_networks(journal, "mnist-cnn-seed0")) == 2
