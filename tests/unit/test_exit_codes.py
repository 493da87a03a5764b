"""One place maps the errors that end a command to its line and exit code (README "Exit codes")."""

from __future__ import annotations

import pytest

from worker.backends.base import EnqueueStopped, SourceError
from worker.deadletters.base import DeadLetterError
from worker.errors import (
    EXIT_AUTH,
    EXIT_FATAL,
    EXIT_USAGE,
    ApiRefused,
    ConfigError,
    Fatal,
    StoreBusy,
    StoreError,
    UsageError,
    WorkerError,
    failure,
)


class TestFailure:
    @pytest.mark.parametrize(
        "error",
        [
            ConfigError("--rate: not a number: 'fast'"),
            SourceError("cannot connect to redis 127.0.0.1:6390/0: refused"),
            DeadLetterError("cannot open dead letters x: refused"),
        ],
    )
    def test_nothing_done_is_exit_2_with_the_message(self, error: Exception) -> None:
        """A setting, a URI or a store that is wrong or out of reach at the start: exit 2, the
        error's own words."""
        assert (str(error), EXIT_USAGE) == failure(error)

    def test_stopped_half_way_is_exit_1(self) -> None:
        """An enqueue that wrote some changes before it failed: exit 1 (not a setting)."""
        error = EnqueueStopped("redis x: enqueue failed after 1000 changes: connection lost")
        assert (str(error), EXIT_FATAL) == failure(error)

    def test_a_task_groups_wrapping_is_looked_through(self) -> None:
        """What one task raised inside anyio's task groups maps as if raised alone."""
        inner = SourceError("cannot connect to postgresql://h/db: refused")
        wrapped = ExceptionGroup("outer", [ExceptionGroup("inner", [inner])])
        assert (str(inner), EXIT_USAGE) == failure(wrapped)

    def test_anything_else_is_exit_1_naming_its_type(self) -> None:
        """An unforeseen error: exit 1 and one line with its type, not a traceback."""
        assert ("fatal error: RuntimeError: boom", EXIT_FATAL) == failure(RuntimeError("boom"))
        assert ("interrupted", EXIT_FATAL) == failure(KeyboardInterrupt())


class TestTree:
    @pytest.mark.parametrize(
        ("error", "code"),
        [
            (ConfigError("x"), EXIT_USAGE),
            (SourceError("x"), EXIT_USAGE),
            (DeadLetterError("x"), EXIT_USAGE),
            (StoreError("x"), EXIT_USAGE),
            (UsageError("x"), EXIT_USAGE),
            (StoreBusy("x"), EXIT_FATAL),
            (EnqueueStopped("x"), EXIT_FATAL),
            (ApiRefused("x"), EXIT_AUTH),
            (Fatal("x"), EXIT_FATAL),
        ],
    )
    def test_each_branch_has_its_exit_code(self, error: WorkerError, code: int) -> None:
        """Every error of the tree is a WorkerError and ends a command with its own code."""
        assert ("x", code) == failure(error)
        assert code == error.exit_code

    def test_the_old_homes_name_the_same_classes(self) -> None:
        """The classes are importable where the inputs, sinks and stores always took them."""
        from worker.deadletters import store

        assert (store.StoreError, store.StoreBusy) == (StoreError, StoreBusy)
        assert ConfigError.__mro__[1:3] == (UsageError, WorkerError)
        assert issubclass(ConfigError, ValueError)  # argparse-style callers catch ValueError
