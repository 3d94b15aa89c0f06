"""Where studies live: an Optuna storage from a path or URL (a journal file that survives a torn last record,
or a database for many machines), the run folder beside it, and studies that remember the settings that
define their search."""
import datetime
import json
import logging
import os
import re
import time
from pathlib import Path

import optuna

from errors import UserError, first_line
from mnist_optuna.cli import stop_signals_held
from mnist_optuna.rundir import prepare_out_dir
from mnist_optuna.settings import check_settings
from mnist_optuna.workers import GRACE_SECONDS, HEARTBEAT_SECONDS, RETRY

log = logging.getLogger(__name__)


JOURNAL_NAME = "study.journal"
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
GRPC_SCHEME = "grpc"       # grpc://HOST:PORT: Optuna's storage proxy, one process between many workers and a database
GRPC_PORT = 13000          # Optuna's default port of the proxy


def open_run_folder(out_dir, storage, must_exist=False):
    """(the run folder, the storage). A folder made by this call is removed again when the storage cannot be
    opened, so a mistyped --storage leaves nothing behind. `must_exist`: the study's storage must be there
    already (--retrain-only adds no trial, so it never creates one)."""
    existed = out_dir is not None and Path(out_dir).exists()
    folder = prepare_out_dir(out_dir)
    try:
        return folder, make_storage(storage, folder, must_exist)
    except UserError:
        if not existed and not any(folder.iterdir()):
            folder.rmdir()
        raise


def storage_kind(spec):
    """'journal' for a file path (or the default), 'rdb' for a database URL; unknown schemes are refused."""
    if spec is None:
        return "journal"
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", spec)
    if not match:
        near = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", spec)
        if near and near.group(1).split("+")[0].lower() in RDB_SCHEMES + ("postgres", "file", "journal"):
            raise UserError(f"--storage {spec} looks like a database URL but lacks '//'; write "
                            f"{near.group(1)}://USER@HOST/DB (or sqlite:///PATH), or a plain file path for a journal")
        return "journal"
    scheme = match.group(1).split("+")[0].lower()
    if scheme == GRPC_SCHEME:
        return "grpc"
    if scheme not in RDB_SCHEMES:
        raise UserError(f"--storage scheme {match.group(1)!r} is not supported; use a file path (journal), "
                        "sqlite:///PATH, postgresql://USER@HOST/DB, mysql://USER@HOST/DB or grpc://HOST:PORT")
    return "rdb"


RECORD_START = b'{"op_code"'  # how every record of Optuna's journal begins; JSON escapes it inside strings
LOCK_NAME_EXTRA = len(".lock") + 36 + len(".rename")  # Optuna's lock file, and its uuid-named rename on release


def readable_records(content):
    """(the complete records of a journal's bytes, one per line; how many bytes are torn records or a tail after the
    last whole record; whether some bytes before a whole record are not part of any record, which no crash of a
    writer leaves: then the file is not mended).

    A writer that crashed or hit a full disk leaves the start of a record without its newline. When it was the
    last writer, that part is the file's tail; when another worker appended after it, the part starts a line
    that ends with that worker's whole record. Either way the whole records are kept and the torn parts dropped.
    Bytes after the last whole record that are no record at all (something appended to the file) go the same way:
    the records before them are the study, and refusing the file would abandon every trial it holds."""
    kept, torn, foreign, foreign_tail = [], 0, False, False
    for line in content.splitlines(keepends=True):
        record = line
        while record:
            try:
                json.loads(record)
                if record.endswith(b"\n"):
                    break
            except ValueError:
                pass
            cut = record.find(RECORD_START, 1)  # a whole record may follow the torn one on its line
            record = record[cut:] if cut > 0 else b""
        part = line[:len(line) - len(record)]
        foreign_tail = foreign_tail or not part.startswith(RECORD_START[:len(part)])
        torn += len(part)
        if record:
            kept.append(record)
            foreign = foreign or foreign_tail  # no record: what came before this whole one is inside the file
    return b"".join(kept), torn, foreign or not kept


