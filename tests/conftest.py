import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# one torch thread per test process and per script it starts: pytest runs three workers on two cores. Set before torch
# is imported (its thread pool reads it then), so a run in the test's process and one in a child train alike, bit for
# bit, whatever pytest's -n
os.environ.setdefault("OMP_NUM_THREADS", "1")

import optuna  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from data import load_search_data  # noqa: E402
from mnist_optuna.storages import make_storage  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("MNIST_DATA_DIR") or ROOT.parent / "shared" / "data").resolve()

# a tiny search: seconds per trial on 2 cores, still real MNIST; no model.onnx and no plots (5 s and 2.5 s of a run:
# the --quick runs and their tests check both)
TINY = ["--train-subset", "1000", "--val-size", "500", "--epochs", "1", "--batch-size", "50",
        "--final-epochs", "1", "--final-subset", "1000", "--no-onnx", "--no-plots"]
TINY_CNN = ["--conv-layers", "2", "--pool-after", "1", "2", "--conv-filters", "4", "8", "4",
            "--kernel-sizes", "3", "--fc-width", "16", "32", "16"]
TINY_ADV = TINY + ["--backbone", str(ROOT / "tests" / "tiny_backbone.json")]


@pytest.fixture(scope="session")
def data_dir():
    if not (DATA_DIR / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.fail(f"MNIST not found under {DATA_DIR}; set MNIST_DATA_DIR to the folder holding MNIST/raw/")
    return DATA_DIR


def run_script(script, *args, data_dir=DATA_DIR, timeout=600, env=None):
    """Run a script as a user would; returns the CompletedProcess with text output."""
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    if data_dir is not None and "--data-dir" not in args:
        command += ["--data-dir", str(data_dir)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


RUN_FILES = ("config.json", "best_params.json", "trials.csv", "summary.json", "model.pt", "model.onnx")


def quick_run(script, out_dir):
    """`script --quick` into out_dir: exits 0, prints the best trial and the test accuracy, writes the files."""
    result = run_script(script, "--quick", "--out-dir", out_dir)
    assert result.returncode == 0, result.stderr
    assert "best trial:" in result.stdout and "test accuracy:" in result.stdout
    for name in RUN_FILES:
        assert (Path(out_dir) / name).is_file(), name
    return result.stdout


# an end-to-end test of 15 s or more (on the 2-core CI machine): such tests start first, so that the two workers take
# the short ones as they free up and end together, instead of one starting a long test when the other has finished
LONG = pytest.mark.long


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: otherwise in collection order


# each script's --quick run is made once and read by several tests; a test that reads one carries its
# xdist group, so pytest-xdist (--dist loadgroup) runs all of them on one worker and the run happens once
QUICK_MAIN = pytest.mark.xdist_group("quick-main")
QUICK_ADV = pytest.mark.xdist_group("quick-adv")


@pytest.fixture(scope="session")
def quick_main_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick-main") / "run"
    return out, quick_run("MNIST-optuna.py", out)


@pytest.fixture(scope="session")
def quick_adv_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick-adv") / "run"
    return out, quick_run("MNIST-optuna-adv.py", out)


def load_script(name):
    """Import a hyphenated script as a module (nothing runs at import time)."""
    spec = importlib.util.spec_from_file_location(name.replace("-", "_").removesuffix(".py"), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(capsys, script, *args):
    """A script's main() through cli.run in this process, as run_script would run it (a CompletedProcess with its
    exit code and output): for runs that stop at a bad flag, without the seconds a new Python needs for torch.
    An exception that cli.run lets through (a traceback in a terminal) fails the test."""
    import logging
    import signal

    from mnist_optuna import cli

    module = load_script(script)
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    logging_state = root.handlers[:], root.level
    command = [*map(str, args)] + ([] if "--data-dir" in args else ["--data-dir", str(DATA_DIR)])
    try:
        with pytest.raises(SystemExit) as exited:
            cli.run(module.main, command)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        root.handlers[:], root.level = logging_state
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([script, *command], exited.value.code, out, err)


@pytest.fixture
def run_here(capsys):
    """run_in_process bound to the test's capsys: a whole run in this process, as run_script would run it, without
    the seconds a new Python spends importing torch (for runs that need no process of their own: no signal, no
    environment, no kill)."""
    return lambda script, *args: run_in_process(capsys, script, *args)


def assert_one_line_error(result):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


POSTGRES = os.environ.get("MNIST_OPTUNA_POSTGRES")


GRID = ["--fc-depths", "1", "2", "--fc-widths", "8,16,32", "8,16"]  # 3 + 6 = 9 networks
GRID_HEADS = ["8", "16", "32", "8-8", "8-16", "16-8", "16-16", "32-8", "32-16"]  # its networks (head_grid)


def postgres_or_skip():
    if POSTGRES:
        return POSTGRES
    if os.environ.get("CI"):
        pytest.fail("CI must provide PostgreSQL: .ci/run sets MNIST_OPTUNA_POSTGRES")
    pytest.skip("no PostgreSQL here: set MNIST_OPTUNA_POSTGRES=postgresql://… (CI starts one in .ci/run)")


def start(script, *args):
    command = [sys.executable, str(ROOT / script), *map(str, args), "--data-dir", str(DATA_DIR)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(worker, timeout=600):
    output, _ = worker.communicate(timeout=timeout)
    return worker.returncode, output


def wait_for_trial_lines(worker, count):
    seen = []
    for line in worker.stdout:
        seen.append(line)
        if sum(text.lstrip().startswith(("trial", "seed")) and "trial" in text for text in seen) >= count:
            return "".join(seen)
    raise AssertionError("the worker ended before it finished enough trials:\n" + "".join(seen))


def journal_lock_held(journal):
    """Whether a process holds the journal's lock (Optuna's lock file beside it): a SIGKILL then would cost the next
    run Optuna's 30 s grace before it takes the lock over."""
    return Path(f"{journal}.lock").exists()


def kill_inside_a_trial(worker, journal, name, after, signal_number=signal.SIGKILL):
    """Send the signal (SIGKILL: no warning) while the worker trains the trial after its first `after` lines, with
    the journal's lock free."""
    wait_for_trial_lines(worker, after)
    for _ in range(400):
        study = optuna.load_study(study_name=name, storage=make_storage(str(journal), None))
        if any(t.state.name == "RUNNING" and "model" in t.user_attrs for t in study.trials) \
                and not journal_lock_held(journal):
            break
        time.sleep(0.05)
    worker.send_signal(signal_number)
    worker.wait(timeout=60)


SEARCH = [*TINY, *TINY_CNN, "--seeds", "0", "--n-trials", "2"]


def journal_storage(path):
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def study_trials(journal, name="mnist-cnn-seed0"):
    return optuna.load_study(study_name=name, storage=journal_storage(journal)).trials


def stop_after(out, line_start, *args):
    """Start the script, send Ctrl-C as soon as it prints a line starting with `line_start`; (exit code, output)."""
    worker = start("MNIST-optuna.py", *args)
    for line in worker.stdout:
        if line.startswith(line_start):
            worker.send_signal(signal.SIGINT)
            break
    return finish(worker)


def frozen(model, value, seed):
    train = {"epochs": 1, "batch_size": 50, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 5e-4, "l1": 0.0,
             "schedule": "onecycle", "label_smoothing": 0.0, "augment": False, "compile": False}
    return optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=value,
                                     user_attrs={"model": model, "train": train, "seed": seed, "study": "s"})


def model_test_accuracy(out):
    """The test accuracy of a run's model.pt, recomputed here from the file and the test set."""
    from mnist_optuna.checkpoints import load_checkpoint
    from mnist_optuna.evaluation import load_test
    from mnist_optuna.training import accuracy_on

    model, payload = load_checkpoint(out / "model.pt")
    meta = payload["meta"]
    return accuracy_on(model, *load_test(DATA_DIR, "cpu", meta["mean"], meta["std"])), meta


# a network of a few thousand weights: seconds to train on a few hundred images
TINY_NET = {"conv": [{"channels": 4, "kernel": 3, "pool": True}, {"channels": 8, "kernel": 3, "pool": True}],
            "fc": [16], "dropout": 0.0}


def folder_files(out):
    return {path.name: path.read_bytes() for path in out.iterdir() if path.is_file() and path.suffix != ".journal"}


@pytest.fixture(scope="module")
def small(data_dir):
    return load_search_data(data_dir, torch.device("cpu"), val_size=500, train_subset=1000, split_seed=0)


def trained_networks(storage, name):
    """{params as a sorted tuple: (state, value)} of the trials that trained a network."""
    study = optuna.load_study(study_name=name, storage=make_storage(str(storage), None))
    result = {}
    for trial in study.trials:
        if trial.state.name in ("COMPLETE", "PRUNED") and not str(trial.user_attrs.get("reason", "")).startswith(
                ("over budget", "same configuration")):
            key = tuple(sorted(trial.params.items()))
            assert key not in result, f"trial {trial.number} trained the configuration of an earlier trial"
            result[key] = (trial.state.name, trial.value)
    return result
