"""Command-line plumbing shared by both scripts: flags from constants, presets, one-line errors."""
import argparse
import logging
import sys

from errors import UserError

log = logging.getLogger("mnist_optuna")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: what is wrong and where to look, exit code 2."""

    def __init__(self, doc):
        super().__init__(description=doc.split("\n\n")[0], epilog=None,
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
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range; expected {wanted}")
        return value
    parse.__name__ = wanted
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
nonneg_float = _number(float, lambda v: v >= 0, "a number >= 0")
fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def optional_positive_int(text):
    """'none'/'all' for everything, else an integer >= 1."""
    if text.lower() in ("none", "all"):
        return None
    return positive_int(text)


def check(condition, message):
    """Raise a UserError with `message` unless `condition` holds (for checks across several values)."""
    if not condition:
        raise UserError(message)


def setup_logging(verbose=False, quiet=False):
    import optuna

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stdout, force=True)
    # Optuna's own per-trial lines repeat ours; show them only when asked for more
    optuna.logging.set_verbosity(logging.INFO if verbose else logging.WARNING)


def run(main, argv=None):
    """Run a script's main(): user errors become one line and exit 2, Ctrl-C exits 130."""
    try:
        code = main(argv)
    except UserError as error:
        sys.stderr.write(f"error: {error}\n")
        code = 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        code = 130
    sys.exit(code or 0)
