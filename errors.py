"""The one error type the scripts turn into a single line and exit code 2."""


class UserError(Exception):
    """Bad input from the user (flags, constants, files); the message says what to do."""


def first_line(error, longest=300):
    """What an exception says, in one line for a message: its first line (cut at `longest`), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0][:longest] if text else type(error).__name__
