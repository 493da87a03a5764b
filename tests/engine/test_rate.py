"""The rate against the simulator's hidden limit (issue 12): exact, paused, learned."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import structlog

from tests.engine.harness import expected_state, run_engine, settings
from worker.core.adapt import AdaptSettings
from worker.core.backoff import Backoff
from worker.engine import Ending, Engine, EngineSettings
from worker.sim.gateway import SimConfig

pytestmark = pytest.mark.anyio


def _distinct(count: int) -> list[dict[str, object]]:
    """One change per ID: with a batch size of 1, one request each."""
    return [{"ID": str(i), "lastname": f"n{i}"} for i in range(1, count + 1)]


class TestExactRate:
    @pytest.mark.slow
    async def test_rate_equal_to_a_strict_limit_gets_no_429(self, tmp_path: Path) -> None:
        """--rate 25 against an API that allows 25 in any one second (a sliding window, the
        strictest reading): no 429, and no second the API saw held more than 25."""
        changes = _distinct(150)
        run = await run_engine(
            tmp_path,
            changes,
            SimConfig(known_count=150, rate_limit=25, rate_window="sliding"),
            settings(batch=1, rate=25.0, concurrency=8),
        )
        assert Ending.DRAINED == run.result.ending
        assert 0 == run.sim.stats.rate_limited
        assert run.sim.stats.max_per_second <= 25
        assert expected_state(changes) == run.sim.contacts


class TestPauses:
    @pytest.mark.slow
    async def test_a_long_retry_after_is_capped_logged_and_shown(self, tmp_path: Path) -> None:
        """A 429 asking for an hour pauses every sender for --max-retry-after (6 s here), not
        an hour; the pause is logged at warning with its length, /readyz says ``paused``
        while it lasts, the metrics count it, and then everything is applied."""
        changes = _distinct(6)
        base = settings(batch=1, rate=50.0, concurrency=2, backoff=Backoff(0.01, 0.1, 6.0))
        seen: list[str] = []
        config = SimConfig(known_count=6, rate_limit=1, rate_burst=2, retry_after_s=3600)

        async def watch(engine: Engine) -> None:
            while True:
                await anyio.sleep(0.5)
                seen.append(engine.readiness()[1])

        with structlog.testing.capture_logs() as logs:
            run = await run_engine(tmp_path, changes, config, base, watch=watch)
        assert Ending.DRAINED == run.result.ending
        assert expected_state(changes) == run.sim.contacts
        paused = [e for e in logs if e["event"] == "api.paused"]
        assert paused and all(e["log_level"] == "warning" for e in paused)
        assert all(5.9 <= e["pause_s"] <= 6.0 for e in paused)
        assert "paused" in seen
        assert run.engine.stats.pauses >= 1
        assert run.engine.stats.paused_s >= 6.0


class TestAuto:
    @pytest.mark.slow
    async def test_auto_learns_a_hidden_limit(self, tmp_path: Path) -> None:
        """--rate auto against a hidden limit of 40/s (a token bucket of 40, the gateway of
        the issue): from the 10th second on the API's rate is used to at least 0.9 and at
        most 3 % of the requests are answered 429."""
        changes = _distinct(1_400)
        es = EngineSettings(
            settings(batch=1).scheduler,
            adapt=AdaptSettings(max_rate=200.0),
            concurrency=8,
            drain_timeout_s=5.0,
            handle_signals=False,
        )
        run = await run_engine(tmp_path, changes, SimConfig(known_count=1_400, rate_limit=40), es)
        assert Ending.DRAINED == run.result.ending
        assert expected_state(changes) == run.sim.contacts
        seconds = run.sim.stats.per_second[10:-1]  # the last second is partial
        assert seconds
        requests = sum(total for total, _ in seconds)
        throttled = sum(refused for _, refused in seconds)
        assert (requests - throttled) / len(seconds) >= 0.9 * 40
        assert throttled <= 0.03 * requests
        stats = run.engine.adapt_statistics()
        assert stats is not None and stats.limit is not None and stats.cuts >= 1
