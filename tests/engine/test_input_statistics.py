"""What the inputs say about themselves (``Source.statistics()``): the feed of /readyz and the
``contact_worker_input_*`` metrics. The brokers' outages are in tests/redis and tests/pg."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.harness import write_lines
from worker.backends.base import Outages, SourceStatistics
from worker.backends.jsonl.source import JsonlSource
from worker.backends.sqlite.producer import enqueue
from worker.backends.sqlite.source import SqliteSpoolSource

pytestmark = pytest.mark.anyio


class TestOutages:
    def test_available_until_an_operation_fails_again_once_it_succeeds(self) -> None:
        """A failure makes a problem naming the operation and its last error; its next
        success clears it; each streak of failures counts once."""
        outages = Outages()
        assert ("", 0) == (outages.problem, outages.started)
        outages.failed("read", "refused")
        outages.failed("read", "reset")
        assert ("read: reset", 1) == (outages.problem, outages.started)
        outages.recovered("read")
        outages.recovered("read")
        assert ("", 1) == (outages.problem, outages.started)

    def test_one_operation_recovering_does_not_hide_another_still_failing(self) -> None:
        """Read and ack fail; the read recovers first: still a problem, the ack's."""
        outages = Outages()
        outages.failed("read", "refused")
        outages.failed("ack", "refused")
        assert "ack: refused; read: refused" == outages.problem
        outages.recovered("read")
        assert ("ack: refused", 2) == (outages.problem, outages.started)
        outages.recovered("ack")
        assert "" == outages.problem


class TestFileInputs:
    async def test_jsonl_counts_lines_handed_out_and_not_acknowledged(self, tmp_path: Path) -> None:
        """Blank lines are never handed out, so never unacknowledged; the rest are until
        acked; a file is always available and has no partitions, leases or spool."""
        path = write_lines(tmp_path / "in.jsonl", [{"ID": i, "lastname": "a"} for i in range(5)])
        path.write_bytes(path.read_bytes() + b"\n  \n")
        source = JsonlSource(str(path))
        await source.open()
        try:
            assert SourceStatistics() == source.statistics()
            records = await source.read()
            assert records is not None and 5 == len(records)
            assert SourceStatistics(unacked=5) == source.statistics()
            await source.ack([token for token, _ in records[:2]])
            assert SourceStatistics(unacked=3) == source.statistics()
        finally:
            await source.close()

    async def test_sqlite_reports_rows_unacknowledged_and_the_spool_depth(
        self, tmp_path: Path
    ) -> None:
        """Rows read and not acked are unacknowledged; the depth counts every row stored,
        read or not, and falls as acks delete them."""
        uri = f"sqlite:{tmp_path / 'spool.db'}?batch=4"
        await enqueue(uri, [b'{"ID": %d, "lastname": "a"}' % i for i in range(10)])
        source = SqliteSpoolSource.from_uri(uri)
        await source.open()
        try:
            assert SourceStatistics(unacked=0, spool_depth=10) == source.statistics()
            records = await source.read()
            assert SourceStatistics(unacked=4, spool_depth=10) == source.statistics()
            await source.ack([token for token, _ in records[:3]])
            assert SourceStatistics(unacked=1, spool_depth=7) == source.statistics()
        finally:
            await source.close()
