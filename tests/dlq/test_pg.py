"""``dlq show`` and ``dlq replay`` on the PostgreSQL table ``<table>_dead`` (the real server)."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest

from tests.cli.test_cli import Gateway
from tests.dlq.conftest import (
    BIN,
    DEAD,
    MISSING,
    Dlq,
    applied_after_replay,
    applied_first,
    input_bytes,
    psql,
    reasons,
    run_worker,
    tally,
)
from tests.pg.conftest import BASE_DSN
from worker.backends.postgres import producer as pg_enqueue
from worker.backends.postgres.uri import ADVISORY_CLASS
from worker.cli import main


@pytest.fixture
def schema() -> Iterator[str]:
    """A schema of this test's own, dropped afterwards."""
    name = f"dlq_{uuid.uuid4().hex[:12]}"
    yield name
    psql(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def outbox_uri(schema: str, **params: str) -> str:
    return f"{BASE_DSN}?{urllib.parse.urlencode({'schema': schema, **params})}"


def init(uri: str) -> None:
    assert 0 == main(["init", "--to", uri])


def counts(schema: str) -> tuple[int, int]:
    """(rows waiting in the outbox, dead letters)."""
    pending, dead = psql(
        f"SELECT (SELECT count(*) FROM {schema}.contact_changes),"
        f" (SELECT count(*) FROM {schema}.contact_changes_dead)"
    ).split("|")
    return int(pending), int(dead)


def insert_letters(schema: str, letters: list[dict[str, object]]) -> None:
    values = ", ".join(
        "('" + json.dumps(letter).replace("'", "''") + "'::jsonb)" for letter in letters
    )
    psql(f"INSERT INTO {schema}.contact_changes_dead (letter) VALUES {values}")


class TestRoundTrip:
    @pytest.mark.slow
    def test_show_replay_run_again(
        self, dlq: Dlq, gateway: Gateway, schema: str, tmp_path: Path
    ) -> None:
        """A real run dead-letters into `contact_changes_dead`; `show` counts them; replayed
        into the outbox of the same database, rows are inserted and marked in one transaction;
        the next run applies them; a second replay sends none."""
        uri = outbox_uri(schema)
        init(uri)
        anyio.run(pg_enqueue.enqueue, uri, input_bytes().splitlines())
        run_worker(gateway, tmp_path, uri, lambda: counts(schema) == (0, 8))
        assert applied_first() == gateway.get("/_sim/contacts")

        summary = dlq("show", uri, "--json").json()
        assert (DEAD, 8, 0, 6) == tally(summary)

        gateway.configure(known_count=200)
        report = dlq("replay", uri, "--to", uri, "--reason", "not_found", "--json").json()
        assert ({"not_found": 5}, True) == (report["replayed"], report["atomic"])
        assert (5, 8) == counts(schema)
        marked = psql(
            f"SELECT count(*) FROM {schema}.contact_changes_dead WHERE replayed_at IS NOT NULL"
        )
        assert "5" == marked

        run_worker(
            gateway,
            tmp_path,
            uri,
            lambda: (
                counts(schema)[0] == 0 and gateway.get("/_sim/contacts") == applied_after_replay()
            ),
        )
        again = dlq("replay", uri, "--to", uri, "--reason", "not_found", "--json").json()
        assert ({}, {"not_found": 5}) == (again["replayed"], again["already_replayed"])
        assert (0, 8) == counts(schema)


class TestReplay:
    def test_into_another_input_then_marked(self, dlq: Dlq, schema: str, tmp_path: Path) -> None:
        """Replayed into an input elsewhere (a file here), the changes are written first, then
        their rows get `replayed_at`; letters without a change are skipped and counted."""
        uri = outbox_uri(schema)
        init(uri)
        insert_letters(
            schema,
            [
                *({"reason": "not_found", "change": c} for c in MISSING[:2]),
                {"reason": "invalid", "change": None, "raw": "{oops"},
            ],
        )
        out = tmp_path / "out.jsonl"
        report = dlq("replay", uri, "--to", f"jsonl:{out}", "--json").json()
        assert ({"not_found": 2}, {"invalid": 1}, False) == (
            report["replayed"],
            report["without_change"],
            report["atomic"],
        )
        assert MISSING[:2] == [json.loads(line) for line in out.read_text().splitlines()]
        assert "2" == psql(
            f"SELECT count(*) FROM {schema}.contact_changes_dead WHERE replayed_at IS NOT NULL"
        )

    def test_a_table_from_before_replays(self, dlq: Dlq, schema: str, tmp_path: Path) -> None:
        """A dead-letter table without `replayed_at` (created by an older `init`) can be shown;
        a replay asks for `init`, which adds the column, and then works."""
        uri = outbox_uri(schema)
        init(uri)
        psql(f"ALTER TABLE {schema}.contact_changes_dead DROP COLUMN replayed_at")
        insert_letters(schema, [{"reason": "not_found", "change": MISSING[0]}])
        assert {"not_found": 1} == reasons(dlq("show", uri, "--json").json())
        out = f"jsonl:{tmp_path / 'out.jsonl'}"
        refused = dlq("replay", uri, "--to", out)
        assert 2 == refused.code
        assert "contact-worker init --to URI" in refused.stderr
        init(uri)
        init(uri)  # idempotent
        assert {"not_found": 1} == dlq("replay", uri, "--to", out, "--json").json()["replayed"]

    def test_a_missing_table_is_a_clear_error(self, dlq: Dlq, schema: str) -> None:
        """No `<table>_dead` (no `init` yet): exit 2, and the message says what to run."""
        result = dlq("show", outbox_uri(schema))
        assert 2 == result.code
        assert "does not exist" in result.stderr and "contact-worker init" in result.stderr

    @pytest.mark.slow
    @pytest.mark.anyio
    async def test_a_second_replay_at_once_is_refused(self, schema: str, tmp_path: Path) -> None:
        """While another session holds the table's replay lock, a replay exits 1."""
        uri = outbox_uri(schema)
        await pg_enqueue.init(uri)
        insert_letters(schema, [{"reason": "not_found", "change": MISSING[0]}])
        conn = await asyncpg.connect(BASE_DSN)
        try:
            oid = await conn.fetchval(f"SELECT '{schema}.contact_changes_dead'::regclass::oid")
            await conn.execute("SELECT pg_advisory_lock($1::int, $2::int)", ADVISORY_CLASS, oid)
            result = await anyio.to_thread.run_sync(
                lambda: subprocess.run(
                    [BIN, "dlq", "replay", uri, "--to", f"jsonl:{tmp_path / 'out.jsonl'}"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
            )
        finally:
            await conn.close()
        assert 1 == result.returncode
        assert "another `dlq replay`" in result.stderr
