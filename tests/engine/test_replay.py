"""Replay after a crash on a ``jsonl:`` input with ``--checkpoint`` (DESIGN 9): the lines a
crashed run may have read are read in full, and coalesced, before any of them is sent."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import orjson
import pytest

from tests.engine.harness import settings, write_lines
from tests.engine.replay import backlog, expected, regressions, run_replay
from worker.backends.jsonl.source import JsonlSource
from worker.engine import Ending

pytestmark = pytest.mark.anyio


def crashed_checkpoint(path: Path, source: Path, **fields: int) -> None:
    """A checkpoint as a crashed run leaves it (fields: line, offset, read_to)."""
    body = {"path": os.path.abspath(source), "line": 0, "offset": 0, **fields}
    path.write_bytes(orjson.dumps(body))


class TestJsonlReplay:
    async def test_lines_read_before_a_crash_are_coalesced_before_any_is_sent(
        self, tmp_path: Path
    ) -> None:
        """The crashed run read the whole file (read_to) and acknowledged nothing; the
        restart holds everything until the range is read: no contact goes back to an older
        value, each ends with its last-written one, and the hold is logged with its counts."""
        changes = backlog(6000)
        source_path = write_lines(tmp_path / "in.jsonl", changes)
        checkpoint = tmp_path / "cp.json"
        crashed_checkpoint(checkpoint, source_path, read_to=source_path.stat().st_size)
        run = await run_replay(
            tmp_path,
            JsonlSource(str(source_path), checkpoint=str(checkpoint)),
            len(changes),
            until_acked=False,
        )
        assert Ending.DRAINED == run.result.ending
        assert [] == regressions(run.sim.history)
        assert expected(changes) == run.sim.contacts
        assert [{"range": "in.jsonl", "ids": "all"}] == [
            {k: e[k] for k in ("range", "ids")} for e in run.events("source.replay_started")
        ]
        [done] = run.events("source.replay_done")
        assert (True, len(changes)) == (done["complete"], done["changes"])

    async def test_a_checkpoint_without_read_to_replays_the_rest_of_the_file(
        self, tmp_path: Path
    ) -> None:
        """A checkpoint written before read_to existed: all of the file after the prefix
        may have been read, so all of it is the replay range."""
        changes = backlog(6000)
        source_path = write_lines(tmp_path / "in.jsonl", changes)
        checkpoint = tmp_path / "cp.json"
        crashed_checkpoint(checkpoint, source_path)
        run = await run_replay(
            tmp_path, JsonlSource(str(source_path), checkpoint=str(checkpoint)), len(changes)
        )
        assert [] == regressions(run.sim.history)
        assert expected(changes) == run.sim.contacts

    async def test_read_to_is_on_disk_before_lines_go_out(self, tmp_path: Path) -> None:
        """Before a read hands lines out, the checkpoint file says they may have been read
        (a crash at any moment after leaves a replay range that covers them)."""
        source_path = write_lines(tmp_path / "in.jsonl", backlog(6000))
        checkpoint = tmp_path / "cp.json"
        source = JsonlSource(str(source_path), checkpoint=str(checkpoint))
        await source.open()
        try:
            records = await source.read()
            assert records
            saved = orjson.loads(checkpoint.read_bytes())
            assert (0, 0) == (saved["line"], saved["offset"])
            assert saved["read_to"] >= source.progress.offset + sum(
                len(line) + 1 for _, line in records
            )
        finally:
            await source.close()

    async def test_a_range_beyond_max_waiting_starts_sending_and_says_so(
        self, tmp_path: Path
    ) -> None:
        """A replay range longer than twice max-waiting cannot be held whole: once that is
        reached sending starts (the documented limit), the run still drains, and the hold's
        end is logged incomplete."""
        changes = backlog(3000)
        source_path = write_lines(tmp_path / "in.jsonl", changes)
        checkpoint = tmp_path / "cp.json"
        crashed_checkpoint(checkpoint, source_path, read_to=source_path.stat().st_size)
        run = await run_replay(
            tmp_path,
            JsonlSource(str(source_path), checkpoint=str(checkpoint)),
            len(changes),
            engine_settings=settings(batch=10, concurrency=4, max_waiting=500),
            until_acked=False,
        )
        assert Ending.DRAINED == run.result.ending
        assert expected(changes) == run.sim.contacts
        [done] = run.events("source.replay_done")
        assert False is done["complete"]
        assert 1000 <= done["changes"] < len(changes)


class TestFollowedCheckpoint:
    async def test_a_quiet_followed_file_saves_the_last_acknowledgements(
        self, tmp_path: Path
    ) -> None:
        """Acks held back by the save interval reach the checkpoint while the followed file is
        quiet (the reader polls), not only at the next ack or at close."""
        path = tmp_path / "in.jsonl"
        path.write_bytes(b'{"ID": 1, "lastname": "a"}\n{"ID": 2, "lastname": "b"}\n')
        checkpoint = tmp_path / "cp.json"
        source = JsonlSource(
            str(path), follow=True, checkpoint=str(checkpoint), checkpoint_interval_s=0.05
        )
        await source.open()
        try:
            records = await source.read()
            assert records is not None and 2 == len(records)
            await source.ack([records[0][0]])  # saved: the first save of the run
            await source.ack([records[1][0]])  # within the interval: held back
            with anyio.move_on_after(10):
                async with anyio.create_task_group() as group:
                    group.start_soon(source.read)  # waits at the end of the file, polling
                    for _ in range(500):  # polled: the file on disk is what changes
                        if orjson.loads(checkpoint.read_bytes())["line"] == 2:
                            break
                        await anyio.sleep(0.02)
                    group.cancel_scope.cancel()
            assert 2 == orjson.loads(checkpoint.read_bytes())["line"]
        finally:
            await source.close()
