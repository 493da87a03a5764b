"""The account's rate kept in Redis: one schedule (GCRA) that every replica books slots from.

The hash ``<stream>:rate`` holds the next free slot (microseconds, Redis server time) and the
account's spacing (the rate as the replicas last published it: ``--rate R``, or what ``--rate
auto`` learned). Booking is one script run: the slot is the later of the next free one, now,
and the end of a pause any replica was asked for; the schedule moves one spacing past it. Every
replica books from the same schedule, so their requests together keep ``--rate``, and a
replica that sends nothing books nothing: the busy ones get its share. Redis's clock is the
only clock, so replicas' clocks need not agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.core.rate import NS_PER_S, SHARED_ALLOWANCE_S, Schedule, alone_wait, rate_of, spacing_ns

log = structlog.get_logger("worker.backends.redis.rate")

BOOK_SLOT = r"""
-- KEYS[1]: the schedule (a hash: next, spacing); ARGV[1]: this replica's spacing, ARGV[2]: a
-- pause from now (0: none), both in microseconds; ARGV[3]: 1 to publish the spacing as the
-- account's. Returns the microseconds from now until the slot booked, the slot, the spacing.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local stored = redis.call('HMGET', KEYS[1], 'next', 'spacing')
local spacing = tonumber(stored[2] or '0')
if ARGV[3] == '1' or spacing <= 0 then spacing = tonumber(ARGV[1]) end
local slot = tonumber(stored[1] or '0')
if slot < now then slot = now end
local paused = now + tonumber(ARGV[2])
if slot < paused then slot = paused end
redis.call('HSET', KEYS[1], 'next', string.format('%.0f', slot + spacing),
           'spacing', string.format('%.0f', spacing))
redis.call('PEXPIRE', KEYS[1], math.ceil((slot + spacing - now) / 1000) + 600000)
return {slot - now, string.format('%.0f', slot), string.format('%.0f', spacing)}
"""


class RedisRate:
    """Books request slots from ``key`` on the source's Redis (:class:`worker.limiter.SharedRate`).

    While Redis cannot be reached the replica keeps a schedule of its own at the full rate
    (its input cannot be read then either, so little is sent) and logs it once per outage.
    """

    def __init__(self, client: Callable[[], Redis | None], key: str) -> None:
        self._client = client
        self.key = key
        self._script: object | None = None
        self._script_client: Redis | None = None
        self._fallback: Schedule | None = None
        self.slots_us: list[int] | None = None
        """The slots booked, in Redis time (microseconds), when a test asks for them."""

    async def reserve(
        self, rate_per_s: float, paused_until_s: float, publish: bool
    ) -> tuple[float, float]:
        """Book the next slot; the seconds from now until it, and the account's rate."""
        client = self._client()
        spacing_us = max(1, spacing_ns(rate_per_s, SHARED_ALLOWANCE_S) * 1_000_000 // NS_PER_S)
        pause_us = max(0, round(paused_until_s * 1e6))
        try:
            if client is None:
                raise ConnectionError("not connected")
            if self._script is None or self._script_client is not client:
                self._script = client.register_script(BOOK_SLOT)
                self._script_client = client
            args = [spacing_us, pause_us, 1 if publish else 0]
            reply = await self._script(keys=[self.key], args=args)  # type: ignore[operator]
            wait_us, account_us = int(reply[0]), int(reply[2])
            if self.slots_us is not None:
                self.slots_us.append(int(reply[1]))
        except (RedisError, OSError) as exc:
            return self._alone(rate_per_s, paused_until_s, exc), rate_per_s
        if self._fallback is not None:
            log.info("rate.shared_again", key=self.key)
            self._fallback = None
        return wait_us / 1e6, rate_of(account_us, SHARED_ALLOWANCE_S)

    def _alone(self, rate_per_s: float, paused_until_s: float, exc: BaseException) -> float:
        if self._fallback is None:
            log.warning("rate.shared_unavailable", key=self.key, error=str(exc))
        self._fallback, wait = alone_wait(
            self._fallback, rate_per_s, paused_until_s, time.monotonic()
        )
        return wait
