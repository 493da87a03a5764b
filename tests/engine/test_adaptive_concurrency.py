"""``--concurrency auto`` against the simulated gateway over real sockets: the limit grows to
its ceiling while latency-bound, stays at what the rate needs at a rate limit, and the work
comes out as with a fixed concurrency (every change applied, in order)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

from tests.engine.harness import expected_state, run_engine, settings
from tests.engine.test_engine import applied_in_order, stream
from worker.core.concurrency import AdaptiveSettings
from worker.engine import Ending, EngineSettings
from worker.sim.gateway import SimConfig

pytestmark = pytest.mark.anyio


def auto(ceiling: int, **options: Any) -> EngineSettings:
    """Engine settings of ``--concurrency auto --max-concurrency ceiling``."""
    return dataclasses.replace(
        settings(concurrency=ceiling, **options), adaptive=AdaptiveSettings(max_limit=ceiling)
    )


class TestAdaptiveConcurrency:
    async def test_latency_bound_grows_to_the_ceiling(self, tmp_path: Path) -> None:
        """With 30 ms per request and no rate limit the limit climbs from 8 to its ceiling,
        the API sees that many requests at once, and every change lands in order."""
        changes = stream(4000, 4000)
        run = await run_engine(
            tmp_path,
            changes,
            SimConfig(known_count=4000, latency="30", record_history=True),
            auto(16, batch=10, linger_s=0.005),
        )
        assert Ending.DRAINED == run.result.ending
        assert run.engine.adaptive is not None
        assert 16 == run.engine.adaptive.limit == run.engine.concurrency_limit
        assert 16 == run.sim.stats.max_in_flight
        assert expected_state(changes) == run.sim.contacts
        assert applied_in_order(run.sim.history)
        assert 0 == run.sim.stats.overlapping_id_requests

    async def test_rate_limit_holds_it_at_what_the_rate_needs(self, tmp_path: Path) -> None:
        """At --rate 20 and 30 ms per request the rate needs under one request in flight:
        from the first answer on, the limit never exceeds rate x round trip x 1.5 + 1 (the
        round trip as slow as the slowest seen: 4 while it stays under 100 ms), and the API
        never sees more at once than the start (8)."""
        changes = stream(400, 400)
        run = await run_engine(
            tmp_path,
            changes,
            SimConfig(known_count=400, latency="30"),
            auto(16, batch=10, linger_s=0.005, rate=20.0),
        )
        assert Ending.DRAINED == run.result.ending
        adaptive = run.engine.adaptive
        assert adaptive is not None
        assert adaptive.limit <= math.ceil(20 * adaptive.statistics().recent_rtt_s * 1.5 + 1)
        total = run.engine.histograms.request_seconds.count
        slowest_s = min(
            float(le)
            for le, count in run.engine.histograms.request_seconds.cumulative()
            if count == total
        )
        assert adaptive.highest <= math.ceil(20 * slowest_s * 1.5 + 1)
        assert run.sim.stats.max_in_flight <= 8
        assert expected_state(changes) == run.sim.contacts

    async def test_fixed_concurrency_unchanged(self, tmp_path: Path) -> None:
        """Without adaptive settings the engine keeps exactly --concurrency senders."""
        run = await run_engine(
            tmp_path,
            stream(600, 600),
            SimConfig(known_count=600, latency="20"),
            settings(batch=10, concurrency=3),
        )
        assert run.engine.adaptive is None
        assert 3 == run.engine.concurrency_limit == run.sim.stats.max_in_flight


class TestReadAhead:
    """A readable backlog is read (coalesced) before its IDs are sent (issue 12, part 6)."""

    async def test_backlog_sent_in_the_fewest_requests(self, tmp_path: Path) -> None:
        """20,000 changes over 10,000 IDs (a file of several chunks) at 20 ms per request:
        every changed ID goes out exactly once, in full batches. (The file's last chunk is
        short: the read-ahead ends there, not on a stall, however busy the machine.)"""
        changes = stream(20_000, 10_000)
        distinct = len({str(c["ID"]) for c in changes})
        run = await run_engine(
            tmp_path,
            changes,
            SimConfig(known_count=10_000, latency="20"),
            settings(
                batch=100,
                concurrency=2,
                linger_s=0.005,
                max_waiting=50_000,
                read_stall_s=30.0,
                read_ahead_s=30.0,
            ),
        )
        assert Ending.DRAINED == run.result.ending
        assert distinct == run.sim.stats.contacts_applied
        # Full batches, but for the first requests, which carry a group of fresh IDs sized for
        # the unknown share assumed before any answer (Hwang's group for 1%: 64 IDs).
        assert run.sim.stats.requests == run.sim.stats.by_status[204]
        assert run.sim.stats.requests <= math.ceil(distinct / 100) + 1
        assert expected_state(changes) == run.sim.contacts

    async def test_memory_bound_holds(self, tmp_path: Path) -> None:
        """With --max-waiting below the backlog, reading ahead stops at the bound: batches
        leave as the scheduler fills, and every change is still applied."""
        changes = stream(20_000, 10_000)
        run = await run_engine(
            tmp_path,
            changes,
            SimConfig(known_count=10_000, latency="5"),
            settings(batch=100, concurrency=2, linger_s=0.005, max_waiting=3_000),
        )
        assert Ending.DRAINED == run.result.ending
        assert expected_state(changes) == run.sim.contacts
        assert run.engine.summary()["changes"] == 20_000
