"""The account's rate split between the replicas of one consumer group, by partition share.

Kafka offers no shared store to book request slots in (as Redis and PostgreSQL replicas do),
so each replica keeps its own smooth schedule at its share, ``rate x held / partitions``, in
whole requests: ``k = floor(share)`` (at least 1) per :data:`~worker.core.rate.JITTER_ALLOWANCE_S`
-widened second, as the single-replica schedule keeps R. The group hands each partition to one
member, so the members' ``k`` add up to at most the account's rate (to a little less: the
floors), in any one-second window. A member that holds nothing keeps one request per second
(for retries of what it had in flight): below one request per second per replica, the sum can
pass the rate. The share follows each rebalance; an idle replica's share is not lent out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from worker.core.rate import SHARED_ALLOWANCE_S


class PartitionShareRate:
    """A :class:`~worker.limiter.SharedRate` kept on this replica's own clock."""

    def __init__(
        self, share: Callable[[], float], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._share = share
        self._clock = clock
        self._next = float("-inf")

    async def reserve(
        self, rate_per_s: float, paused_until_s: float, publish: bool
    ) -> tuple[float, float]:
        """Book the next slot at this replica's share of ``rate_per_s``: the seconds until
        it, and the account's rate (this replica's own: nothing is published to others)."""
        now = self._clock()
        whole = max(1, math.floor(rate_per_s * self._share() + 1e-9))
        interval = (1.0 + SHARED_ALLOWANCE_S) / whole
        slot = max(now + paused_until_s, self._next)
        self._next = slot + interval
        return slot - now, rate_per_s
