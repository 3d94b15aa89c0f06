"""What a hostile user tried. No rerun answers another question, no study is lost, no traceback."""
import json
import signal

import optuna
import pytest

from conftest import SEARCH, TINY_ADV, assert_one_line_error, finish, run_in_process, start

pytestmark = pytest.mark.timeout(600)


def study_trials(journal, name="mnist-cnn-seed0"):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    return optuna.load_study(study_name=name, storage=storage).trials


def trained(journal):
    return [t for t in study_trials(journal) if t.state.name in ("COMPLETE", "PRUNED")
            and not str(t.user_attrs.get("reason", "")).startswith(("over budget", "same configuration"))]


def test_a_rerun_that_changes_the_search_is_refused(run_here, tmp_path):
    out = tmp_path / "run"
    assert run_here("MNIST-optuna.py", *SEARCH, "--no-final", "--out-dir", out).returncode == 0
    before, rows = len(trained(out / "study.journal")), len(study_trials(out / "study.journal"))

    changed = run_here("MNIST-optuna.py", *SEARCH, "--no-final", "--conv-filters", "4", "12", "4", "--out-dir", out)
    line = assert_one_line_error(changed)
    assert "--conv-filters 4 8 4" in line and "4 12 4" in line and "--out-dir" in line
    assert len(study_trials(out / "study.journal")) == rows  # nothing was added to the old study

    # settings of the final stage do not change the search: allowed, and nothing is searched again
    final = run_here("MNIST-optuna.py", *SEARCH, "--final-epochs", "2", "--promote", "0", "--out-dir", out)
    assert final.returncode == 0, final.stderr
    assert len(study_trials(out / "study.journal")) == rows
    # explicit consent continues the study with the new settings
    anyway = run_here("MNIST-optuna.py", *SEARCH, "--no-final", "--n-trials", "3", "--lr", "1e-3",
                        "--resume-anyway", "--out-dir", out)
    assert anyway.returncode == 0, anyway.stderr
    assert len(trained(out / "study.journal")) == before + 1


def test_an_adv_rerun_with_another_backbone_is_refused(run_here, tmp_path):
    out = tmp_path / "run"
    grid = ["--fc-depths", "1", "--fc-widths", "8,16", "--no-plots"]
    assert run_here("MNIST-optuna-adv.py", *TINY_ADV, *grid, "--out-dir", out).returncode == 0
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model": {"conv": [{"channels": 6, "kernel": 3, "pool": True}], "fc": []}}))
    result = run_here("MNIST-optuna-adv.py", *TINY_ADV[:-2], "--backbone", other, *grid, "--out-dir", out)
    assert "--backbone" in assert_one_line_error(result)


def test_a_backbone_that_does_not_fit_is_refused_before_any_trial_and_the_fixed_grid_trains_every_point(run_here, tmp_path):
    out = tmp_path / "run"
    grid = ["--fc-depths", "1", "--fc-widths", "8,16,32", "--no-final", "--no-plots", "--out-dir", out]
    bad = tmp_path / "bad.json"  # five pools do not fit a 28x28 image: refused in one line, before any trial
    bad.write_text(json.dumps({"model": {"conv": [{"channels": 4, "kernel": 3, "pool": True}] * 5, "fc": []}}))
    first = run_here("MNIST-optuna-adv.py", *TINY_ADV[:-2], "--backbone", bad, *grid)
    assert "too many pooling layers" in assert_one_line_error(first)
    assert not (out / "study.journal").exists()  # no failed trial left behind
    fixed = run_here("MNIST-optuna-adv.py", *TINY_ADV, *grid, "--resume-anyway")
    assert fixed.returncode == 0, fixed.stderr
    done = [t.params["fc"] for t in study_trials(out / "study.journal", "mnist-fc-grid")
            if t.state.name in ("COMPLETE", "PRUNED")]
    assert sorted(done) == ["16", "32", "8"]  # every point, the one that failed included


