"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input (config, files, models). Printed without a traceback."""

    exit_code = 1


class ConfigError(UserError):
    """A malformed or invalid config value (exit code 2, like argparse)."""

    exit_code = 2
