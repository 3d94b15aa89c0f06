"""A hostile user, further. Each failure, tried again as it was found: a correct answer, or one line
and exit 2 that says what to do, with nothing lost."""
import errno
import json
import os
import re
import shlex
import signal
import threading
import time

import optuna
import pytest
import torch

import models
from conftest import (
    SEARCH,
    TINY,
    TINY_ADV,
    assert_one_line_error,
    journal_storage,
    load_script,
    run_in_process,
    run_script,
    stop_after,
    study_trials,
)
from errors import UserError
from mnist_optuna import cli, storages

pytestmark = pytest.mark.timeout(600)



def test_a_record_torn_in_the_middle_by_a_full_disk_loses_only_that_record(tmp_path):
    path = tmp_path / "study.journal"
    study = optuna.create_study(study_name="s", storage=journal_storage(path))
    for x in (0, 1, 2, 7):  # a completed trial is one record: the last two lines are the last two trials
        study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions={
            "x": optuna.distributions.IntDistribution(0, 9)}, value=x))
    whole = path.read_bytes()
    lines = whole.splitlines(keepends=True)
    last = len(whole) - len(lines[-1]) - len(lines[-2])
    # worker A hit a full disk half-way through its record; worker B, already
    # running, appended its records after it
    torn = b'{"op_code":4,"worker_id":"a","study_id":0,"datetime_st'
    broken = whole[:last] + torn + whole[last:]
    path.write_bytes(broken)
    with pytest.raises(ValueError):  # what Optuna makes of it: the whole study unreadable
        optuna.load_study(study_name="s", storage=journal_storage(path)).trials

    storage = storages.make_storage(str(path), tmp_path)
    values = [t.value for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert values == [0, 1, 2, 7]  # every whole record, B's included
    backups = list(tmp_path.glob("study.journal.torn-*"))
    assert [b.read_bytes() for b in backups] == [broken]
    assert path.read_bytes() == whole
    assert not (tmp_path / "study.journal.lock").exists()  # the lock it held is given back


def test_mending_waits_for_the_journal_lock(tmp_path):
    path = tmp_path / "study.journal"
    path.write_bytes(b'{"op_code":0,"worker_id":"w","study_name":"s","directions":[2]}\n{"op_co')
    lock = optuna.storages.journal.JournalFileSymlinkLock(str(path))
    lock.acquire()  # another worker is appending
    import threading
    done = threading.Event()
    thread = threading.Thread(target=lambda: (storages.mend_torn_journal(path), done.set()))
    thread.start()
    assert not done.wait(1.0)  # it does not cut while the other worker holds the lock
    lock.release()
    assert done.wait(10)
    assert path.read_bytes().endswith(b"[2]}\n")


def test_a_journal_name_too_long_for_its_lock_files_is_one_line(capsys, tmp_path):
    journal = tmp_path / ("研" * 70 + ".journal")  # 218 bytes: fits a name, not its lock file's rename
    result = run_in_process(capsys, "MNIST-optuna.py", "--quick", "--storage", journal, "--out-dir", tmp_path / "o")
    assert "bytes" in assert_one_line_error(result)
    assert not [p for p in tmp_path.iterdir() if ".lock" in p.name] and not journal.exists()
    with pytest.raises(UserError):
        storages.make_storage(str(journal), tmp_path)


@pytest.fixture
def stop_handler(monkeypatch):
    """The scripts' SIGTERM handler installed in this process, its state restored afterwards."""
    for key in ("requested", "signal", "held", "pending"):
        monkeypatch.setitem(cli._INTERRUPT, key, cli._INTERRUPT[key])
    previous = signal.signal(signal.SIGTERM, cli._on_stop_signal)
    yield
    signal.signal(signal.SIGTERM, previous)


def a_trial(x):
    return optuna.trial.create_trial(params={"x": x}, distributions={"x": optuna.distributions.IntDistribution(0, 9)},
                                     value=x)


def test_a_stop_inside_a_journal_write_comes_after_the_lock_is_given_back(tmp_path, monkeypatch, stop_handler):
    # seen in CI: SIGTERM landed in Optuna's lock release between its unlink and the return, its cleanup
    # unlinked again and a FileNotFoundError, not the stop, failed the trial with a logged traceback
    path = tmp_path / "study.journal"
    study = optuna.create_study(study_name="s", storage=storages.make_storage(str(path), tmp_path))
    unlink = os.unlink

    def unlink_then_stop(name, *args, **kwargs):
        unlink(name, *args, **kwargs)
        if str(name).endswith(".rename"):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(os, "unlink", unlink_then_stop)
    with pytest.raises(KeyboardInterrupt):  # the stop itself, once the record is written and the lock free
        study.add_trial(a_trial(3))
    monkeypatch.setattr(os, "unlink", unlink)
    assert cli._INTERRUPT["requested"] and not cli._INTERRUPT["pending"]
    assert not [p.name for p in tmp_path.iterdir() if ".lock" in p.name]
    assert [t.value for t in study_trials(path, "s")] == [3]


def test_a_stop_just_before_the_journal_lock_is_taken_leaves_another_workers_lock_alone(tmp_path, monkeypatch,
                                                                                       stop_handler):
    # Optuna's acquire releases "its" lock when interrupted; interrupted before it took it, it would take away
    # the lock another worker holds, and two workers would append at once
    path = tmp_path / "study.journal"
    study = optuna.create_study(study_name="s", storage=storages.make_storage(str(path), tmp_path))
    other = optuna.storages.journal.JournalFileSymlinkLock(str(path))
    other.acquire()  # another worker is appending
    symlink, released = os.symlink, []

    def stop_then_symlink(*args, **kwargs):
        if not released:
            released.append(None)
            os.kill(os.getpid(), signal.SIGTERM)
        return symlink(*args, **kwargs)

    def other_worker():
        time.sleep(1.0)
        try:
            other.release()
            released.append("its own lock")
        except RuntimeError as error:  # "did not possess lock": someone took it away
            released.append(str(error))

    monkeypatch.setattr(os, "symlink", stop_then_symlink)
    thread = threading.Thread(target=other_worker)
    thread.start()
    with pytest.raises(KeyboardInterrupt):
        study.add_trial(a_trial(5))
    thread.join()
    assert released == [None, "its own lock"]
    assert [t.value for t in study_trials(path, "s")] == [5]  # written once the other worker was done


def test_a_second_stop_while_one_is_held_stops_at_once(stop_handler):
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with cli.stop_signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append("after the first")
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append("after the second")
    assert reached == ["after the first"]


def own_mnist(tmp_path, data_dir):
    """A copy of MNIST whose training label file can be changed in place (the other files linked)."""
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in (data_dir / "MNIST" / "raw").iterdir():
        if path.name == "train-labels-idx1-ubyte":
            (raw / path.name).write_bytes(path.read_bytes())
        else:
            (raw / path.name).symlink_to(path)
    return tmp_path / "mnist", raw / "train-labels-idx1-ubyte"


def test_other_training_data_in_a_finished_folder_is_never_answered_with_the_old_results(run_here, tmp_path, data_dir):
    mnist, labels = own_mnist(tmp_path, data_dir)
    out = tmp_path / "run"
    command = ["MNIST-optuna.py", *SEARCH, "--promote", "2", "--promote-epochs", "1", "--data-dir", mnist,
               "--out-dir", out]
    first = run_here(*command)
    assert first.returncode == 0, first.stderr
    trials, scores = study_trials(out / "study.journal"), json.loads((out / "promotion.json").read_text())
    old = torch.load(out / "model.pt", weights_only=True)["meta"]
    content = bytearray(labels.read_bytes())  # valid MNIST labels still, but other ones: each shifted by one class
    content[8:] = bytes((label + 1) % 10 for label in content[8:])
    labels.write_bytes(bytes(content))

    again = run_here(*command)
    lines = again.stderr.strip().splitlines()  # the warning that these are not canonical MNIST files, the error
    assert again.returncode == 2 and len(lines) == 2 and "Traceback" not in again.stderr
    assert "training files" in lines[-1] and "--resume-anyway" in lines[-1]
    assert len(study_trials(out / "study.journal")) == len(trials)  # nothing lost, nothing added
    # with consent the study goes on, but nothing trained on the old files is taken for the new ones
    anyway = run_here(*command, "--resume-anyway")
    assert anyway.returncode == 0, anyway.stderr
    assert len(json.loads((out / "promotion.json").read_text())) == 2 * len(scores)  # scored again
    new = torch.load(out / "model.pt", weights_only=True)["meta"]
    assert new["training_data"] != old["training_data"] and new["train_seconds"] != old["train_seconds"]


def test_a_study_without_a_settings_record_takes_only_the_settings_its_trials_were_trained_with(run_here, tmp_path):
    out = tmp_path / "run"
    assert run_here("MNIST-optuna.py", *SEARCH, "--no-final", "--out-dir", out).returncode == 0
    storage = journal_storage(out / "study.journal")
    optuna.load_study(study_name="mnist-cnn-seed0", storage=storage).set_user_attr("search", None)  # as before

    mistaken = run_here("MNIST-optuna.py", *SEARCH, "--no-final", "--epochs", "2", "--out-dir", out)
    assert "--epochs 1" in assert_one_line_error(mistaken)
    assert optuna.load_study(study_name="mnist-cnn-seed0", storage=storage).user_attrs["search"] is None
    own = run_here("MNIST-optuna.py", *SEARCH, "--no-final", "--out-dir", out)  # its own command is not refused
    assert own.returncode == 0, own.stderr
    assert optuna.load_study(study_name="mnist-cnn-seed0", storage=storage).user_attrs["search"]["epochs"] == 1


def test_resume_anyway_with_another_backbone_is_refused_once_heads_were_trained(run_here, tmp_path):
    out = tmp_path / "run"
    grid = ["--fc-depths", "1", "--fc-widths", "8,16", "--no-plots", "--out-dir", out]
    assert run_here("MNIST-optuna-adv.py", *TINY_ADV, *grid).returncode == 0
    model = (out / "model.pt").read_bytes()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model": {"conv": [{"channels": 6, "kernel": 3, "pool": True}], "fc": []}}))
    result = run_here("MNIST-optuna-adv.py", *TINY_ADV[:-2], "--backbone", other, *grid, "--resume-anyway")
    line = assert_one_line_error(result)
    assert "--backbone" in line and "not even --resume-anyway" in line
    assert (out / "model.pt").read_bytes() == model


FINAL = ["--final-epochs", "1", "--final-subset", "1000"]



def folder_files(out):
    return {path.name: path.read_bytes() for path in out.iterdir() if path.is_file() and path.suffix != ".journal"}


def test_a_final_stage_stopped_anywhere_leaves_the_previous_files_all_of_one_network(run_here, tmp_path):
    out = tmp_path / "run"
    assert run_here("MNIST-optuna.py", *SEARCH, "--promote", "0", "--final-seeds", "2", "--out-dir", out).returncode == 0
    before = folder_files(out)
    # a new choice (the cheapest network within --pick-mmac) stopped after its test accuracy, during the ONNX export
    # (exported here, unlike the other tiny runs: without it the files may be published before the stop lands)
    with_onnx = [arg for arg in SEARCH if arg != "--no-onnx"]
    args = [*with_onnx, "--promote", "0", "--retrain-only", "--pick-mmac", "0.3", "--final-epochs", "2",
            "--out-dir", out]
    code, output = stop_after(out, "test accuracy:", *args)
    assert code == 130, output
    after = folder_files(out)
    assert {name: after[name] for name in before if name != "config.json"} == \
        {name: before[name] for name in before if name != "config.json"}
    # the rerun finishes it: every file of the new stage together, the old seed repeat gone with its stage
    again = run_here(*["MNIST-optuna.py", *args])
    assert again.returncode == 0, again.stderr
    model = torch.load(out / "model.pt", weights_only=True)
    chosen = json.loads((out / "best_params.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert model["config"] == chosen["model"] and model["meta"]["trial"] == chosen["trial"] == summary["best"]["trial"]
    assert model["meta"]["test_accuracy"] == summary["test_accuracy"]
    assert not (out / "seed-1.pt").exists() and not (out / ".final-stage").exists()


def test_a_lowered_budget_applies_to_the_answer(tmp_path):
    out = tmp_path / "it's a run"  # a name the printed reproduce line must quote for a shell
    # a process of its own: its printed command line is read
    first = run_script("MNIST-optuna.py", *SEARCH, "--n-trials", "3", "--promote", "0", "--out-dir", out)
    assert first.returncode == 0, first.stderr
    words = shlex.split(next(line for line in first.stdout.splitlines() if line.startswith("reproduce: "))[11:])
    assert words[words.index("--out-dir") + 1] == str(out)
    chosen = torch.load(out / "model.pt", weights_only=True)["config"]
    budget = models.mmac(chosen) * 0.999  # just below the answer's network
    cheaper = [t for t in study_trials(out / "study.journal")
               if t.state.name == "COMPLETE" and t.user_attrs["mmac"] <= budget]
    lowered = run_script("MNIST-optuna.py", *SEARCH, "--n-trials", "3", "--promote", "0", "--retrain-only",
                         "--max-mmac", str(budget), "--out-dir", out)
    if cheaper:  # the best of the cheaper networks is retrained
        assert lowered.returncode == 0, lowered.stderr
        assert models.mmac(torch.load(out / "model.pt", weights_only=True)["config"]) <= budget
    else:  # none fits: nothing is retrained, and the run says why
        assert lowered.returncode == 1 and "--max-mmac" in lowered.stdout
        assert torch.load(out / "model.pt", weights_only=True)["config"] == chosen


def test_stage_two_into_the_stage_one_folder_is_refused_and_changes_nothing(run_here, tmp_path):
    out = tmp_path / "run"
    assert run_here("MNIST-optuna.py", *SEARCH, "--promote", "0", "--out-dir", out).returncode == 0
    before = folder_files(out)
    result = run_here("MNIST-optuna.py", *TINY, "--seeds", "0", "--n-trials", "1", "--stage", "optim",
                        "--backbone", out / "best_params.json", "--out-dir", out)
    assert "--stage model" in assert_one_line_error(result)
    assert folder_files(out) == before


def test_a_full_disk_at_the_final_save_is_one_line_and_keeps_everything(run_here, capsys, tmp_path, monkeypatch):
    from mnist_optuna import checkpoints

    out = tmp_path / "run"
    assert run_here("MNIST-optuna.py", *SEARCH, "--promote", "0", "--out-dir", out).returncode == 0
    before = folder_files(out)

    def full(path, content):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(checkpoints, "write_atomic", full)
    result = run_in_process(capsys, "MNIST-optuna.py", *SEARCH, "--promote", "0", "--retrain-only",
                            "--final-epochs", "2", "--out-dir", out)
    line = assert_one_line_error(result)
    assert "No space left on device" in line and "rerun the same command" in line
    assert {k: v for k, v in folder_files(out).items() if k != "config.json"} == \
        {k: v for k, v in before.items() if k != "config.json"}


def test_a_study_in_memory_is_refused(capsys, tmp_path):
    result = run_in_process(capsys, "MNIST-optuna.py", "--quick", "--storage", "sqlite:///:memory:",
                            "--out-dir", tmp_path / "o")
    assert "in memory" in assert_one_line_error(result)


def test_the_budget_advice_names_a_budget_that_is_accepted(capsys, tmp_path):
    refused = run_in_process(capsys, "MNIST-optuna.py", *SEARCH, "--max-mmac", "0.01", "--out-dir", tmp_path / "o")
    advised = re.search(r"needs ([0-9.]+) MMAC", assert_one_line_error(refused)).group(1)
    script = load_script("MNIST-optuna.py")
    args = script.build_parser().parse_with_preset([*map(str, SEARCH), "--max-mmac", advised], "--quick", script.QUICK)
    script.validate(args)  # no refusal at the advised budget


def test_a_backbone_with_a_nan_slope_is_one_line_before_any_training(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"conv": [{"channels": 4, "kernel": 3, "slope": NaN, "pool": true}], "fc": []}}')
    result = run_in_process(capsys, "MNIST-optuna-adv.py", "--quick", "--backbone", bad, "--out-dir", tmp_path / "o")
    assert "slope" in assert_one_line_error(result)
    assert not (tmp_path / "o").exists()


def test_mlflow_takes_a_study_name_with_an_apostrophe_and_a_lost_store_is_one_warning(tmp_path, capsys, caplog):
    import shutil

    from mnist_optuna import tracking

    store = tmp_path / "ml"
    store.mkdir()
    tracker = tracking.Tracker(f"sqlite:///{store}/mlflow.db", "bob's")
    study = optuna.create_study(study_name="bob's-seed0")
    callback = tracker.trial_callback()
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2, callbacks=[callback])
    runs = tracker.client.search_runs([tracker.experiment])
    assert len(runs) == 3 and sum(run.data.tags.get("mnist_optuna.role") == "study" for run in runs) == 1
    shutil.rmtree(store)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3, callbacks=[callback])
    output = capsys.readouterr()
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "MLflow" in r.getMessage()]
    assert len(warnings) == 1 and "Traceback" not in output.out + output.err + caplog.text


def test_an_ensemble_of_checkpoints_of_different_tasks_is_one_line(capsys, tmp_path):
    from mnist_optuna import checkpoints, training

    paths = []
    for classes in (10, 7):
        config = models.normalise_config({"conv": [{"channels": 4, "kernel": 3, "pool": True}], "fc": [],
                                          "num_classes": classes})
        paths.append(tmp_path / f"c{classes}.pt")
        checkpoints.save_checkpoint(paths[-1], models.build_model(config), training.TrainConfig(), {})
    result = run_in_process(capsys, "MNIST-optuna.py", "--evaluate", *paths)
    assert "one set of classes" in assert_one_line_error(result)
