"""The limits a run is measured against, and what halving costs: pure arithmetic, no I/O.

* The time the rate allows: the fewest requests that can carry the work, over the rate.
* The information bound: ``n`` contacts of which a share ``p`` is unknown to the API need at
  least ``max(n / B, n * H(p))`` requests. ``n / B`` because a request carries at most ``B``
  contacts; ``n * H(p)`` because each request answers yes/no (applied or 404), one bit at most,
  and telling which of the ``n`` IDs are unknown takes ``log2 C(n, pn) ~ n * H(p)`` bits.
* Halving: what finding the unknown IDs of a refused batch costs, plain (both halves sent) and
  as the worker did before generalized binary splitting (``inferred``: the second half is not
  sent when the first half was applied, it is known bad). Exact expectations for independent
  unknowns, and exact counts for a given batch.
* Splitting: what the worker does now (``worker.core.grouptest``, Hwang's generalized binary
  splitting): groups sized for the unknown share, and the second half of a refused half
  returned to the fresh IDs rather than sent on its own.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from functools import lru_cache

from worker.core.grouptest import group_size

PLAIN, INFERRED, SPLITTING = "plain", "inferred", "splitting"
SCHEMES = (PLAIN, INFERRED, SPLITTING)
HALVING = (PLAIN, INFERRED)


def binary_entropy(p: float) -> float:
    """H(p) in bits: the information in one yes/no that is yes with probability p."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be between 0 and 1, got {p}")
    if p in (0.0, 1.0):
        return 0.0
    return -p * math.log2(p) - (1.0 - p) * math.log2(1.0 - p)


def information_bound(contacts: int, unknown_share: float, batch_size: int) -> float:
    """The fewest requests (a real number) for ``contacts`` IDs, a share of them unknown."""
    if contacts < 0 or batch_size < 1:
        raise ValueError("contacts must be >= 0 and batch_size >= 1")
    return max(contacts / batch_size, contacts * binary_entropy(unknown_share))


def requests_needed(contacts: int, unknown_share: float, batch_size: int) -> int:
    """The information bound in whole requests: at least ceil(contacts / batch_size)."""
    bound = information_bound(contacts, unknown_share, batch_size)
    # round() first: n/B computed in floats can land a hair above an integer.
    return max(math.ceil(contacts / batch_size), math.ceil(round(bound, 9)))


def effective_rate(worker_rate: float, api_rate_limit: float) -> float:
    """The requests/s that bind: the lower of the worker's and the API's; 0 means no limit."""
    limits = [r for r in (worker_rate, api_rate_limit) if r > 0]
    return min(limits) if limits else 0.0


def time_rate_allows(requests: float, rate: float) -> float | None:
    """Seconds the rate needs for ``requests``; None without a rate limit."""
    if rate <= 0:
        return None
    return requests / rate


def ratio(value: float | None, limit: float | None) -> float | None:
    """value / limit, None when either is missing or the limit is 0."""
    if value is None or limit is None or limit == 0:
        return None
    return value / limit


# -- halving: exact expectations -----------------------------------------------------------------


def _bad(size: int, p: float) -> float:
    """Probability that a group of ``size`` independent IDs holds at least one unknown."""
    return 1.0 - (1.0 - p) ** size


@lru_cache(maxsize=4096)
def _expected(size: int, p: float, scheme: str, known_bad: bool) -> float:
    """Expected requests for a group: sent as it is, or known to hold a culprit (split)."""
    if not known_bad:
        if size <= 1:
            return 1.0
        return 1.0 + _bad(size, p) * _expected(size, p, scheme, True)
    if size <= 1:
        return 0.0  # the culprit itself: found without a request of its own
    first, second = size // 2, size - size // 2
    whole = _bad(size, p)
    # Given the group is bad: the first half is bad with q(first)/q(size); the second half is
    # then as unknown as ever, and if the first half was fine it must be bad.
    first_bad = _bad(first, p) / whole
    second_bad = _bad(second, p) / whole
    if scheme == PLAIN:
        return (
            2.0
            + first_bad * _expected(first, p, scheme, True)
            + second_bad * _expected(second, p, scheme, True)
        )
    return (
        1.0
        + first_bad * (_expected(first, p, scheme, True) + _expected(second, p, scheme, False))
        + (1.0 - first_bad) * _expected(second, p, scheme, True)
    )


