"""What the ``dlq`` tests share: a real worker run that leaves dead letters, and the command."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_cli import BIN, Gateway, worker_env
from tests.cli.test_cli_inputs import REDIS, psql, redis_cli  # noqa: F401 - used by the tests
from tests.engine.harness import expected_state
from tests.redis.conftest import redis_url  # noqa: F401 - a fixture of these tests too
from worker.cli import main

KNOWN = 30
"""The simulator knows contacts "1".."30" at first; "101".."105" are created later."""

GOOD = [{"ID": str(i), "lastname": f"L{i}"} for i in range(1, 21)]
MISSING = [{"ID": str(i), "firstname": f"F{i}"} for i in range(101, 106)]
BAD_PHONE = {"ID": "21", "phone": "call me"}
UNKNOWN_FIELD = {"ID": "7", "nickname": "x"}

CHANGES: list[dict[str, Any] | bytes] = [
    *GOOD[:10],
    *MISSING[:3],
    BAD_PHONE,
    b"{oops",
    *GOOD[10:],
    UNKNOWN_FIELD,
    *MISSING[3:],
]
"""A run on these leaves 5 ``not_found`` letters (101..105), 1 ``rejected`` (21's phone) and 2
``invalid``: ``{oops`` without a change, the unknown field with one."""

DEAD = {"not_found": 5, "rejected": 1, "invalid": 2}


def input_bytes(changes: list[dict[str, Any] | bytes] = CHANGES) -> bytes:
    """The changes as JSONL."""
    return b"".join(
        (c if isinstance(c, bytes) else json.dumps(c).encode()) + b"\n" for c in changes
    )


def applied_first() -> dict[str, dict[str, Any]]:
    """What the API holds after the first run: the good changes only."""
    return expected_state(GOOD)


def applied_after_replay() -> dict[str, dict[str, Any]]:
    """What the API holds once the missing contacts were created and replayed."""
    return expected_state([*GOOD, *MISSING])


@dataclass
class Outcome:
    """What a ``contact-worker dlq`` command did."""

    code: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        """Its ``--json`` answer; it must have exited 0."""
        assert 0 == self.code, self.stderr
        answer: dict[str, Any] = json.loads(self.stdout)
        return answer


Dlq = Callable[..., Outcome]


@pytest.fixture
def dlq(capsys: pytest.CaptureFixture[str]) -> Dlq:
    """``contact-worker dlq ARGS``, in this process (the worker runs are processes of their own:
    starting one more interpreter per command would only cost time)."""

    def command(*args: str) -> Outcome:
        capsys.readouterr()
        code = main(["dlq", *args])
        out, err = capsys.readouterr()
        return Outcome(code, out, err)

    return command


def dlq_process(*args: str) -> Outcome:
    """``contact-worker dlq ARGS`` as a separate process, as a user runs it."""
    result = subprocess.run(
        [BIN, "dlq", *args], capture_output=True, text=True, timeout=60, check=False
    )
    return Outcome(result.returncode, result.stdout, result.stderr)


def reasons(summary: dict[str, Any]) -> dict[str, int]:
    """Letters per reason in a ``dlq show --json`` answer."""
    return {reason: c["letters"] for reason, c in summary["by_reason"].items()}


def tally(summary: dict[str, Any]) -> tuple[dict[str, int], int, int, int]:
    """Letters per reason, letters, replayed and waiting in a ``dlq show --json`` answer."""
    return reasons(summary), summary["letters"], summary["replayed"], summary["waiting"]


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    """The simulated API, knowing contacts 1..30."""
    gw = Gateway("--known-count", str(KNOWN), "--latency", "1")
    yield gw
    gw.stop()


def run_worker(
    gw: Gateway, tmp_path: Path, source: str, until: Callable[[], bool], **env: str
) -> str:
    """``contact-worker run --source SOURCE`` (dead letters to the input's own store unless
    ``WORKER_DLQ`` is given) until ``until()`` holds, then SIGTERM; its stderr."""
    environ = worker_env(gw, tmp_path, **env)
    if "WORKER_DLQ" not in env:
        del environ["WORKER_DLQ"]
    proc = subprocess.Popen(
        [BIN, "run", "--source", source], env=environ, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while not until():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the worker did not get there in 30 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert 0 == proc.returncode, stderr
    return stderr
