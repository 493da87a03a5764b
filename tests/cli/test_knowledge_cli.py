"""ID knowledge at user level: `contact-worker run` twice over the same contacts, against
`contact-worker simulate`, the knowledge lasting in a SQLite file between the runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
from operator import itemgetter
from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_cli import BIN, Gateway, run, summary, worker_env

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


def state(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN, "state", *args], capture_output=True, text=True, timeout=30, env=clean_env()
    )


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "SMSGW_"))}


@pytest.mark.slow
def test_state_show_and_clear(gateway: Gateway, tmp_path: Path) -> None:
    """`state show` counts what a run learnt; `state clear` forgets it; the next run then
    isolates the missing IDs again."""
    source, db = tmp_path / "in.jsonl", tmp_path / "state.db"
    env = worker_env(gateway, tmp_path, WORKER_LOG_FORMAT="json")
    write_changes(source, "first")
    assert 0 == run(["--source", f"jsonl:{source}", "--state", f"sqlite:{db}"], env).returncode
    shown = state("show", f"jsonl:{source}", "--state", f"sqlite:{db}", "--json")
    assert 0 == shown.returncode, shown.stderr
    assert (len(KNOWN), len(MISSING)) == itemgetter("exists", "missing")(json.loads(shown.stdout))
    cleared = state("clear", f"jsonl:{source}", "--state", f"sqlite:{db}")
    assert (0, f"forgot {len(KNOWN) + len(MISSING)} IDs") == (
        cleared.returncode,
        cleared.stdout.strip().rpartition(": ")[2],
    )
    again = run(["--source", f"jsonl:{source}", "--state", f"sqlite:{db}"], env)
    assert summary(again.stderr)["isolation_requests"] > 0


def test_state_of_a_file_input_needs_a_state_file() -> None:
    """A jsonl: input has no store of its own: `state show` says to name one, exit 2."""
    shown = state("show", "jsonl:in.jsonl")
    assert 2 == shown.returncode
    assert "--state sqlite:PATH" in shown.stderr


def test_unreachable_store_exits_1() -> None:
    """A store that cannot be reached: one line naming it, exit 1."""
    shown = state("show", "redis://127.0.0.1:1/0?stream=s")
    assert 1 == shown.returncode
    assert "127.0.0.1:1" in shown.stderr


def test_config_names_the_store() -> None:
    """`contact-worker config` shows where ID knowledge lasts: the input's store by default."""
    env = clean_env() | {"SMSGW_CLIENT_ID": "a", "SMSGW_CLIENT_SECRET": "b"}
    shown = subprocess.run(
        [BIN, "config", "--source", "sqlite:/tmp/spool.db", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert 0 == shown.returncode, shown.stderr
    state_setting = json.loads(shown.stdout)["settings"]["state"]
    assert "sqlite:/tmp/spool.db (id_knowledge)" in state_setting["store"]


@pytest.mark.slow
def test_contradicted_knowledge_stops_the_run(tmp_path: Path) -> None:
    """Contacts applied by the first run answered 404 one by one by the second (the URL now
    leads to an account that knows none of them): exit 1 after --max-contradictions, nothing
    dead-lettered on their account."""
    source, db = tmp_path / "in.jsonl", tmp_path / "state.db"
    args = ["--source", f"jsonl:{source}", "--state", f"sqlite:{db}"]
    source.write_text("".join(json.dumps({"ID": str(i), "lastname": "x"}) + "\n" for i in KNOWN))
    first = Gateway("--known-count", "500", "--latency", "1")
    try:
        assert 0 == run(args, worker_env(first, tmp_path)).returncode
    finally:
        first.stop()
    other = Gateway("--known-count", "0", "--latency", "1")
    try:
        second = run(args, worker_env(other, tmp_path, WORKER_LOG_FORMAT="json"))
    finally:
        other.stop()
    assert 1 == second.returncode, second.stderr
    assert "applied each of them lately" in second.stderr
    assert [] == dead_letters(tmp_path / "dead.jsonl")
