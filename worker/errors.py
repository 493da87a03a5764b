"""The one error tree of contact-worker, the exit code of each branch, and the one function
that maps an error to the line and exit code a command ends with (docs/operations.md "Exit
codes").

This module imports nothing of the package, so every module can import it: the tree never
causes an import cycle.

::

    WorkerError                   exit 1  the command stopped (half-way, or at the start)
    ├── UsageError                exit 2  nothing was done: fix a setting, a URI, what it names
    │   ├── ConfigError                   a setting or a URI is missing or invalid
    │   ├── SourceError                   an input cannot be opened or read
    │   │   └── EnqueueStopped    exit 1  writing to an input failed half-way
    │   ├── DeadLetterError               the dead-letter sink cannot be opened or written
    │   └── StoreError                    a dead-letter store cannot be opened, read or marked
    │       └── StoreBusy         exit 1  another ``dlq replay`` works on the store
    ├── ApiRefused                exit 3  the API refused the credentials or the account
    └── Fatal                     exit 1  the run failed after it started (the input or the
                                          sink went away for good)

Anything else (an unforeseen error) is exit 1 too, with its type named.
"""

from __future__ import annotations

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_AUTH = 0, 1, 2, 3


class WorkerError(Exception):
    """An error that ends a command with its message on one line and :attr:`exit_code`."""

    exit_code: int = EXIT_FATAL
    """The command's exit code when this error ends it (each branch sets its own)."""


class UsageError(WorkerError):
    """Nothing was done: a setting, a URI, or what it names is wrong or cannot be reached."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError, ValueError):
    """A setting or URI is missing or invalid: reported before anything starts (exit 2)."""


class SourceError(UsageError):
    """The input cannot be opened or read (bad path, bad checkpoint, broker gone): exit 2 at
    the start; a run that loses its input after it started ends with :class:`Fatal`."""


class EnqueueStopped(SourceError):
    """Writing to an input failed after some changes were written (the message says how many):
    a command that stopped half-way (exit 1), not a setting to fix (exit 2)."""

    exit_code = EXIT_FATAL


class DeadLetterError(UsageError):
    """The dead-letter sink cannot be opened or written: nothing may be acknowledged then."""


class StoreError(UsageError):
    """A dead-letter store cannot be opened, read or marked; the message says which and why."""


class StoreBusy(StoreError):
    """Another ``dlq replay`` is working on this store (exit 1: try again later)."""

    exit_code = EXIT_FATAL


class ApiRefused(WorkerError):
    """The API refused the credentials or the account's access at the start (exit 3)."""

    exit_code = EXIT_AUTH


class Fatal(WorkerError):
    """The run failed after it started: its input or its dead-letter sink failed for good
    (exit 1). The message holds each underlying error's own words."""


def failure(exc: BaseException) -> tuple[str, int]:
    """The one line (after ``contact-worker: ``) and the exit code of an error that ended a
    command: a :class:`WorkerError`'s own message and code; for anything unforeseen, exit 1
    and a line naming its type."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]  # anyio's task groups wrap what one task raised
    if isinstance(exc, WorkerError):
        return str(exc), exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", EXIT_FATAL
    return f"fatal error: {type(exc).__name__}: {exc}", EXIT_FATAL
