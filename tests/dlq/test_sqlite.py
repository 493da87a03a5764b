"""``dlq show`` and ``dlq replay`` on a ``sqlite:`` spool's ``dead_letters``."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest

from tests.cli.test_cli import Gateway
from tests.dlq.conftest import (
    DEAD,
    Dlq,
    applied_after_replay,
    applied_first,
    input_bytes,
    reasons,
    run_worker,
)
from worker.backends.sqlite import producer as sqlite_spool


def counts(spool: Path) -> tuple[int, int, int]:
    """(changes waiting, dead letters, dead letters marked replayed)."""
    db = sqlite3.connect(spool)
    try:
        waiting = db.execute("SELECT count(*) FROM changes").fetchone()[0]
        dead = db.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        marked = 0
        if "dead_letters_replayed" in tables:
            marked = db.execute("SELECT count(*) FROM dead_letters_replayed").fetchone()[0]
    finally:
        db.close()
    return int(waiting), int(dead), int(marked)


@pytest.mark.slow
def test_show_replay_run_again(dlq: Dlq, gateway: Gateway, tmp_path: Path) -> None:
    """A real run dead-letters into the spool; replayed into the same spool, the changes are
    appended and marked in one transaction; the next run applies them; a second replay sends
    none."""
    spool = tmp_path / "spool.db"
    uri = f"sqlite:{spool}"
    anyio.run(sqlite_spool.enqueue, uri, input_bytes().splitlines())
    run_worker(gateway, tmp_path, uri, lambda: counts(spool) == (0, 8, 0))
    assert applied_first() == gateway.get("/_sim/contacts")
    summary = dlq("show", uri, "--json").json()
    assert (DEAD, 0, 6) == (reasons(summary), summary["replayed"], summary["waiting"])

    gateway.configure(known_count=200)
    report = dlq("replay", uri, "--to", uri, "--reason", "not_found", "--json").json()
    assert ({"not_found": 5}, True) == (report["replayed"], report["atomic"])
    # The input's ID knowledge forgets them: their changes go out, not dead-lettered at once.
    assert 5 == report["knowledge_forgotten"]
    assert (5, 8, 5) == counts(spool)

    run_worker(
        gateway,
        tmp_path,
        uri,
        lambda: counts(spool)[0] == 0 and gateway.get("/_sim/contacts") == applied_after_replay(),
    )
    again = dlq("replay", uri, "--to", uri, "--reason", "not_found", "--json").json()
    assert ({}, {"not_found": 5}) == (again["replayed"], again["already_replayed"])
    assert 5 == dlq("show", uri, "--json").json()["replayed"]


def test_a_missing_spool_is_a_clear_error(dlq: Dlq, tmp_path: Path) -> None:
    """`show` never creates a spool: a missing file is exit 2."""
    result = dlq("show", f"sqlite:{tmp_path / 'nope.db'}")
    assert 2 == result.code
    assert "no spool file" in result.stderr
    assert not (tmp_path / "nope.db").exists()
