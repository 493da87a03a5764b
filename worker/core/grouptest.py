"""Group testing: how many fresh IDs go in one request, and what finding the unknown ones costs.

A request is a group test whose negative outcome (204) also applies the group; a 404 says "at
least one ID here is unknown" and nothing more (DESIGN 4). The worker finds unknown IDs with
Hwang's generalized binary splitting:

* Fresh IDs (neither known to exist nor known missing) go in groups of
  ``2 ** floor(log2((1 - p) / p))``, ``p`` the unknown share observed online
  (:class:`UnknownShare`), capped by the batch size.
* A group answered 404 is halved (``worker.core.split``): the first half is sent. Applied, the
  culprit is in the second half, which is split at once without being sent. Refused, the search
  goes on in the first half and the second half *returns to the pool* of IDs to send: nothing
  was learnt about it, so it rides in the next group with fresh IDs instead of costing a request
  of its own.
* A search step carries *riders* up to the batch size: IDs known to exist, and fresh IDs when
  the cap binds hard (the share is so low that a batch of them holds few unknown ones,
  :func:`fresh_riders`: below about 0.15 % for a batch of 100). Its
  request then settles a batch's worth of contacts when it is applied, instead of the half,
  quarter, ... of a group. A refused step keeps its riders as its *pad*: the culprit may be
  among them. The core is halved as before, so after at most ``ceil(log2 m)`` requests the core
  is one entry and the pad is sent; applied, that entry is the culprit; refused, the culprit
  is in the pad (at most the batch size less one), searched without riders. Each search ends
  with exactly one culprit found, in at most :func:`search_requests` requests after the 404 on
  its group.

:func:`worst_case_requests` is the bound this plan never exceeds; the tests hold it to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PRIOR_SHARE = 0.01
"""The unknown share assumed before anything was observed."""
PRIOR_WEIGHT = 200.0
"""How many contacts' worth of evidence the prior counts for."""
WINDOW = 20_000.0
"""Contacts of evidence kept: beyond it, older evidence is weighed down (the share may drift)."""
RIDER_NOISE = 0.15
"""The most unknown IDs a search step's fresh riders may hold on average (share times batch
size). Measured with the pure core (``worker.bench.replay``, 200,000 fresh IDs, B = 100):
riders cut requests at p = 0.1 % and cost more than they save from p = 0.2 % up (up to 1.26
times the bound instead of 1.02 at 0.5 %, where a batch of fresh riders holds 0.5 unknown)."""


@dataclass(slots=True)
class UnknownShare:
    """The share of fresh IDs the API does not know, estimated from its answers.

    Counts fresh contacts settled (applied, or dead-lettered ``not_found``) and those found
    missing, with a prior worth :data:`PRIOR_WEIGHT` contacts at :data:`PRIOR_SHARE`; once
    more than :data:`WINDOW` contacts were seen, both counts are scaled down together, so the
    estimate follows a share that changes.
    """

    seen: float = 0.0
    missing: float = 0.0
    prior_share: float = PRIOR_SHARE
    prior_weight: float = PRIOR_WEIGHT
    window: float = WINDOW

    def observe(self, contacts: int, missing: int) -> None:
        """``contacts`` fresh contacts settled, ``missing`` of them found missing."""
        self.seen += contacts
        self.missing += missing
        if self.seen > self.window:
            scale = self.window / self.seen
            self.seen *= scale
            self.missing *= scale

    @property
    def share(self) -> float:
        """The estimate, between 0 and 1 (never exactly either)."""
        prior_missing = self.prior_share * self.prior_weight
        return (self.missing + prior_missing) / (self.seen + self.prior_weight)


def group_size(share: float, ceiling: int) -> int:
    """Hwang's group size for fresh IDs with unknown share ``share``, at most ``ceiling``.

    ``2 ** floor(log2((1 - p) / p))``: the largest power of two whose group holds an unknown ID
    with probability about one half or less; binary splitting of a power of two is balanced.
    """
    if ceiling < 1:
        raise ValueError(f"ceiling must be >= 1, got {ceiling}")
    if share <= 0.0:
        return ceiling
    if share >= 0.5:
        return 1
    ratio = (1.0 - share) / share
    exponent = math.floor(math.log2(ratio))
    if exponent >= ceiling.bit_length():
        return ceiling
    return max(1, min(ceiling, 1 << exponent))


def fresh_riders(share: float, ceiling: int) -> int:
    """How many fresh IDs a search step may carry as riders: up to ``ceiling`` when as many
    fresh IDs hold at most :data:`RIDER_NOISE` unknown ones on average, else none.

    A rider's 404 spoils the step it rides with (the search goes on in it as in the step's
    own core), and a step whose riders are few costs the request that sends its pad without
    paying for it: riders pay only where the cap binds hard (the condition implies Hwang's
    group is over 3 times the ceiling), and then fill the request.
    """
    return ceiling if share * ceiling <= RIDER_NOISE else 0


def _halvings(size: int) -> int:
    """Requests that halving a known-bad group of ``size`` spends: ``ceil(log2 size)``."""
    return max(0, math.ceil(math.log2(size))) if size > 0 else 0


def search_requests(size: int) -> int:
    """The most requests a search spends after the 404 on a group, with a batch size of
    ``size``: halving the group's core, then (with riders) sending the pad of its last
    refused step, at most ``size - 1`` riders, and searching that pad without riders."""
    if size < 2:
        return _halvings(size)
    return _halvings(size) + 1 + _halvings(size - 1)


def worst_case_requests(contacts: int, unknown: int, smallest_group: int, largest: int) -> int:
    """The most requests the plan spends on ``contacts`` IDs, ``unknown`` of them unknown, all
    of them at hand, with groups of ``smallest_group`` to ``largest`` (the batch size).

    Groups applied whole carry ``smallest_group`` contacts each but at the tail (at most one
    applied tail group per culprit, plus one: what a search returns to the pool, its refused
    halves and the riders of its refused steps, is there before the next group is formed);
    every unknown ID costs one refused group and a search of at most
    :func:`search_requests` ``(largest)`` requests.
    """
    if unknown > contacts or smallest_group < 1 or largest < smallest_group:
        raise ValueError("need unknown <= contacts and 1 <= smallest_group <= largest")
    known = contacts - unknown
    return known // smallest_group + 1 + unknown * (2 + search_requests(largest))
