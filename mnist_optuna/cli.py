"""Command-line plumbing: a flag for every UPPER_CASE constant of a script's settings blocks (those of its search
block define a study), presets, one-line errors, logging and the stop signals. No domain logic lives here."""
import argparse
import contextlib
import errno
import gc
import logging
import math
import re
import signal
import sys
import threading
from pathlib import Path

from errors import UserError


def _number(kind, test, wanted):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected {wanted}") from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"{text} is out of range; expected {wanted}")
        return value
    parse.__name__ = wanted
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
nonneg_float = _number(float, lambda v: v >= 0, "a number >= 0")
fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
seed = _number(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")  # what NumPy and Optuna's samplers take


def optional_positive_int(text):
    """'none'/'all' for everything, else an integer >= 1."""
    if text.lower() in ("none", "all"):
        return None
    return positive_int(text)


def optional_positive_float(text):
    """'none' for no limit, else a number > 0."""
    if text.lower() == "none":
        return None
    return positive_float(text)


def boolean(text):
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def int_list(text):
    """'128,256,512' -> [128, 256, 512] (sorted, each once, each >= 1)."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need integers >= 1")
    return values


def one_of(*choices):
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text
    parse.__name__ = " | ".join(choices)
    return parse


def json_value(text):
    import json

    try:
        return json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error})") from None


class Settings(argparse.Namespace):
    """The parsed flags. `search_keys` (a class attribute, so it is not among the flags vars() lists) names those
    that define a study: the constants of the script's search block."""
    search_keys = ()


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: what is wrong and where to look, exit code 2."""

    def __init__(self, doc):
        # no abbreviations: one script's flag must not pass for a prefix of the other script's flag
        super().__init__(description=doc.split("\n\n")[0], epilog=None, allow_abbrev=False,
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        self.ranges, self.search_keys = [], []

    def parse_args(self, args=None, namespace=None):
        if namespace is None:
            namespace = type("Settings", (Settings,), {"search_keys": tuple(self.search_keys)})()
        return super().parse_args(args, namespace)

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)

    def parse_with_preset(self, argv, preset_flag, preset):
        """Parse argv; when `preset_flag` is given, its values (by constant name) replace the defaults (explicit
        flags still win). Ranges (LOW HIGH [STEP]) must have LOW <= HIGH."""
        argv = sys.argv[1:] if argv is None else list(argv)
        if preset_flag in argv:
            self.set_defaults(**{name.lower(): value for name, value in preset.items()})
        args = self.parse_args(argv)
        for dest in self.ranges:
            low, high, *step = getattr(args, dest)
            flag = f"--{dest.replace('_', '-')}"
            check(low <= high, f"{flag}: low {low} is above high {high}")
            # a step past the range would leave only its low end: a search of one value that looks like a range
            check(not step or low == high or 0 < step[0] <= high - low,
                  f"{flag}: step {step[0] if step else ''} is larger than the range {low}..{high}; give a step of at "
                  f"most {high - low}, or LOW = HIGH for one value")
        return args


SETTINGS_BLOCK = re.compile(r"^# =+ (search|run|end)\b")  # a script's line that opens (or ends) a settings block


def constants(path):
    """(name, trailing comment, block) of each UPPER_CASE assignment at the top level of a script inside its
    settings blocks, in source order. A line `# ==== search ...` opens the block of the settings that define a
    study, `# ==== run ...` the block of those a rerun may change, `# ==== end ...` closes them; a constant outside
    the blocks (a preset, a table) is no flag."""
    found, block = [], None
    for line in Path(path).read_text().splitlines():
        marker = SETTINGS_BLOCK.match(line)
        if marker:
            block = None if marker.group(1) == "end" else marker.group(1)
            continue
        match = re.match(r"^([A-Z][A-Z0-9_]*)\s*=.*?(?:#\s*(.*))?$", line)
        if match and block:
            found.append((match.group(1), (match.group(2) or "").strip(), block))
    return found


def add_constant_flags(parser, namespace, path, kinds):
    """One flag per constant of the settings blocks of the script at `path` (constants): --lower-case-name, the
    constant as default, its comment as help; those of the search block are the parser's search_keys. `kinds`
    gives a constant its validator, or (validator, nargs); the type of the default is the fallback. Lists take
    one or more values (none when their default is empty), tuples a fixed number (LOW HIGH [STEP], LOW <= HIGH
    checked), booleans are switches (--no-x when the default is True)."""
    for name, comment, block in constants(path):
        default, dest = namespace[name], name.lower()
        if block == "search":
            parser.search_keys.append(dest)
        flag = "--" + dest.replace("_", "-")
        kind, nargs = kinds.get(name), None
        if isinstance(kind, tuple):
            kind, nargs = kind
        help_text = comment.replace("%", "%%") or None
        if isinstance(default, bool):
            off = flag.replace("--", "--no-", 1)
            parser.add_argument(off if default else flag, dest=dest, default=default,
                                action="store_false" if default else "store_true", help=help_text)
        elif isinstance(default, list):
            element = kind or _inferred(default[0] if default else "")
            parser.add_argument(flag, type=element, nargs=nargs or ("+" if default else "*"), default=default,
                                help=help_text)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=kind or _inferred(default[0]), nargs=len(default), default=default,
                                metavar=("LOW", "HIGH", "STEP")[:len(default)], help=help_text)
            parser.ranges.append(dest)
        else:
            parser.add_argument(flag, type=kind or _inferred(default), default=default, help=help_text)


def _inferred(value):
    if isinstance(value, bool):
        return boolean
    if isinstance(value, int):
        return positive_int
    if isinstance(value, float):
        return positive_float
    return str


def add_run_flags(parser, quick):
    """What to do in this run, beyond the constants: the preset, skipping or repeating parts, output."""
    a = parser.add_argument
    a("--quick", action="store_true", help="smoke-run preset: " + ", ".join(f"{k}={v}" for k, v in quick.items()))
    a("--no-final", action="store_true", help="stop after the search summary")
    a("--retrain-only", action="store_true",
      help="run no new trials: summarise the study in --storage / --out-dir and retrain its best")
    a("--resume-anyway", action="store_true",
      help="continue a study whose search settings differ from this run's (default: refuse with the difference)")
    a("--compile", action="store_true", help="torch.compile each model (worth it on a GPU)")
    a("--no-plots", action="store_true", help="skip the PNG plots")
    a("--no-onnx", action="store_true", help="skip model.onnx (its export and its check in ONNX Runtime: about 5 s)")
    a("--verbose", action="store_true", help="more log lines, Optuna's included")
    a("--quiet", action="store_true", help="print only the summary")


def check(condition, message):
    """Raise a UserError with `message` unless `condition` holds (for checks across several values)."""
    if not condition:
        raise UserError(message)


class _LineHandler(logging.Handler):
    """Log lines on stdout, written through tqdm so they never tear a progress bar apart."""

    def emit(self, record):
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stdout)
        sys.stdout.flush()  # a line per trial shows up at once in a redirected log too


def setup_logging(verbose=False, quiet=False):
    import optuna

    check(not (verbose and quiet), "--verbose and --quiet exclude each other")
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", handlers=[_LineHandler()], force=True)
    # Optuna's own per-trial lines repeat ours; show them only when asked for more
    optuna.logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
    for handler in logging.getLogger("optuna").handlers:
        handler.addFilter(_NoInterruptTraceback())


_INTERRUPT = {"requested": False, "signal": signal.SIGINT, "held": 0, "pending": False}


def _on_stop_signal(signum, frame):
    """SIGINT (Ctrl-C) and SIGTERM (timeout, docker, Kubernetes, Slurm) stop a run the same way: the running
    trial is recorded as interrupted (a rerun queues it again), the summary is printed and written. Inside
    `stop_signals_held()` the stop waits for the block's end; a second signal while one waits stops at once."""
    again = _INTERRUPT["pending"]
    _INTERRUPT["requested"] = True
    _INTERRUPT["signal"] = signum
    if _INTERRUPT["held"] and not again:
        _INTERRUPT["pending"] = True
        return
    _INTERRUPT["pending"] = False
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals_held():
    """A block that Ctrl-C or SIGTERM must not cut in two: the stop they ask for is raised when the block ends.
    For a library's own critical section whose cleanup breaks when interrupted: Optuna's journal-file lock,
    whose release then fails with FileNotFoundError, and whose acquire, interrupted just before it took the
    lock, "releases" the lock another worker holds. Signals reach only the main thread; other threads pass
    through. Only the scripts' handler (`run`) holds a stop; Python's default Ctrl-C is raised as before. Unlike
    `stop_signals_blocked`, a second signal stops at once: a wait for another worker's lock may last Optuna's
    grace period (30 s)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _INTERRUPT["held"] += 1
    try:
        yield
    finally:
        _INTERRUPT["held"] -= 1
        if not _INTERRUPT["held"] and _INTERRUPT["pending"]:
            _INTERRUPT["pending"] = False
            raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals_blocked():
    """The strict sibling of `stop_signals_held`: SIGINT and SIGTERM blocked by the system for a block of
    milliseconds that must finish whatever comes (the final stage's files moved into place together); no second
    signal cuts it, and a blocked one is delivered, and stops the run, when the block ends."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def stop_code():
    """The exit code of a run stopped by a signal: 128 + its number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + int(_INTERRUPT["signal"])


class _NoInterruptTraceback(logging.Filter):
    """Optuna logs the KeyboardInterrupt that stopped a trial with its ~20-line traceback; the run's own
    lines already say what happened."""

    def filter(self, record):
        return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))


def interrupted_by_user(error):
    """Ctrl-C itself, or an error it caused by landing inside a library's own cleanup (seen: Optuna's
    journal-file lock, whose release then failed with FileNotFoundError instead of KeyboardInterrupt; its
    appends are now held whole by `stop_signals_held`, this still catches any other library's)."""
    return isinstance(error, KeyboardInterrupt) or _INTERRUPT["requested"]


WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def lost_storage(error):
    """The status of the gRPC call under `error` (or among the errors it was raised from) when the storage proxy
    stopped answering mid-run, else None. Optuna's own cleanup may then fail with another error (seen: an
    UnboundLocalError in its trial loop), so the whole chain is read."""
    grpc = sys.modules.get("grpc")  # a run that never spoke gRPC cannot have lost a proxy
    seen = set()
    while grpc is not None and error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, grpc.RpcError):
            return str(error.code()) if hasattr(error, "code") else type(error).__name__
        error = error.__cause__ or error.__context__
    return None


def run(main, argv=None):
    """Run a script's main(): user errors become one line and exit 2, Ctrl-C exits 130, SIGTERM 143."""
    # a shell starts background jobs with SIGINT ignored; take it back so `kill -INT` stops a search
    # as Ctrl-C does (trial recorded, summary printed) even when it runs under nohup ... &
    signal.signal(signal.SIGINT, _on_stop_signal)
    signal.signal(signal.SIGTERM, _on_stop_signal)
    # what the imports made (torch's and Optuna's modules, about 190,000 objects) lives as long as the process:
    # moved out of the garbage collector's sight, each collection between trials takes microseconds, not 0.1 s
    # (garbage collected first, so none is kept for good when one process runs several, as the tests do)
    gc.collect()
    gc.freeze()
    try:
        code = main(argv)
    except UserError as error:
        sys.stderr.write(f"error: {error}\n")
        code = 2
    except BaseException as error:
        if not isinstance(error, SystemExit) and interrupted_by_user(error):
            sys.stderr.write("interrupted\n")
            code = stop_code()
        elif status := lost_storage(error):
            sys.stderr.write(f"error: the storage stopped answering ({status}): the gRPC proxy (python -m "
                             "mnist_optuna proxy) or the storage behind it is down or unreachable; start it again, then "
                             "rerun the same command: finished trials are kept and the stopped one runs again\n")
            code = 2
        elif isinstance(error, OSError) and error.errno in WRITE_ERRORS:
            # a full disk, a read-only file or folder: no traceback, and nothing finished is lost
            where = f" {error.filename}" if error.filename else " a file"
            sys.stderr.write(f"error: cannot write{where} ({error.strerror}); free disk space or make it writable, "
                             "then rerun the same command: finished trials, scores and checkpoints are kept\n")
            code = 2
        else:
            raise
    sys.exit(code or 0)
