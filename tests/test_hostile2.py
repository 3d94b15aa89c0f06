"""Issue 21: the second hostile pass. Each failure, tried again as it was found: a correct answer, or one line
and exit 2 that says what to do, with nothing lost."""
import json
import os

import optuna
import pytest
from conftest import assert_one_line_error, run_in_process

import storages
from errors import UserError

pytestmark = pytest.mark.timeout(600)


def journal_storage(path):
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


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