def test_a_torn_last_journal_record_is_mended_and_kept(run_here, tmp_path):
    out = tmp_path / "run"
    assert run_here("MNIST-optuna.py", *SEARCH, "--no-final", "--out-dir", out).returncode == 0
    journal = out / "study.journal"
    original = journal.read_bytes()
    journal.write_bytes(original[:-40])  # a crash in the middle of the last record

    result = run_here("MNIST-optuna.py", *SEARCH, "--no-final", "--n-trials", "3", "--out-dir", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no whole record" in result.stdout + result.stderr
    backups = list(out.glob("study.journal.torn-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == original[:-40]
    finished = [t for t in study_trials(journal) if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) >= 3  # readable, and the study went on
    again = run_here("MNIST-optuna.py", *SEARCH, "--n-trials", "3", "--retrain-only", "--promote", "0",
                       "--out-dir", out)
    assert again.returncode == 0 and "test accuracy:" in again.stdout, again.stderr


def test_a_garbage_journal_is_one_line_and_left_alone(run_here, tmp_path):
    journal = tmp_path / "x.journal"
    journal.write_bytes(b"\x00\xff garbage {not json\n")
    result = run_here("MNIST-optuna.py", *SEARCH, "--storage", journal, "--out-dir", tmp_path / "out")
    assert "not a readable Optuna journal" in assert_one_line_error(result)
    assert journal.read_bytes() == b"\x00\xff garbage {not json\n"


def test_retrain_only_needs_an_existing_study_and_creates_nothing(run_here, tmp_path):
    missing = tmp_path / "typo.journal"
    result = run_here("MNIST-optuna.py", *SEARCH, "--retrain-only", "--storage", missing,
                        "--out-dir", tmp_path / "out")
    assert "does not exist" in assert_one_line_error(result)
    assert not missing.exists() and not (tmp_path / "out").exists()


def test_an_unreachable_database_leaves_no_empty_folder(run_here, tmp_path):
    result = run_here("MNIST-optuna.py", *SEARCH, "--storage", "postgresql://nobody@127.0.0.1:9/none",
                        "--out-dir", tmp_path / "out")
    assert "cannot open storage" in assert_one_line_error(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, flags, says", [
    ("MNIST-optuna.py", ["--storage", "postgresql:/host/db"], "lacks '//'"),
    ("MNIST-optuna-adv.py", ["--fc-width", "8"], "unrecognized arguments: --fc-width"),  # not a prefix here
    ("MNIST-optuna.py", ["--seeds", str(2**40)], "--seeds"),
    ("MNIST-optuna.py", ["--lr", "inf"], "--lr"),
    ("MNIST-optuna.py", ["--weight-decay", "nan"], "--weight-decay"),
    ("MNIST-optuna-adv.py", ["--seed", "-1"], "--seed"),
    ("MNIST-optuna.py", ["--out-dir", "/proc/mnist-optuna-out"], "--out-dir"),
])
def test_values_beyond_what_the_libraries_take_are_one_line(capsys, tmp_path, script, flags, says):
    args = ["--quick", *flags] + ([] if "--out-dir" in flags else ["--out-dir", tmp_path / "out"])
    assert says in assert_one_line_error(run_in_process(capsys, script, *args))


def test_stopping_a_retrain_keeps_the_previous_summary_and_model(run_here, tmp_path):
    out = tmp_path / "run"
    assert run_here("MNIST-optuna.py", *SEARCH, "--promote", "0", "--out-dir", out).returncode == 0
    summary, model = (out / "summary.json").read_bytes(), (out / "model.pt").read_bytes()
    worker = start("MNIST-optuna.py", *SEARCH, "--promote", "0", "--retrain-only", "--final-epochs", "30",
                   "--final-subset", "20000", "--out-dir", out)
    for line in worker.stdout:
        if line.startswith("retraining on"):
            break
    worker.send_signal(signal.SIGINT)
    code, output = finish(worker)
    assert code == 130, output
    assert (out / "summary.json").read_bytes() == summary and (out / "model.pt").read_bytes() == model
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


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
