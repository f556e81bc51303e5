"""Exit codes and the exceptions that carry them to the command line.

A ``PreforkError`` is a user's error (bad option, address in use): the CLI
prints its message as one line and exits with its code, no traceback.
Anything else is a programming error and keeps its traceback.
"""

EXIT_OK = 0
EXIT_FAILURE = 1  # the environment said no: address in use, permission denied
EXIT_USAGE = 2  # the command line or configuration is wrong
WORKER_BOOT_ERROR = 3  # a worker could not start; the master stops with it too


class PreforkError(Exception):
    """A user-facing error: one line of text and an exit code."""

    exit_code = EXIT_FAILURE


class ConfigError(PreforkError):
    """An invalid option value; names the option and the value."""

    exit_code = EXIT_USAGE


class BindError(PreforkError):
    """A listening socket could not be created, bound or listened on."""

    exit_code = EXIT_FAILURE


class HandlerLoadError(PreforkError):
    """The ``--handler`` module:attr could not be loaded."""

    exit_code = WORKER_BOOT_ERROR


class WorkerBootError(PreforkError):
    """A worker exited with WORKER_BOOT_ERROR: respawning would loop forever."""

    exit_code = WORKER_BOOT_ERROR


class ClientError(PreforkError):
    """``prefork client`` could not reach the server, or lost it (refused, reset)."""

    exit_code = EXIT_FAILURE
