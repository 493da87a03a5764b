"""One URI grammar for every input (worker/backends/uri.py): the same names for the same
things, durations in seconds, unknown parameters refused, old names warned about and kept."""

from __future__ import annotations

from typing import Any

import pytest
import structlog

from worker.backends.postgres.uri import parse_uri as parse_pg
from worker.backends.redis.uri import parse_uri as parse_redis
from worker.backends.sqlite.spool import parse_uri as parse_sqlite
from worker.errors import ConfigError


def deprecations(logs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(old, new) of each ``config.deprecated_uri_key`` warning."""
    return [
        (log["old"], log["new"])
        for log in logs
        if log["event"] == "config.deprecated_uri_key" and log["log_level"] == "warning"
    ]


class TestSameNames:
    def test_batch_poll_lease_mean_the_same_in_every_input(self) -> None:
        """``batch`` is records per read, ``poll_s`` and ``lease_s`` are seconds (decimals
        allowed), in Redis, PostgreSQL and SQLite alike."""
        redis = parse_redis("redis://h/0?batch=7&poll_s=0.25&lease_s=1.5&claim_idle_s=2")
        pg = parse_pg("postgresql://h/db?batch=7&poll_s=0.25&lease_s=1.5")
        sqlite = parse_sqlite("sqlite:s.db?batch=7&poll_s=0.25&busy_timeout_s=0.5")
        assert (7, 250, 1500, 2000) == (
            redis.count,
            redis.block_ms,
            redis.lease_ms,
            redis.claim_idle_ms,
        )
        assert (7, 0.25, 1.5) == (pg.batch, pg.poll_s, pg.lease_s)
        assert (7, 0.25, 0.5) == (sqlite.count, sqlite.poll_s, sqlite.busy_timeout_s)

    def test_new_names_log_no_warning(self) -> None:
        """The current names are not deprecated."""
        with structlog.testing.capture_logs() as logs:
            parse_redis("redis://h/0?batch=7&poll_s=1&lease_s=2&claim_idle_s=3")
            parse_sqlite("sqlite:s.db?batch=7&poll_s=1&busy_timeout_s=1")
        assert [] == deprecations(logs)


class TestOldNames:
    def test_redis_old_names_work_with_a_warning_each(self) -> None:
        """count, block_ms, claim_idle_ms and lease_ms (milliseconds) still work for one
        release, each with a warning naming its new name."""
        with structlog.testing.capture_logs() as logs:
            old = parse_redis("redis://h/0?count=7&block_ms=250&claim_idle_ms=2000&lease_ms=1500")
        new = parse_redis("redis://h/0?batch=7&poll_s=0.25&claim_idle_s=2&lease_s=1.5")
        assert new == old
        assert [
            ("count", "batch"),
            ("block_ms", "poll_s"),
            ("claim_idle_ms", "claim_idle_s"),
            ("lease_ms", "lease_s"),
        ] == deprecations(logs)

    def test_sqlite_old_names_work_with_a_warning_each(self) -> None:
        """count, poll_ms and busy_timeout_ms likewise."""
        with structlog.testing.capture_logs() as logs:
            old = parse_sqlite("sqlite:s.db?count=7&poll_ms=250&busy_timeout_ms=0")
        assert parse_sqlite("sqlite:s.db?batch=7&poll_s=0.25&busy_timeout_s=0") == old
        expected = [
            ("count", "batch"),
            ("poll_ms", "poll_s"),
            ("busy_timeout_ms", "busy_timeout_s"),
        ]
        assert expected == deprecations(logs)

    def test_old_and_new_name_together_are_refused(self) -> None:
        """Which one would win is not guessed."""
        with pytest.raises(ConfigError, match="sqlite URI: poll_s is given twice"):
            parse_sqlite("sqlite:s.db?poll_ms=5&poll_s=1")


class TestUnknown:
    @pytest.mark.parametrize(
        ("uri", "listed"),
        [
            ("redis://h/0?lease=5", "batch, claim_idle_s, consumer, db, dead_stream"),
            ("sqlite:s.db?lease_s=5", "batch, busy_timeout_s, high_water, max_body_bytes"),
            ("postgresql://h/db?lease=5", "batch, lease_s, partitions, poll_s, rebalance_s"),
        ],
    )
    def test_unknown_parameters_are_refused_listing_the_known(self, uri: str, listed: str) -> None:
        """A misspelt or foreign parameter stops the command (exit 2), naming it and the
        parameters that input knows."""
        parse = {"redis": parse_redis, "sqlite": parse_sqlite, "postgresql": parse_pg}
        scheme = uri.partition(":")[0]
        with pytest.raises(ConfigError, match="unknown parameter") as caught:
            parse[scheme](uri)
        assert "'lease'" in str(caught.value) or "'lease_s'" in str(caught.value)
        assert listed in str(caught.value)

    def test_driver_parameters_still_pass(self) -> None:
        """asyncpg's connection parameters and redis-py's ssl_* reach the driver."""
        assert "sslmode=require" in parse_pg("postgresql://h/db?sslmode=require&batch=5").dsn
        assert "ssl_cert_reqs=none" in parse_redis("rediss://h/0?ssl_cert_reqs=none").url
