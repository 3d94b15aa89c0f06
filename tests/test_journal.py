"""Storages and the journal file: torn, garbage or appended bytes, its locks, names and missing or unreachable
storages, each one line or mended, and no study lost."""
import optuna
import pytest

from conftest import SEARCH, assert_one_line_error, journal_storage, run_in_process, study_trials
from errors import UserError
from mnist_optuna import storages


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


def test_a_study_in_memory_is_refused(capsys, tmp_path):
    result = run_in_process(capsys, "MNIST-optuna.py", "--quick", "--storage", "sqlite:///:memory:",
                            "--out-dir", tmp_path / "o")
    assert "in memory" in assert_one_line_error(result)


def test_bytes_appended_after_a_journals_last_record_are_dropped_with_a_backup_not_the_study():
    import os

    from mnist_optuna.storages import readable_records

    records = b'{"op_code": 0, "worker_id": "a"}\n{"op_code": 5, "worker_id": "a"}\n'
    garbage = os.urandom(300).replace(b"{", b"(")
    kept, dropped, foreign = readable_records(records + garbage)
    assert kept == records and dropped == len(garbage) and not foreign
    # the same bytes before a whole record are no crash's leftovers: the file is not mended
    assert readable_records(garbage + b"\n" + records)[2]


def test_a_journal_with_bytes_appended_resumes_its_study(capsys, tmp_path):
    import os


    out = tmp_path / "run"
    assert run_in_process(capsys, "MNIST-optuna.py", *SEARCH, "--no-final", "--out-dir", out).returncode == 0
    journal = out / "study.journal"
    original = journal.read_bytes()
    journal.write_bytes(original + os.urandom(200).replace(b"{", b"("))
    result = run_in_process(capsys, "MNIST-optuna.py", *SEARCH, "--no-final", "--n-trials", "3", "--out-dir", out)
    assert result.returncode == 0, result.stderr
    assert "no whole record" in result.stdout + result.stderr
    assert len([t for t in study_trials(journal) if t.state.name in ("COMPLETE", "PRUNED")]) >= 3  # went on
    assert any(path.read_bytes().startswith(original) for path in out.glob("study.journal.torn-*"))
