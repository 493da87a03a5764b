"""Replay after a crash on a ``sqlite:`` spool (DESIGN 9): the rows in the spool at the start
may have been read (and sent) by the crashed run; they are all read, and coalesced, before any
of them is sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.replay import backlog, expected, lines, regressions, run_replay
from worker.backends.sqlite.source import SqliteSpoolSource
from worker.backends.sqlite.spool import acquire_spool, release_spool
from worker.engine import Ending

pytestmark = pytest.mark.anyio


class TestSpoolReplay:
    async def test_rows_there_at_the_start_are_coalesced_before_any_is_sent(
        self, tmp_path: Path
    ) -> None:
        """The crashed run read every row and acknowledged none (they are all still there);
        the restart, reading 100 rows at a time, holds them until the last row there at the
        start was read: no contact goes back to an older value."""
        changes = backlog(1500)
        path = tmp_path / "spool.db"
        spool = await acquire_spool(str(path))
        try:
            await spool.append(lines(changes))
        finally:
            await release_spool(spool)
        source = SqliteSpoolSource.from_uri(f"sqlite:{path}?batch=100")
        run = await run_replay(tmp_path, source, len(changes))
        assert Ending.SHUTDOWN == run.result.ending
        assert [] == regressions(run.sim.history)
        assert expected(changes) == run.sim.contacts
        [done] = run.events("source.replay_done")
        assert (True, len(changes)) == (done["complete"], done["changes"])

    async def test_an_empty_spool_holds_nothing(self, tmp_path: Path) -> None:
        """Nothing in the spool at the start: nothing to replay, no hold."""
        source = SqliteSpoolSource.from_uri(f"sqlite:{tmp_path / 'spool.db'}")
        run = await run_replay(tmp_path, source, 0)
        assert [] == run.events("source.replay_started")
