"""The one error type the scripts turn into a single line and exit code 2."""


class UserError(Exception):
    """Bad input from the user (flags, constants, files); the message says what to do."""
