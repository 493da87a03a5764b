"""The rate limiter every request goes through: the async shell around ``worker.core.rate``.

Every request the worker makes counts: the start-up check, the engine's requests, their
retries and the isolation requests. A sender waits with :meth:`RateLimiter.ready` until the
schedule has a slot (before it takes a batch, so that the batch is formed as late as
possible), then :meth:`RateLimiter.acquire` counts its request just before it is sent (with
no wait in between when no other sender took the slot meanwhile). Counting at the moment of
sending, not at the moment a slot was promised, is what keeps the one-second windows exact
whatever a sender did in between.

A shared limiter (:class:`SharedRate`, kept in Redis or PostgreSQL) books slots from one
schedule that all replicas of an account use; see ``worker.backends.*.rate``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio

from worker.core.rate import SHARED_LATE_SLACK_S, Schedule, ScheduleStatistics

BINDING_WINDOW_S = 1.0
BINDING_SHARE = 0.6
"""The rate binds when the last BINDING_WINDOW_S used at least this share of it."""


class SharedRate(Protocol):
    """A schedule kept in a store that replicas share: books one slot, says when it is."""

    async def reserve(
        self, rate_per_s: float, paused_until_s: float, publish: bool
    ) -> tuple[float, float]:
        """Book the next slot (none before ``paused_until_s`` seconds from now, 0: no pause)
        at the account's rate; ``publish``: ``rate_per_s`` is the account's rate from now on.
        The seconds from now until the slot, and the account's rate."""
        ...


class RateLimiter:
    """Waits for the schedule: :meth:`ready`, then :meth:`acquire` just before sending."""

    def __init__(
        self,
        rate_per_s: float,
        *,
        shared: SharedRate | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.schedule = Schedule(rate_per_s)
        self.shared = shared
        self._clock = clock
        self._sleep = sleep
        self.wait_s = 0.0
        """Time requests waited for their slot, summed over senders."""
        self._publish = True
        """The next booking publishes this replica's rate as the account's (at the start, and
        after ``--rate auto`` moved it)."""
        self.account_rate: float | None = None
        """The rate the account's shared schedule keeps (what a replica last published)."""
        self._booked_ahead_at = -1e18
        """When a shared slot last lay in the future: the account's rate held a sender back."""
        self.late_slots = 0
        """Shared slots given up because the sender woke too late for them."""
        self._sent: deque[float] = deque()
        """When the requests of the last BINDING_WINDOW_S went."""

    @property
    def rate_per_s(self) -> float:
        """The rate kept now."""
        return self.schedule.rate_per_s

    def set_rate(self, rate_per_s: float) -> None:
        """Keep another rate from now on (``--rate auto`` learned it)."""
        if rate_per_s != self.schedule.rate_per_s:
            self.schedule.set_rate(rate_per_s, self._clock())
            self._publish = True
            self.account_rate = None  # what was read before is older than this change

    def follow(self, rate_per_s: float) -> None:
        """Keep the rate another replica published for the account (not published again)."""
        if rate_per_s != self.schedule.rate_per_s:
            self.schedule.set_rate(rate_per_s, self._clock())

    def pause_until(self, until: float) -> None:
        """No request before ``until`` (clock time); the senders then resume at the rate."""
        self.schedule.pause_until(until)

    def paused_s(self, now: float | None = None) -> float:
        """Seconds the pause still lasts (0: not paused)."""
        now = self._clock() if now is None else now
        return max(0.0, self.schedule.paused_until - now)

    async def ready(self) -> None:
        """Wait until a request could go now (nothing counted): the local schedule's slot;
        with a shared schedule, the end of a pause (the store books the slot)."""
        while True:
            wait = self._wait_now()
            if wait <= 0.0:
                return
            await self._timed_sleep(wait)

    def _wait_now(self) -> float:
        now = self._clock()
        if self.shared is not None:
            return max(0.0, self.schedule.paused_until - now)
        return self.schedule.wait_s(now)

    async def acquire(self) -> None:
        """Count one request that goes now, waiting first for its slot if it must."""
        if self.shared is not None:
            await self._acquire_shared(self.shared)
            return
        schedule = self.schedule
        while not schedule.take(self._clock()):
            await self._timed_sleep(schedule.wait_s(self._clock()))
        self._count(self._clock())

    async def _acquire_shared(self, shared: SharedRate) -> None:
        """Book a slot in the store, sleep until it. The slot is reckoned from when the
        booking was sent (the store answered later, so the real slot is no earlier): a
        sender that finds itself more than SHARED_LATE_SLACK_S past it (a slow answer, a busy
        machine) books another rather than crowd the next replica's request, however many
        times it takes. The schedule's spacing covers that slack (SHARED_ALLOWANCE_S)."""
        while True:
            await self.ready()
            sent_at = self._clock()
            wait, account = await shared.reserve(
                self.schedule.rate_per_s, self.paused_s(), self._publish
            )
            self._publish = False
            self.account_rate = account
            slot = sent_at + wait
            now = self._clock()
            if slot > now:
                self._booked_ahead_at = slot
                await self._timed_sleep(slot - now)
            now = self._clock()
            if now - slot <= SHARED_LATE_SLACK_S:
                self.schedule.taken += 1
                self._count(now)
                return
            self.late_slots += 1

    async def _timed_sleep(self, wait_s: float) -> None:
        started = self._clock()
        await self._sleep(wait_s)
        self.wait_s += self._clock() - started

    def _count(self, now: float) -> None:
        sent = self._sent
        sent.append(now)
        while now - sent[0] > BINDING_WINDOW_S:
            sent.popleft()

    def binding(self, now: float) -> bool:
        """Whether the rate binds: the last BINDING_WINDOW_S used at least BINDING_SHARE of
        what it allowed. Only then may ``--rate auto`` grow: a worker with little to send
        learns nothing about the API's limit."""
        if self.shared is not None:
            # This replica's own share of the requests says nothing (the others send too):
            # the account's schedule binds when it made a sender wait.
            return now - self._booked_ahead_at <= BINDING_WINDOW_S
        sent = self._sent
        while sent and now - sent[0] > BINDING_WINDOW_S:
            sent.popleft()
        allowed = self.schedule.rate_per_s * BINDING_WINDOW_S
        return len(sent) >= max(1.0, BINDING_SHARE * allowed)

    def statistics(self) -> ScheduleStatistics:
        """The schedule's rate, requests counted and last pause."""
        return self.schedule.statistics()
