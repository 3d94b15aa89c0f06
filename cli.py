"""Command-line plumbing shared by both scripts: flags from constants, presets, one-line errors."""
import argparse
import logging
import math
import signal
import sys

from errors import UserError

log = logging.getLogger("mnist_optuna")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: what is wrong and where to look, exit code 2."""

    def __init__(self, doc):
        # no abbreviations: one script's flag must not pass for a prefix of the other script's flag
        super().__init__(description=doc.split("\n\n")[0], epilog=None, allow_abbrev=False,
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)

    def parse_with_preset(self, argv, preset_flag, preset):
        """Parse argv; when `preset_flag` is given, its values replace the defaults (explicit flags still win)."""
        argv = sys.argv[1:] if argv is None else list(argv)
        if preset_flag in argv:
            self.set_defaults(**preset)
        return self.parse_args(argv)


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


# flags both scripts have; each default is the script's constant of the given name
SHARED_FLAGS = [
    ("--storage", "STORAGE", str, "journal file path or database URL (default: a journal in --out-dir)"),
    ("--data-dir", "DATA_DIR", str, "folder holding MNIST/raw/ (default: $MNIST_DATA_DIR, else ./data)"),
    ("--val-size", "VAL_SIZE", positive_int, "validation images"),
    ("--train-subset", "TRAIN_SUBSET", optional_positive_int, "training images per trial; 'all' for every one"),
    ("--epochs", "EPOCHS", positive_int, "epochs per trial"),
    ("--batch-size", "BATCH_SIZE", positive_int, "images per step"),
    ("--lr", "LR", positive_float, "peak learning rate"),
    ("--optimizer", "OPTIMIZER", str, "adam | adamw | sgd"),
    ("--weight-decay", "WEIGHT_DECAY", nonneg_float, "L2, through the optimizer"),
    ("--l1", "L1", nonneg_float, "explicit L1 penalty on weights"),
    ("--label-smoothing", "LABEL_SMOOTHING", fraction, "label smoothing of the loss"),
    ("--schedule", "SCHEDULE", str, "none | cosine | onecycle"),
    ("--promote", "PROMOTE", nonneg_int, "N > 1: retrain the N best distinct trials like the final model on the "
     "training split and choose among them on validation"),
    ("--final-epochs", "FINAL_EPOCHS", positive_int, "epochs of the retrain on train+validation"),
    ("--final-subset", "FINAL_SUBSET", optional_positive_int, "images of the retrain; 'all' for every one"),
    ("--final-seeds", "FINAL_SEEDS", positive_int, "retrain the best N times with different seeds; report mean ± std"),
    ("--ensemble", "ENSEMBLE", nonneg_int, "K > 1: retrain the K best distinct configs, average their softmax"),
    ("--device", "DEVICE", str, "auto | cpu | cuda | mps"),
    ("--out-dir", "OUT_DIR", str, "run folder (default: a new one under runs/)"),
]


def add_shared_flags(parser, constants):
    """The flags both scripts share, with defaults from the script's constants block."""
    a = parser.add_argument
    quick = constants["QUICK"]
    a("--quick", action="store_true", help="smoke-run preset: " + ", ".join(f"{k}={v}" for k, v in quick.items()))
    for flag, name, kind, text in SHARED_FLAGS:
        a(flag, type=kind, default=constants[name], help=text)
    a("--no-final", action="store_true", help="stop after the search summary")
    a("--retrain-only", action="store_true",
      help="run no new trials: summarise the study in --storage / --out-dir and retrain its best")
    a("--no-deterministic", dest="deterministic", action="store_false", default=constants["DETERMINISTIC"],
      help="allow non-deterministic (faster) GPU kernels")
    a("--augment", action="store_true", default=constants["AUGMENT"],
      help="small random affine per batch on the device, in trials and retrain (results are labelled)")
    a("--compile", action="store_true", help="torch.compile each model (worth it on a GPU)")
    a("--resume-anyway", action="store_true",
      help="continue a study whose search settings differ from this run's (default: refuse with the difference)")
    a("--no-plots", action="store_true", help="skip the PNG plots")
    a("--verbose", action="store_true", help="more log lines, Optuna's included")
    a("--quiet", action="store_true", help="print only the summary")


def check_shared(args, train_limit=60_000):
    """Checks across the shared flags, before any work starts."""
    check(args.train_subset is None or args.train_subset + args.val_size <= train_limit,
          f"--train-subset {args.train_subset} + --val-size {args.val_size} exceed the {train_limit:,} training images")
    check(args.final_subset is None or args.final_subset <= train_limit,
          f"--final-subset {args.final_subset} exceeds the {train_limit:,} training images")
    check(not (args.verbose and args.quiet), "--verbose and --quiet exclude each other")


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

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", handlers=[_LineHandler()], force=True)
    # Optuna's own per-trial lines repeat ours; show them only when asked for more
    optuna.logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
    for handler in logging.getLogger("optuna").handlers:
        handler.addFilter(_NoInterruptTraceback())


_INTERRUPT = {"requested": False, "signal": signal.SIGINT}


def _on_stop_signal(signum, frame):
    """SIGINT (Ctrl-C) and SIGTERM (timeout, docker, Kubernetes, Slurm) stop a run the same way: the running
    trial is recorded as interrupted (a rerun queues it again), the summary is printed and written."""
    _INTERRUPT["requested"] = True
    _INTERRUPT["signal"] = signum
    raise KeyboardInterrupt


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
    journal-file lock, whose release then fails with FileNotFoundError instead of KeyboardInterrupt)."""
    return isinstance(error, KeyboardInterrupt) or _INTERRUPT["requested"]


def run(main, argv=None):
    """Run a script's main(): user errors become one line and exit 2, Ctrl-C exits 130."""
    # a shell starts background jobs with SIGINT ignored; take it back so `kill -INT` stops a search
    # as Ctrl-C does (trial recorded, summary printed) even when it runs under nohup ... &
    signal.signal(signal.SIGINT, _on_stop_signal)
    signal.signal(signal.SIGTERM, _on_stop_signal)
    try:
        code = main(argv)
    except UserError as error:
        sys.stderr.write(f"error: {error}\n")
        code = 2
    except BaseException as error:
        if isinstance(error, SystemExit) or not interrupted_by_user(error):
            raise
        sys.stderr.write("interrupted\n")
        code = stop_code()
    sys.exit(code or 0)
