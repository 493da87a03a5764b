"""Replicas sharing the account's rate through a store whose answers come back late: the
lateness of an answer never lets R + 1 requests into one second.

The store here books from one schedule kept as the Redis and PostgreSQL scripts keep it
(the shared spacing, a pause, the store's own clock), and answers after a random delay: the
delays a busy Redis or network give, which the real services on 127.0.0.1 do not give on
demand. What is under test is the limiter's handling of them.
"""

from __future__ import annotations

import random
import time

import anyio
import pytest

from worker.core.rate import NS_PER_S, SHARED_ALLOWANCE_S, most_in_window, spacing_ns
from worker.limiter import RateLimiter

RATE = 40.0


class SlowStore:
    """One shared schedule, booked at once, answered after 0 to ``delay_s``."""

    def __init__(self, delay_s: float, rand: random.Random) -> None:
        self.delay_s = delay_s
        self.rand = rand
        self.next_ns = 0

    async def reserve(
        self, rate_per_s: float, paused_until_s: float, publish: bool
    ) -> tuple[float, float]:
        now_ns = time.monotonic_ns()
        slot_ns = max(self.next_ns, now_ns + round(paused_until_s * NS_PER_S))
        self.next_ns = slot_ns + spacing_ns(rate_per_s, SHARED_ALLOWANCE_S)
        await anyio.sleep(self.rand.uniform(0.0, self.delay_s))  # the answer's way back
        return (slot_ns - now_ns) / NS_PER_S, rate_per_s


@pytest.mark.slow
@pytest.mark.parametrize("delay_s", [0.005, 0.015, 0.03])
def test_late_answers_never_crowd_a_second(delay_s: float) -> None:
    rand = random.Random(int(delay_s * 1000))
    store = SlowStore(delay_s, rand)
    sent: list[int] = []

    async def sender(limiter: RateLimiter, until: float) -> None:
        while time.monotonic() < until:
            await limiter.acquire()
            sent.append(time.monotonic_ns())

    async def main() -> None:
        until = time.monotonic() + 2.5
        async with anyio.create_task_group() as tg:
            for _ in range(3):  # three replicas of three senders each
                limiter = RateLimiter(RATE, shared=store)
                for _ in range(3):
                    tg.start_soon(sender, limiter, until)

    anyio.run(main)
    sent.sort()
    assert len(sent) >= 0.7 * RATE * 2.5  # the rate is still used
    assert most_in_window(sent) <= RATE
