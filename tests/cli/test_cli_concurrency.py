"""`contact-worker run --concurrency auto` as a user runs it, against `contact-worker simulate`."""

from __future__ import annotations

import math
from pathlib import Path

from tests.cli.test_cli import Gateway, events, run, summary, worker_env
from tests.engine.harness import expected_state, write_lines
from tests.engine.test_engine import stream


class TestConcurrencyAuto:
    def test_climbs_to_the_ceiling_and_reports_it(self, tmp_path: Path) -> None:
        """With 40 ms per request and no rate limit, `--concurrency auto --max-concurrency 12`
        drains the file with up to 12 requests at once; the summary and the progress events
        show the limit, and every change lands."""
        gw = Gateway("--known-count", "3000", "--latency", "40")
        try:
            changes = stream(3000, 3000, seed=4)
            write_lines(tmp_path / "in.jsonl", changes)
            result = run(
                [
                    "--source",
                    f"jsonl:{tmp_path / 'in.jsonl'}",
                    "--concurrency",
                    "auto",
                    "--max-concurrency",
                    "12",
                    "--batch-size",
                    "10",
                    "--log-format",
                    "json",
                    "--progress-interval",
                    "0.2",
                ],
                worker_env(gw, tmp_path),
            )
            assert 0 == result.returncode, result.stderr
            done = summary(result.stderr)
            assert (12, 12) == (done["concurrency_limit"], done["concurrency_highest"])
            limits = [
                e["concurrency_limit"] for e in events(result.stderr) if e["event"] == "progress"
            ]
            assert limits and all(1 <= limit <= 12 for limit in limits)
            stats = gw.get("/_sim/stats")
            assert 12 == stats["max_in_flight"]
            assert expected_state(changes) == gw.get("/_sim/contacts")
        finally:
            gw.stop()

    def test_rate_limited_stays_at_what_the_rate_needs(self, tmp_path: Path) -> None:
        """At `--rate 20` and 40 ms per request the limit settles within rate x round trip x
        1.5 + 1, never above its start."""
        gw = Gateway("--known-count", "300", "--latency", "40")
        try:
            write_lines(tmp_path / "in.jsonl", stream(300, 300, seed=5))
            result = run(
                [
                    "--source",
                    f"jsonl:{tmp_path / 'in.jsonl'}",
                    "--concurrency",
                    "auto",
                    "--batch-size",
                    "10",
                    "--rate",
                    "20",
                    "--log-format",
                    "json",
                ],
                worker_env(gw, tmp_path),
            )
            assert 0 == result.returncode, result.stderr
            done = summary(result.stderr)
            assert done["concurrency_highest"] <= 8
            assert done["concurrency_limit"] <= math.ceil(20 * done["round_trip_s"] * 1.5 + 1)
        finally:
            gw.stop()
