"""The rate as a user meets it (issue 12): `contact-worker run` against `contact-worker
simulate` with a hidden limit, over real sockets."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.test_cli import Gateway, events, run, summary, worker_env
from tests.engine.harness import write_lines


@pytest.mark.slow
class TestRateCli:
    def test_rate_counts_the_start_up_check(self, tmp_path: Path) -> None:
        """--rate 5 against an API allowing 5 in any one second (sliding window): the
        start-up check and 14 one-contact requests never put 6 in one second, no 429."""
        gw = Gateway("--known-count", "100", "--rate-limit", "5", "--rate-window", "sliding")
        try:
            write_lines(tmp_path / "in.jsonl", [{"ID": str(i), "lastname": "x"} for i in range(14)])
            env = worker_env(gw, tmp_path, WORKER_RATE="5", WORKER_BATCH_SIZE="1")
            result = run(["--source", f"jsonl:{tmp_path / 'in.jsonl'}"], env)
            assert 0 == result.returncode, result.stderr
            stats = gw.get("/_sim/stats")
            # The check's PATCH [] and 14 contacts (and any retry of a request a loaded
            # machine let time out: it counts too).
            assert 15 + summary(result.stderr)["retries"] == stats["requests"]
            assert 0 == stats["rate_limited"]
            assert stats["max_per_second"] <= 5
        finally:
            gw.stop()

    def test_rate_auto_takes_the_apis_policy(self, tmp_path: Path) -> None:
        """--rate auto against an API that states its limit (RateLimit-Policy: 40;w=1): the
        worker keeps 40/s from the first answers on, with no 429, and says so."""
        gw = Gateway(
            "--known-count",
            "400",
            "--rate-limit",
            "40",
            "--rate-window",
            "sliding",
            "--rate-headers",
        )
        try:
            write_lines(
                tmp_path / "in.jsonl", [{"ID": str(i), "lastname": "x"} for i in range(200)]
            )
            env = worker_env(
                gw,
                tmp_path,
                WORKER_RATE="auto",
                WORKER_BATCH_SIZE="1",
                WORKER_PROGRESS_INTERVAL="1",
            )
            result = run(["--source", f"jsonl:{tmp_path / 'in.jsonl'}"], env)
            assert 0 == result.returncode, result.stderr
            assert 0 == gw.get("/_sim/stats")["rate_limited"]
            assert 40.0 == summary(result.stderr)["rate"]
            assert 40.0 in {e["rate"] for e in events(result.stderr) if e["event"] == "progress"}
        finally:
            gw.stop()
