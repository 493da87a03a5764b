"""ID knowledge at user level: `contact-worker run` twice over the same contacts, against
`contact-worker simulate`, the knowledge lasting in a SQLite file between the runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_cli import Gateway, run, summary, worker_env

KNOWN = list(range(1, 496))
MISSING = list(range(9001, 9006))
"""1 % of the 500 contacts are unknown to the API."""


def write_changes(path: Path, value: str) -> None:
    ids = KNOWN[:250] + MISSING + KNOWN[250:]
    path.write_text("".join(json.dumps({"ID": str(i), "lastname": value}) + "\n" for i in ids))


def dead_letters(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def gateway() -> Any:
    gw = Gateway("--known-count", "500", "--latency", "1")
    yield gw
    gw.stop()


@pytest.mark.slow
class TestKnowledgeAcrossRuns:
    """The second run over the same contacts, after a restart, needs ceil(contacts / B)
    requests and spends none on the IDs known missing."""

    def second_run(self, gateway: Gateway, tmp_path: Path, *state: str) -> tuple[int, int, Any]:
        source = tmp_path / "in.jsonl"
        env = worker_env(gateway, tmp_path, WORKER_BATCH_SIZE="100", WORKER_LOG_FORMAT="json")
        args = ["--source", f"jsonl:{source}", *state]
        write_changes(source, "first")
        assert 0 == run(args, env).returncode
        before = gateway.get("/_sim/stats")["requests"]
        write_changes(source, "second")
        second = run(args, env)
        assert 0 == second.returncode, second.stderr
        requests = gateway.get("/_sim/stats")["requests"] - before
        contacts = gateway.get("/_sim/contacts")
        assert all(contacts[str(i)]["lastname"] == "second" for i in KNOWN)
        return requests, len(dead_letters(tmp_path / "dead.jsonl")), summary(second.stderr)

    def test_with_state_file(self, gateway: Gateway, tmp_path: Path) -> None:
        """With --state sqlite:PATH: the start-up check and full batches, nothing more; the
        missing IDs dead-lettered again, citing the first run's answers."""
        state = ["--state", f"sqlite:{tmp_path / 'state.db'}"]
        requests, dead, done = self.second_run(gateway, tmp_path, *state)
        full_batches = math.ceil(len(KNOWN) / 100)
        assert 1 + full_batches == requests  # the start-up check, then full batches only
        assert 2 * len(MISSING) == dead
        letters = dead_letters(tmp_path / "dead.jsonl")[len(MISSING) :]
        assert all("earlier 404" in letter["detail"] for letter in letters)
        assert 0 == done["isolation_requests"]

    def test_memory_only_forgets(self, gateway: Gateway, tmp_path: Path) -> None:
        """Without a store the second run isolates the missing IDs all over again."""
        requests, dead, done = self.second_run(gateway, tmp_path, "--state", "memory")
        assert 2 * len(MISSING) == dead
        assert done["isolation_requests"] > 0
        assert requests > 1 + math.ceil(len(KNOWN) / 100)
