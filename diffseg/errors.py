"""Errors for bad input: the message always names the file (or key) and the problem."""


class InputError(ValueError):
    """Bad user input (a file, a folder, a config key); the CLI prints it without a traceback."""


class ConfigError(InputError):
    """A config that cannot be resolved: the message names the bad key or value."""


class DataError(InputError):
    """A data file that cannot be used: the message names the file and the problem."""