def expected_requests(batch_size: int, unknown_share: float, scheme: str = INFERRED) -> float:
    """Expected requests to send one batch and isolate its unknown IDs (independent, share p)."""
    if scheme not in HALVING:
        raise ValueError(f"scheme must be one of {HALVING}, got {scheme!r}")
    if batch_size < 1 or not 0.0 <= unknown_share <= 1.0:
        raise ValueError("batch_size must be >= 1 and unknown_share in [0, 1]")
    if unknown_share == 0.0:
        return 1.0
    return _expected(batch_size, unknown_share, scheme, False)


def requests_per_contact(batch_size: int, unknown_share: float, scheme: str = SPLITTING) -> float:
    """Expected requests per contact for full batches of ``batch_size`` (for ``splitting``:
    groups of Hwang's size for the share, at most ``batch_size``)."""
    if scheme == SPLITTING:
        if batch_size < 1 or not 0.0 <= unknown_share <= 1.0:
            raise ValueError("batch_size must be >= 1 and unknown_share in [0, 1]")
        return splitting_per_contact(group_size(unknown_share, batch_size), unknown_share)
    return expected_requests(batch_size, unknown_share, scheme) / batch_size


@lru_cache(maxsize=4096)
def _search(size: int, p: float) -> tuple[float, float]:
    """(expected requests, expected IDs returned to the fresh) to find one culprit in a group
    of ``size`` known to hold one, halving it: the first half is sent; applied, the second
    half is known bad; refused, the search goes on in it and the second half is returned."""
    if size <= 1:
        return 0.0, 0.0
    first, second = size // 2, size - size // 2
    first_bad = _bad(first, p) / _bad(size, p)
    s_first, r_first = _search(first, p)
    s_second, r_second = _search(second, p)
    requests = 1.0 + first_bad * s_first + (1.0 - first_bad) * s_second
    returned = first_bad * (second + r_first) + (1.0 - first_bad) * r_second
    return requests, returned


def splitting_per_contact(group: int, unknown_share: float) -> float:
    """Expected requests per contact with groups of ``group`` fresh IDs (independent, share
    p), each refused group searched for one culprit and the rest returned to the fresh IDs:
    requests per group over the contacts a group settles (a renewal-reward ratio, exact for
    independent unknowns since what is returned is as fresh as any other ID)."""
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    p = unknown_share
    if p == 0.0:
        return 1.0 / group
    bad = _bad(group, p)
    requests, returned = _search(group, p)
    return (1.0 + bad * requests) / (group - bad * returned)


def best_batch_size(unknown_share: float, scheme: str = INFERRED, largest: int = 1000) -> int:
    """The batch size (1..largest) with the fewest expected requests per contact."""
    return min(
        range(1, largest + 1),
        key=lambda size: (requests_per_contact(size, unknown_share, scheme), -size),
    )


# -- halving: exact counts for one batch ---------------------------------------------------------


def halving_requests(unknown: Sequence[bool], scheme: str = INFERRED) -> int:
    """Requests to send a batch whose entries are unknown where ``unknown`` is True."""
    if scheme not in HALVING:
        raise ValueError(f"scheme must be one of {HALVING}, got {scheme!r}")
    if not unknown:
        return 0
    flags = list(unknown)

    def send(lo: int, hi: int) -> int:
        if hi - lo == 1 or not any(flags[lo:hi]):
            return 1
        return 1 + split(lo, hi)

    def split(lo: int, hi: int) -> int:
        if hi - lo == 1:
            return 0
        middle = lo + (hi - lo) // 2
        if scheme == PLAIN:
            return send(lo, middle) + send(middle, hi)
        if any(flags[lo:middle]):
            return 1 + split(lo, middle) + send(middle, hi)
        return 1 + split(middle, hi)

    return send(0, len(flags))


def splitting_requests(unknown: Sequence[bool], groups: Iterable[int]) -> int:
    """Requests generalized binary splitting sends for IDs unknown where ``unknown`` is True,
    all at hand, each group of fresh IDs of the next size ``groups`` gives (the IDs returned by
    a search first, in order, then the next ones of ``unknown``)."""
    flags = list(unknown)
    pool: deque[int] = deque()
    sizes = iter(groups)
    nxt = requests = 0
    while pool or nxt < len(flags):
        size = next(sizes)
        group = [pool.popleft() for _ in range(min(size, len(pool)))]
        while len(group) < size and nxt < len(flags):
            group.append(nxt)
            nxt += 1
        requests += 1
        while len(group) > 1 and any(flags[i] for i in group):
            middle = len(group) // 2
            first, second = group[:middle], group[middle:]
            requests += 1
            if any(flags[i] for i in first):
                pool.extendleft(reversed(second))
                group = first
            else:
                group = second
    return requests
