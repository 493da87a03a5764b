"""The account's rate kept in PostgreSQL: one schedule (GCRA) in one row, booked atomically.

The table ``contact_worker_rate`` (created on first use, next to the outbox) holds one row per
input: the next free slot in microseconds of the server's clock, and the account's spacing (the
rate the replicas last published). Booking is one ``UPDATE``:
the row lock orders the replicas, the slot is the later of the row's, now, and the end of a
pause, and the row moves one spacing past it. Every replica books from the same row, so their
requests together keep ``--rate``; a replica with nothing to send books nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog

from worker.backends.postgres.pool import TRANSIENT_ERRORS, create_if_missing
from worker.core.rate import NS_PER_S, SHARED_ALLOWANCE_S, Schedule, alone_wait, rate_of, spacing_ns

log = structlog.get_logger("worker.backends.postgres.rate")

TABLE = "contact_worker_rate"

_NOW_US = "(extract(epoch from clock_timestamp()) * 1000000)::bigint"


class PgRate:
    """Books request slots from the row ``name`` (:class:`worker.limiter.SharedRate`)."""

    def __init__(self, pool: Callable[[], Any], name: str, table: str = TABLE) -> None:
        self._pool = pool
        self.name = name
        self.table = table
        self._ready = False
        self._fallback: Schedule | None = None
        self.slots_us: list[int] | None = None
        """The slots booked, in the server's time (microseconds), when a test asks for them."""
        # The account's spacing: this replica's when it publishes (or none is stored yet).
        spacing = "(CASE WHEN $4::bool OR t.spacing_us <= 0 THEN $3::bigint ELSE t.spacing_us END)"
        self._book = f"""
UPDATE {table} AS t
SET next_us = GREATEST(t.next_us, c.now_us, c.now_us + $2::bigint) + {spacing},
    spacing_us = {spacing}
FROM (SELECT {_NOW_US} AS now_us) AS c
WHERE t.name = $1
RETURNING t.next_us - t.spacing_us - c.now_us, t.next_us - t.spacing_us, t.spacing_us"""

    async def _create(self, conn: Any) -> None:
        await create_if_missing(  # replicas starting together take turns
            conn,
            f"CREATE TABLE IF NOT EXISTS {self.table} (name text PRIMARY KEY,"
            " next_us bigint NOT NULL DEFAULT 0, spacing_us bigint NOT NULL DEFAULT 0)",
        )
        await conn.execute(
            f"INSERT INTO {self.table} (name) VALUES ($1) ON CONFLICT DO NOTHING", self.name
        )
        self._ready = True

    async def reserve(
        self, rate_per_s: float, paused_until_s: float, publish: bool
    ) -> tuple[float, float]:
        """Book the next slot; the seconds from now until it, and the account's rate."""
        spacing_us = max(1, spacing_ns(rate_per_s, SHARED_ALLOWANCE_S) * 1_000_000 // NS_PER_S)
        pause_us = max(0, round(paused_until_s * 1e6))
        pool = self._pool()
        try:
            if pool is None:
                raise ConnectionError("not connected")
            async with pool.acquire() as conn:
                if not self._ready:
                    await self._create(conn)
                wait_us, slot_us, account_us = await conn.fetchrow(
                    self._book, self.name, pause_us, spacing_us, publish
                )
            if self.slots_us is not None:
                self.slots_us.append(slot_us)
        except TRANSIENT_ERRORS as exc:
            return self._alone(rate_per_s, paused_until_s, exc), rate_per_s
        if self._fallback is not None:
            log.info("rate.shared_again", row=self.name)
            self._fallback = None
        return max(0, int(wait_us)) / 1e6, rate_of(account_us, SHARED_ALLOWANCE_S)

    def _alone(self, rate_per_s: float, paused_until_s: float, exc: BaseException) -> float:
        if self._fallback is None:
            log.warning("rate.shared_unavailable", row=self.name, error=str(exc))
        self._fallback, wait = alone_wait(
            self._fallback, rate_per_s, paused_until_s, time.monotonic()
        )
        return wait
