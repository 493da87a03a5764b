"""Each search within ``grouptest.search_requests(B)``, the bound docs/id-knowledge.md states
per search (the run's ``worst_case_requests`` has slack enough to hide a search over it): found
by review, with IDs known to exist riding in the pad of a search, and with a search in a pad
taking riders of its own."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.factories import applied, change, not_found
from worker.core.batch import Batch, BatchLimits, Purpose
from worker.core.grouptest import UnknownShare, search_requests
from worker.core.scheduler import Scheduler, SchedulerSettings


def scheduler(batch_size: int, prior_share: float) -> Scheduler:
    limits = BatchLimits(max_items=batch_size, linger_s=0.0)
    s = Scheduler(SchedulerSettings(limits=limits, max_not_found_run=0), lambda: 0.5)
    s.unknown_share = UnknownShare(prior_share=prior_share)
    return s


def searches(s: Scheduler, missing: set[str], now: float) -> list[int]:
    """Send one request at a time to a model API (404 if it holds a missing ID) until idle;
    the isolation requests of each search (one search at a time, depth first)."""
    s.draining = True
    spent: list[int] = []
    while not s.idle:
        batch = s.next_batch(now)
        if not isinstance(batch, Batch):
            assert s.settle_due(now) is not None, "stalled"
            continue
        refused = any(key in missing for key in batch.keys)
        if batch.purpose is Purpose.ISOLATE:
            spent[-1] += 1
        s.resolve(batch, not_found() if refused else applied(), now)
        if refused and batch.purpose is Purpose.NEW and len(batch.entries) > 1:
            spent.append(0)
    return spent


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 600).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.frozensets(st.integers(0, n - 1), max_size=12),
            st.sampled_from([4, 8, 16, 100]),
            st.sampled_from([0.001, 0.0001]),
        )
    )
)
def test_each_search_within_its_bound(case: tuple[int, frozenset[int], int, float]) -> None:
    """Fresh IDs, all at hand, a low share (riders ride): no search over the bound."""
    contacts, missing, size, prior = case
    s = scheduler(size, prior)
    for n in range(contacts):
        s.add(change(n, token=n, lastname="x"), 0.0)
    spent = searches(s, {str(n) for n in missing}, 0.0)
    assert all(n <= search_requests(size) for n in spent), (spent, search_requests(size))


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 100),
    st.integers(1, 300),
    st.integers(0, 2**32 - 1),
    st.sampled_from([8, 32, 100]),
    st.data(),
)
def test_each_search_within_its_bound_when_some_ids_are_known(
    known: int, fresh: int, seed: int, size: int, data: st.DataObject
) -> None:
    """Some IDs of the input were applied before (contacts changed again), mixed among fresh
    ones, a few of which are unknown: the riders known to exist go first in a pad, so its
    search halves the fresh ones and stays within the bound."""
    s = scheduler(size, 0.001)
    for n in range(known):  # a first pass: these IDs are known to exist
        s.add(change(n, token=("a", n), lastname="x"), 0.0)
    searches(s, set(), 0.0)
    s.draining = False
    ids = list(range(known)) + list(range(10_000, 10_000 + fresh))
    random.Random(seed).shuffle(ids)
    missing = data.draw(st.sets(st.integers(10_000, 10_000 + fresh - 1), max_size=6))
    for n in ids:
        s.add(change(n, token=("b", n), lastname="y"), 1.0)
    spent = searches(s, {str(n) for n in missing}, 1.0)
    assert all(n <= search_requests(size) for n in spent), (spent, search_requests(size))
