"""The command line's user-facing error type: a leaf module, so that every command imports it without
importing the dispatcher (:mod:`productbg.cli`) that imports the commands."""


class CliError(Exception):
    """A user-facing error: printed as one line (no traceback), exit status 2."""
