"""Surprising answers never turn into lost data (DESIGN 8; issue 10 items 1, 2 and 4).

The real engine against the simulated gateway over real sockets: a proxy's 404 page, an
account where every ID is unknown, undocumented error codes, a server that applies late.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.engine.harness import expected_state, run_engine, settings
from tests.engine.test_engine import applied_in_order, stream
from worker.core.backoff import Backoff
from worker.core.classify import Action
from worker.engine import Ending
from worker.sim.gateway import SimConfig

pytestmark = pytest.mark.anyio


def acknowledged_prefix(tmp_path: Path) -> tuple[int, int]:
    """The (line, offset) the run's checkpoint says is done with (written before lines go
    out, so it exists even when nothing was acknowledged)."""
    checkpoint = orjson.loads((tmp_path / "cp.json").read_bytes())
    return checkpoint["line"], checkpoint["offset"]


class TestForeign404:
    """A 404 that is not the API's JSON error stops sending: nothing dead, nothing acked."""

    async def test_every_request_answered_by_a_proxy_page(self, tmp_path: Path) -> None:
        """Every request 404 with an HTML page: fatal at the first answers, at most one request
        per sender, no dead letter, no acknowledgement, no checkpoint."""
        run = await run_engine(
            tmp_path,
            stream(2000, 300),
            SimConfig(known_count=300, foreign_404_share=1.0),
            settings(batch=20, concurrency=4),
            checkpoint=True,
        )
        assert Ending.FATAL == run.result.ending
        assert run.result.verdict is not None
        assert Action.FOREIGN == run.result.verdict.action
        assert "--api-url" in run.result.message
        assert run.sim.stats.requests <= 4
        assert ([], 0) == (run.dead, run.engine.stats.acked)
        assert (0, 0) == acknowledged_prefix(tmp_path)
        assert (False, "foreign_answer") == run.engine.readiness()

    async def test_proxy_404s_after_a_good_start(self, tmp_path: Path) -> None:
        """The first requests are applied, then the proxy answers: what was applied is acked,
        nothing after it is dead-lettered."""
        run = await run_engine(
            tmp_path,
            stream(3000, 300),
            SimConfig(known_count=300, foreign_404_share=1.0, foreign_after=5),
            settings(batch=20, concurrency=4),
        )
        assert Ending.FATAL == run.result.ending
        assert run.sim.stats.requests <= 5 + 4
        assert [] == run.dead
        assert run.engine.stats.acked <= run.engine.scheduler.stats.changes_applied

    async def test_a_share_of_proxy_404s_stops_too(self, tmp_path: Path) -> None:
        """Even one proxy page among good answers stops the run: no valid change is ever
        dead-lettered on a proxy's word."""
        run = await run_engine(
            tmp_path,
            stream(3000, 300),
            SimConfig(known_count=300, foreign_404_share=0.05, seed=3),
            settings(batch=20, concurrency=4),
        )
        assert Ending.FATAL == run.result.ending
        assert [] == run.dead


class TestNotFoundRun:
    """The API's own 404 on every contact: a wrong account, not 3,000 unknown contacts."""

    async def test_every_id_unknown_stops_before_anything_is_dead(self, tmp_path: Path) -> None:
        """All IDs unknown: the run of lone 404s reaches --max-not-found-run (10) and stops;
        not one change dead-lettered or acknowledged."""
        run = await run_engine(
            tmp_path,
            stream(3000, 300),
            SimConfig(known_count=0),
            settings(batch=20, concurrency=4),
            checkpoint=True,
        )
        assert Ending.FATAL == run.result.ending
        assert "--max-not-found-run" in run.result.message
        assert ([], 0) == (run.dead, run.engine.stats.acked)
        assert (0, 0) == acknowledged_prefix(tmp_path)
        assert run.sim.stats.requests < 100

    async def test_off_dead_letters_them_all(self, tmp_path: Path) -> None:
        """With --max-not-found-run 0 the old behaviour: every change dead-lettered."""
        changes = stream(200, 30)
        run = await run_engine(
            tmp_path,
            changes,
            SimConfig(known_count=0),
            settings(batch=10, concurrency=4, max_not_found_run=0),
        )
        assert Ending.DRAINED == run.result.ending
        assert 200 == run.engine.stats.acked
        assert {"not_found"} == {d["reason"] for d in run.dead}

    async def test_a_few_unknown_ids_at_the_end_are_still_dead_lettered(
        self, tmp_path: Path
    ) -> None:
        """Lone 404s with no later 2xx (the input's last contacts) are written when nothing
        is left to send: a finite input still drains."""
        changes: list[Any] = [{"ID": i, "lastname": "x"} for i in range(1, 51)]
        changes += [{"ID": 900 + i, "lastname": "y"} for i in range(3)]
        run = await run_engine(
            tmp_path, changes, SimConfig(known_count=50), settings(batch=100, linger_s=0.05)
        )
        assert Ending.DRAINED == run.result.ending
        assert {"900", "901", "902"} == {str(d["change"]["ID"]) for d in run.dead}
        assert 53 == run.engine.stats.acked


