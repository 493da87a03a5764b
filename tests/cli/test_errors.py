"""Every subcommand against a Redis or PostgreSQL that is not there: one clean line, an exit code.

A store that cannot be reached when a command starts is a setting to fix (README "Exit codes"):
exit 2 and one line `contact-worker: ...` on stderr naming it, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.cli.test_cli import BIN, api_env
from tests.cli.test_startup_checks import free_port

LETTER = {
    "reason": "not_found",
    "change": {"ID": "1", "lastname": "Lee"},
    "raw": None,
    "status": 404,
    "error": "404",
    "detail": "contact not found",
    "source": "in.jsonl:1",
    "at": "2026-11-26T14:00:00Z",
}


@pytest.fixture(params=["postgresql", "redis"])
def nowhere(request: pytest.FixtureRequest) -> str:
    """The URI of a store on a port where nothing listens."""
    port = free_port()
    if request.param == "postgresql":
        return f"postgresql://postgres@127.0.0.1:{port}/test"
    return f"redis://127.0.0.1:{port}/0?stream=contacts"


def contact_worker(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it (API settings in the environment, one change on stdin)."""
    letters = tmp_path / "letters.jsonl"
    letters.write_text(json.dumps(LETTER) + "\n")
    (tmp_path / "in.jsonl").write_text('{"ID": "1", "lastname": "Lee"}\n')
    return subprocess.run(
        [BIN, *args],
        input='{"ID": "1", "lastname": "Lee"}\n',
        env=api_env(f"http://127.0.0.1:{free_port()}", tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "command",
    [
        ["init", "--to", "{uri}"],
        ["enqueue", "--to", "{uri}"],
        ["dlq", "show", "{uri}"],
        ["dlq", "replay", "{uri}", "--to", "jsonl:out.jsonl"],
        ["dlq", "replay", "jsonl:letters.jsonl", "--to", "{uri}"],
        ["run", "--source", "{uri}"],
        ["run", "--source", "jsonl:in.jsonl", "--dlq", "{uri}"],
    ],
    ids=["init", "enqueue", "dlq-show", "dlq-replay-from", "dlq-replay-to", "run", "run-dlq"],
)
def test_a_store_not_there_is_one_line_and_exit_2(
    command: list[str], nowhere: str, tmp_path: Path
) -> None:
    """Exit 2, and on stderr exactly one line (besides `run`'s JSON log events) that starts
    `contact-worker: ` and names where it tried; no traceback."""
    result = contact_worker([arg.format(uri=nowhere) for arg in command], tmp_path)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert 2 == result.returncode, result.stderr
    assert 1 == len(lines), result.stderr
    assert lines[0].startswith("contact-worker: "), result.stderr
    assert "127.0.0.1:" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_config_connects_to_nothing(nowhere: str, tmp_path: Path) -> None:
    """`config` only resolves the settings (a script checks them before a deploy, where the
    stores may be out of reach): a store that is not there is not its business, exit 0."""
    result = contact_worker(["config", "--source", nowhere], tmp_path)
    assert (0, "") == (result.returncode, result.stderr)
    assert nowhere in result.stdout
