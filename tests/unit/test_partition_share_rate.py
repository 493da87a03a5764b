"""A Kafka replica's share of the account's rate: its partitions' share, on its own clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.backends.kafka.rate import PartitionShareRate

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_slots_are_spaced_by_the_share() -> None:
    """Holding 2 of 6 partitions at 30 requests/s: 10 requests per 1.025 s, none before a
    pause ends."""
    clock = Clock()
    rate = PartitionShareRate(lambda: 2 / 6, clock)
    waits = [(await rate.reserve(30.0, 0.0, False))[0] for _ in range(4)]
    assert pytest.approx([0.0, 0.1025, 0.205, 0.3075]) == waits
    clock.now += 5.0
    assert pytest.approx(2.0) == (await rate.reserve(30.0, 2.0, False))[0]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=4),
    st.floats(4.0, 200.0),
    st.floats(1.0, 5.0),
)
def test_the_group_never_exceeds_the_account_rate(
    held: list[int], rate_per_s: float, span_s: float
) -> None:
    """Replicas holding disjoint partitions (their shares add up to 1), each booking as fast
    as it may: together never more than the rate in any one-second window (when each share
    is worth a request per second at least)."""
    import anyio

    total = sum(held)
    if any(rate_per_s * h / total < 1 for h in held):
        return  # below a request per second a replica keeps one: documented
    clock = Clock()
    replicas = [PartitionShareRate(lambda h=h: h / total, clock) for h in held]

    async def book() -> list[float]:
        times = []
        for replica in replicas:
            at = clock.now
            while True:
                wait, _ = await replica.reserve(rate_per_s, 0.0, False)
                if wait > span_s:
                    break
                times.append(at + wait)
        return sorted(times)

    times = anyio.run(book)
    for start in times:
        in_window = sum(1 for t in times if start <= t < start + 1.0)
        # Shares are whole requests rounded down with 1e-9 to spare (20 x 0.15 is
        # 2.9999999999999996 in floats, and 3 requests are meant): a rate that float noise
        # put just under a whole number counts as that number.
        assert in_window <= rate_per_s + 1e-6
