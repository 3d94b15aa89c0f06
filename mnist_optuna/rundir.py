"""The run folder: made or reused (never another tool's folder), proven writable, its config.json with the
run id, the command and the source version of the code that ran, and files written whole or not at all."""
import datetime
import fcntl
import hashlib
import json
import os
import shlex
import subprocess
import sys
import uuid
import weakref
from pathlib import Path

from errors import UserError

ROOT = Path(__file__).resolve().parent.parent  # the project: the scripts, models.py, data.py and this package


def prepare_out_dir(out_dir, root="runs"):
    """The run folder: a new timestamped one under `root`, or the given one.

    An existing folder is reused only when an earlier run of this project made it (so the study in it
    resumes); any other non-empty folder is refused rather than overwritten.
    """
    if out_dir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = Path(root) / stamp
        suffix = 1
        while out_dir.exists():
            out_dir = Path(root) / f"{stamp}-{suffix}"
            suffix += 1
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir} is a file; pass a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise UserError(f"--out-dir {out_dir} exists and was not made by this tool; "
                        "choose a new folder so nothing in it is overwritten")
    return writable_folder(out_dir, "--out-dir", "choose a writable folder")


def writable_folder(folder, flag, advice):
    """`folder`, made if missing and proven writable with a probe file (root ignores permission bits, so only
    a real write tells); otherwise one line naming `flag` and what to do."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write in {flag} {folder} ({error.strerror or error}); {advice}") from None
    return folder


STAGING = ".final-stage"  # the final stage's staging folder inside a run folder
PUBLISHING = ".publishing"  # in it: the list of moves of a publish under way


def publish_staged(out_dir, names, previous):
    """Move the staged files `names` into the run folder (summary.json last) and remove `previous` (files of the stage
    before that this one does not make), as one act a kill cannot leave half done: the list of moves is written
    first, whole or not at all, and a run that finds it finishes them (finish_publish) before it reads the folder."""
    write_json(Path(out_dir) / STAGING / PUBLISHING, {"names": sorted(names), "previous": sorted(previous)})
    finish_publish(out_dir)


def finish_publish(out_dir):
    """Finish the publish a kill interrupted in `out_dir`, if any (every move is a rename, so doing one twice is
    harmless); then the staging folder goes. True when there was one."""
    folder = Path(out_dir) / STAGING
    plan_path = folder / PUBLISHING
    if not plan_path.is_file():
        return False
    plan = json.loads(plan_path.read_text())
    for name in sorted(plan["names"], key=lambda name: name == "summary.json"):
        if (folder / name).exists():
            os.replace(folder / name, Path(out_dir) / name)
    for name in plan["previous"]:
        (Path(out_dir) / name).unlink(missing_ok=True)
    for path in folder.iterdir():  # the lock file, temporaries of a stopped write; the list last
        if path != plan_path:
            path.unlink()
    plan_path.unlink()
    folder.rmdir()
    return True


_HELD = weakref.WeakValueDictionary()  # resolved run folder -> the open lock file of this process's run in it


def hold_run_folder(out_dir):
    """One running command per run folder: an exclusive lock on its .run.lock, held while the returned file stays
    open (the Run keeps it; the system releases it when the process ends, however it ends). Two commands in one folder
    would each add --n-trials trials and write one another's files; the second is refused in one line. The same
    process asking again (a test calling main twice) gets the lock it holds."""
    key = str(Path(out_dir).resolve())
    held = _HELD.get(key)
    if held is not None and not held.closed:
        return held
    handle = open(Path(out_dir) / ".run.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"another run is using --out-dir {out_dir} right now; wait for it to end, or pass another "
                        "--out-dir (workers sharing a study each take a folder of their own)") from None
    _HELD[key] = handle
    return handle


def start_run(out_dir, settings):
    """Record the resolved settings in config.json and return the folder's run id.

    A rerun in the same folder keeps the run id, so it resumes rather than starting over.
    """
    path = Path(out_dir) / "config.json"
    run_id = None
    if path.is_file():
        try:
            before = json.loads(path.read_text())
            run_id = before.get("run_id")
        except (OSError, ValueError, AttributeError):
            before, run_id = {}, None
        if isinstance(before, dict) and family_of(before) != family_of(settings):
            raise UserError(f"--out-dir {out_dir} holds the results of {family_text(before)}, this run is "
                            f"{family_text(settings)}; its files would be replaced: pass a new --out-dir")
    run_id = run_id or uuid.uuid4().hex[:12]
    write_json(path, {**settings, "run_id": run_id, "command": command_line(), "source": source_version()})
    return run_id


# what a run folder belongs to: one script's stage and study names (the settings that name its studies); a run of
# another stage, script or study name would replace its model.pt, summary.json and trials.csv
FAMILY = ("stage", "study_prefix", "study_name")


def family_of(settings):
    return {key: settings.get(key) for key in FAMILY}


def family_text(settings):
    return " ".join(f"--{key.replace('_', '-')} {settings[key]}" for key in FAMILY if settings.get(key) is not None)


def write_atomic(path, content):
    """Write bytes (or text) to a temporary file of this process beside `path`, then rename it into place: a full
    disk or Ctrl-C leaves the previous file whole and no temporary behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, payload):
    write_atomic(path, json.dumps(payload, indent=2, default=json_default) + "\n")


def json_default(value):
    if isinstance(value, (datetime.datetime, datetime.timedelta)):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def command_line():
    """The command that ran, quoted for a shell."""
    return shlex.join([Path(sys.executable).name] + sys.argv)


CODE = ("*.py", "mnist_optuna/*.py", "requirements*.txt")  # what the source version is of (git: at any depth)


def source_version():
    """The git commit of the code that ran (with '+changes' when its code differs from it), or, outside git,
    a hash of the project's code files: recorded in config.json and every model.pt."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            # the code only: results and logs committed beside it (results/) do not change what ran
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE],
                                   cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
            return commit.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    digest = hashlib.sha256()
    for path in sorted({path for pattern in CODE for path in ROOT.glob(pattern)}):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return "sha256:" + digest.hexdigest()[:16]
