"""A fresh schema in the real PostgreSQL (127.0.0.1:5432, database ``test``) for each test."""

from __future__ import annotations

import os
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from worker.backends.postgres.producer import init

BASE_DSN = os.environ.get("WORKER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass
class Db:
    """One test's schema: URIs into it, and an admin connection to look inside."""

    schema: str
    app: str
    """The application_name of the worker's connections, to find them in pg_stat_activity."""
    admin: Any

    def uri(self, **params: object) -> str:
        """The worker's URI for the outbox in this schema, with these parameters."""
        query = {"schema": self.schema, "application_name": self.app, **params}
        return f"{BASE_DSN}?{urllib.parse.urlencode(query)}"

    @property
    def outbox(self) -> str:
        return f"{self.schema}.contact_changes"

    async def rows(self) -> list[Any]:
        """The outbox rows, in id order."""
        return await self.admin.fetch(  # type: ignore[no-any-return]
            f"SELECT id, contact_id, change::text AS change, claimed_by, claimed_until"
            f" FROM {self.outbox} ORDER BY id"
        )

    async def activity(self, condition: str) -> int:
        """How many of the worker's connections match this pg_stat_activity condition.

        Fresh on every call, also inside a transaction (where PostgreSQL would otherwise keep
        answering from the snapshot taken by the transaction's first look)."""
        await self.admin.execute("SELECT pg_stat_clear_snapshot()")
        return await self.admin.fetchval(  # type: ignore[no-any-return]
            f"SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND {condition}",
            self.app,
        )

    async def dead(self) -> list[str]:
        """The dead letters, as JSON text, in insertion order."""
        rows = await self.admin.fetch(
            f"SELECT letter::text FROM {self.schema}.contact_changes_dead ORDER BY id"
        )
        return [row[0] for row in rows]


@pytest.fixture
async def db() -> AsyncIterator[Db]:
    """A schema ``test_<uuid>`` holding the outbox (created by ``init``), dropped afterwards."""
    try:
        admin = await asyncpg.connect(BASE_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL is needed at {BASE_DSN} (.ci/run starts it): {exc}")
    tag = uuid.uuid4().hex[:12]
    d = Db(schema=f"test_{tag}", app=f"cw_test_{tag}", admin=admin)
    try:
        await init(d.uri())
        yield d
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {d.schema} CASCADE")
        await admin.close()