def mend_torn_journal(path):
    """Drop the torn records of a journal (a crash or a full disk cut a record short), keeping every whole one.

    Optuna refuses a journal with a torn record before its end, and appends its next record to a torn last one,
    which makes the file unreadable. The check reads the file once; the mending holds the journal's own lock (so
    no worker appends meanwhile), keeps the original bytes beside it and replaces the file in one rename.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return
    _, torn, foreign = readable_records(path.read_bytes())
    if not torn or foreign:  # whole, or not a journal at all (Optuna's replay then says so)
        return
    lock = optuna.storages.journal.JournalFileSymlinkLock(str(path))
    with stop_signals_held():  # like the appends: never interrupted while the lock is taken or held
        lock.acquire()
        try:
            content = path.read_bytes()
            mended, dropped, foreign = readable_records(content)
            if not dropped or foreign:
                return
            backup = path.with_name(f"{path.name}.torn-{datetime.datetime.now():%Y%m%d-%H%M%S}")
            backup.write_bytes(content)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.mend")
            tmp.write_bytes(mended)
            os.replace(tmp, path)
        finally:
            lock.release()
    log.warning(f"warning: {path} held {dropped} bytes that are no whole record (a record cut short by a crash or a "
                f"full disk, or bytes appended after the last one); removed them, kept every whole record and the "
                f"original as {backup.name}")


def check_journal_name(path):
    """Refuse a journal whose lock files would exceed the folder's longest file name: Optuna could not take the
    lock, would leave a stale one and make every later run wait for it."""
    try:
        limit = os.pathconf(path.parent if path.parent.exists() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    length = len(path.name.encode())
    if length + LOCK_NAME_EXTRA > limit:
        raise UserError(f"--storage {path}: the journal's name is {length} bytes; its lock files need "
                        f"{LOCK_NAME_EXTRA} more and this file system allows {limit}: pass a name of at most "
                        f"{limit - LOCK_NAME_EXTRA} bytes")


class HeldJournalBackend(optuna.storages.journal.JournalFileBackend):
    """Optuna's journal file, whose appends Ctrl-C and SIGTERM never cut in two: a stop that arrives while a
    record is written under the file lock is raised once the lock is released (the lock's cleanup fails when
    interrupted, and one interrupted just before the lock was taken removes the lock another worker holds)."""

    def append_logs(self, logs):
        with stop_signals_held():
            super().append_logs(logs)


def make_storage(spec, out_dir, must_exist=False):
    """An Optuna storage from --storage: None -> a journal file in the run folder; a path -> a journal
    file (several processes on one machine); a URL -> an RDB (many machines), with heartbeats so a
    killed worker's trial is marked failed and retried by a live one."""
    kind = storage_kind(spec)
    if kind == "journal":
        path = Path(spec) if spec else Path(out_dir) / JOURNAL_NAME
        if path.is_dir():
            raise UserError(f"--storage {path} is a folder; pass a file path for a journal, or a database URL")
        if must_exist and not path.is_file():
            raise UserError(f"--storage {path} does not exist; pass the journal of the study to use")
        try:
            check_journal_name(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            open(path, "ab").close()  # a read-only journal is found here, not at the first trial's record
            mend_torn_journal(path)
            backend = HeldJournalBackend(str(path))
            return optuna.storages.JournalStorage(backend)
        except OSError as error:
            raise UserError(f"cannot open journal file {path} ({error.strerror or error}); pass a writable path") \
                from None
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as error:  # what a replay of garbage raises
            raise UserError(f"{path} is not a readable Optuna journal ({type(error).__name__}); move it away or "
                            "pass another --storage") from None
    if kind == "grpc":
        return grpc_proxy(spec)
    check_database_file(spec)
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(spec, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                                              heartbeat_stale_trial_callback=RETRY)
        except ImportError as error:
            raise UserError(f"the database driver for {spec.split(':')[0]} is missing ({error}); "
                            "pip install -r requirements.txt") from None
        except Exception as error:  # SQLAlchemy raises many kinds; all mean the URL cannot be used (yet)
            # workers started together on an empty database race to create Optuna's tables; the losers retry
            if attempt < 2 and ("already exists" in str(error) or "UniqueViolation" in str(error)):
                time.sleep(1 + attempt)
                continue
            raise UserError(f"cannot open storage {spec} ({first_line(error)}); check the URL and that the server "
                            "runs") from None


def grpc_proxy(url):
    """The storage behind Optuna's gRPC storage proxy at grpc://HOST:PORT (`python -m mnist_optuna proxy`)."""
    # a host name, an IPv4 address, or an IPv6 literal in brackets (grpc://[::1]:13000), as gRPC takes them
    match = re.match(r"^grpc://(\[[0-9A-Fa-f:.]+\]|[^:/\[\]]+)(?::(\d+))?/?$", url)
    if not match or not 1 <= int(match.group(2) or GRPC_PORT) <= 65535:
        raise UserError(f"--storage {url}: write grpc://HOST:PORT (a port 1-65535; an IPv6 address in brackets)")
    host, port = match.group(1), int(match.group(2) or GRPC_PORT)
    try:
        proxy = optuna.storages.GrpcStorageProxy(host=host, port=port)
        proxy.get_all_studies()  # the first call reaches the proxy: a wrong address is found here
        return proxy
    except ImportError as error:
        raise UserError(f"--storage grpc:// needs grpcio ({error}); pip install -r requirements.txt") from None
    except Exception as error:  # grpc raises its own kinds; all mean the proxy cannot be reached
        raise UserError(f"cannot reach the storage proxy at {host}:{port} ({first_line(error)}); start it with "
                        f"`python -m mnist_optuna proxy STORAGE --port {port}` on {host}") from None


def check_database_file(url):
    """Refuse an SQLite URL whose study could not be kept: an in-memory database (gone when the run ends, though
    the run would advise resuming it) or a file this process cannot write (found at the first trial otherwise)."""
    match = re.match(r"^sqlite(\+\w+)?:///?(.*)$", url)
    if not match:
        return
    path = match.group(2).split("?")[0]
    if path in ("", ":memory:") or path.startswith("file::memory:"):
        raise UserError(f"--storage {url} keeps the study in memory, lost when the run ends; pass sqlite:///PATH "
                        "or a file path for a journal")
    if Path(path).is_file():
        try:
            open(path, "ab").close()
        except OSError as error:
            raise UserError(f"cannot write the database {path} ({error.strerror}); make it writable or pass another "
                            "--storage") from None


# what Optuna, its dashboard and its CLI call each objective (instead of "Objective 0")
METRIC_NAMES = {"accuracy": "val_accuracy", "mmac": "mmac", "latency": "latency_ms"}


def metric_names(objectives):
    return [METRIC_NAMES[name] for name in objectives]


def open_study(name, storage, sampler, pruner, search=None, resume_anyway=False, must_exist=False,
               objectives=("accuracy",)):
    """Create the study or join/resume the existing one of that name.

    `search` holds the settings that define the study's trials (space, data, recipe, backbone, grid). A
    study keeps the first run's as a user attribute; a later run (another worker, a rerun in the same
    folder) whose settings differ is refused, so it never silently continues a different search, unless
    the user consents with --resume-anyway. `must_exist`: --retrain-only, which adds no trial. `objectives`
    (studies.DIRECTIONS' names, accuracy first) are fixed for a study's life: not even --resume-anyway changes them.
    """
    directions = [optuna.study.StudyDirection.MAXIMIZE if name_ == "accuracy" else
                  optuna.study.StudyDirection.MINIMIZE for name_ in objectives]
    if must_exist:
        try:
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        except KeyError:
            raise UserError(f"--retrain-only: no study named {name} in this storage; pass the --storage (and "
                            "--out-dir) of the search to retrain from") from None
    else:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    directions=directions, load_if_exists=True)
    if study.directions != directions:
        names = {metric: name_ for name_, metric in METRIC_NAMES.items()}
        had = [names.get(metric, metric) for metric in study.metric_names or []] or (
            ["accuracy"] if len(study.directions) == 1 else [direction.name.lower() for direction in study.directions])
        raise UserError(f"study {name} optimises {' '.join(had)}, this run asks for --objectives "
                        f"{' '.join(objectives)}; pass the study's own --objectives, or a new --out-dir (or "
                        "--study-prefix) for a new search")
    if study.metric_names != metric_names(objectives) and not must_exist:
        study.set_metric_names(metric_names(objectives))  # trials.csv then has a values_<name> column per objective
    if search is None or must_exist:
        return study
    check_settings(study, name, search, resume_anyway)
    return study


