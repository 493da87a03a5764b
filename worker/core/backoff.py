"""Retry delays: capped exponential backoff with full jitter, ``Retry-After`` honoured."""

from __future__ import annotations

from dataclasses import dataclass

MAX_RETRY_AFTER_S = 3600.0
"""A server asking for more than an hour is taken to mean an hour: we check back then."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays for the n-th retry of one request; randomness comes in as ``rand`` in [0, 1)."""

    base_s: float = 0.1
    cap_s: float = 30.0

    def delay(self, attempt: int, rand: float, retry_after_s: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt`` (1 = the first retry)."""
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(attempt - 1, 62))
        jittered = rand * ceiling
        if retry_after_s is None:
            return jittered
        # The server's wish is a floor; a little jitter keeps many senders from waking together.
        return min(retry_after_s, MAX_RETRY_AFTER_S) + rand * self.base_s


RECONNECT_BACKOFF = Backoff(base_s=0.1, cap_s=5.0)
"""Waits between attempts while a store (Redis, PostgreSQL) is unreachable: at most 5 s, so the
worker resumes soon after it is back."""