class TestUndocumentedCodes:
    """20% of requests answered 400 with code 9999: no valid change pays for it."""

    async def test_known_contacts_end_with_their_last_values(self, tmp_path: Path) -> None:
        """Every known contact ends with its last values, no valid change is dead-lettered,
        and the unknown IDs are dead-lettered not_found (not rejected)."""
        unknown = frozenset({501, 502, 503, 504, 505})
        changes = stream(4000, 500, seed=13, unknown=unknown)
        run = await run_engine(
            tmp_path,
            changes,
            SimConfig(known_count=500, odd_code_share=0.2, seed=5, record_history=True),
            settings(batch=50, concurrency=4),
        )
        assert Ending.DRAINED == run.result.ending
        assert run.sim.stats.odd_code > 0
        known = [c for c in changes if int(c["ID"]) <= 500]
        assert expected_state(known) == run.sim.contacts
        assert applied_in_order(run.sim.history)
        dead_ids = {int(d["change"]["ID"]) for d in run.dead}
        assert unknown == dead_ids
        assert {"not_found"} == {d["reason"] for d in run.dead}
        assert run.engine.scheduler.stats.confirmations > 0

    async def test_a_repeating_undocumented_code_rejects_the_lone_change(
        self, tmp_path: Path
    ) -> None:
        """An API that always answers 9999: the lone changes are rejected after 3 tries."""
        changes: list[Any] = [{"ID": i, "lastname": "x"} for i in range(1, 5)]
        run = await run_engine(
            tmp_path, changes, SimConfig(known_count=10, odd_code_share=1.0), settings(batch=4)
        )
        assert Ending.DRAINED == run.result.ending
        assert {"rejected"} == {d["reason"] for d in run.dead}
        assert {"9999"} == {d["error"] for d in run.dead}
        assert 4 == len(run.dead)


class TestUndocumentedEverywhere:
    async def test_an_api_answering_9999_to_everything_stops(self, tmp_path: Path) -> None:
        """Every request answered 400/9999: the lone rejections come in a run with nothing
        applied, and sending stops before the input is dead-lettered."""
        run = await run_engine(
            tmp_path,
            stream(500, 200),
            SimConfig(known_count=200, odd_code_share=1.0),
            settings(batch=20, concurrency=4, backoff=Backoff(base_s=0.001, cap_s=0.01)),
            checkpoint=True,
        )
        assert Ending.FATAL == run.result.ending
        assert ([], 0) == (run.dead, run.engine.stats.acked)


class TestLateApplication:
    """A server that applies requests after the worker gave up on them."""

    @pytest.mark.slow
    @pytest.mark.parametrize("grace_s", [0.0, 1.0])
    async def test_grace_keeps_newer_values_last(self, tmp_path: Path, grace_s: float) -> None:
        """10% of requests applied 0.6 s late while the worker times out at 0.3 s. With a grace
        beyond the late delay no older value lands after a newer one; without one it does."""
        rng = random.Random(4)
        changes: list[Any] = []
        seq: dict[int, int] = {}
        for _ in range(15_000):  # read in slices of 1,024: many requests per contact
            i = rng.randint(1, 20)
            seq[i] = seq.get(i, 0) + 1
            changes.append({"ID": i, "extra1": str(seq[i])})
        run = await run_engine(
            tmp_path,
            changes,
            SimConfig(
                known_count=20,
                slow_share=0.1,
                slow_ms=600,
                latency="2",
                seed=9,
                record_history=True,
            ),
            settings(
                batch=5, concurrency=4, linger_s=0.005, max_waiting=8, timeout_grace_s=grace_s
            ),
            request_timeout_s=0.3,
        )
        assert Ending.DRAINED == run.result.ending
        assert run.sim.stats.slow > 0
        if grace_s:
            assert applied_in_order(run.sim.history)
            assert run.engine.scheduler.stats.fenced > 0
        else:  # the failure the grace exists for, shown on the same gateway
            assert not applied_in_order(run.sim.history)
