"""Retry delays: capped exponential backoff with full jitter, ``Retry-After`` honoured."""

from __future__ import annotations

from dataclasses import dataclass

MAX_RETRY_AFTER_S = 300.0
"""The default of ``--max-retry-after``: a server asking for more than five minutes is taken
to mean five minutes (we check back then; a longer wish comes again with the next 429)."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays for the n-th retry of one request; randomness comes in as ``rand`` in [0, 1)."""

    base_s: float = 0.1
    cap_s: float = 30.0
    max_retry_after_s: float = MAX_RETRY_AFTER_S
    """The longest ``Retry-After`` honoured (--max-retry-after); a longer one is capped."""

    def delay(self, attempt: int, rand: float, retry_after_s: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt`` (1 = the first retry)."""
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(attempt - 1, 62))
        jittered = rand * ceiling
        if retry_after_s is None:
            return jittered
        # The server's wish is a floor; a little jitter keeps many senders from waking together.
        return min(retry_after_s, self.max_retry_after_s) + rand * self.base_s


RECONNECT_BACKOFF = Backoff(base_s=0.1, cap_s=5.0)
"""Waits between attempts while a store (Redis, PostgreSQL) is unreachable: at most 5 s, so the
worker resumes soon after it is back."""
