"""The engine against the simulated gateway over real sockets on 127.0.0.1."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.engine.harness import expected_state, run_engine, settings
from worker.engine import Ending
from worker.sim.gateway import SimConfig

pytestmark = pytest.mark.anyio


def stream(n: int, ids: int, seed: int = 7, unknown: frozenset[int] = frozenset()) -> list[Any]:
    """n changes over IDs 1..ids (plus unknown ones), each carrying a per-ID sequence number."""
    rng = random.Random(seed)
    pool = list(range(1, ids + 1)) + sorted(unknown)
    seq: dict[int, int] = {}
    out = []
    for _ in range(n):
        i = rng.choice(pool)
        seq[i] = seq.get(i, 0) + 1
        change: dict[str, Any] = {"ID": i if rng.random() < 0.5 else str(i), "extra1": str(seq[i])}
        if rng.random() < 0.5:
            change["lastname"] = rng.choice(["Lee", "Peeters", "Maes", ""])
        out.append(change)
    return out


def lines_named(source: str) -> int:
    """How many lines a dead letter's ``source`` stands for: ``in.jsonl:17,40`` two, and
    ``in.jsonl:17,40 (3 more merged between)`` five."""
    where, _, more = source.partition(" (")
    lines = len(where.split(":")[1].split(","))
    return lines + (int(more.split()[0]) if more else 0)


def applied_in_order(history: dict[str, list[dict[str, Any]]]) -> bool:
    """Per ID, the sequence numbers the API applied never go backwards."""
    for objs in history.values():
        seqs = [int(o["extra1"]) for o in objs if "extra1" in o]
        if seqs != sorted(seqs):
            return False
    return True


class TestDrain:
    async def test_every_change_applied_in_order(self, tmp_path: Path) -> None:
        """A finite input ends drained; the API holds every contact's last-written values."""
        changes = stream(2000, 150)
        run = await run_engine(
            tmp_path, changes, SimConfig(known_count=150, latency="exp:2", record_history=True)
        )
        assert Ending.DRAINED == run.result.ending
        assert expected_state(changes) == run.sim.contacts
        assert applied_in_order(run.sim.history)
        assert 0 == run.sim.stats.overlapping_id_requests
        assert [] == run.dead
        assert 2000 == run.engine.stats.acked

    async def test_coalescing_sends_each_id_once_per_request(self, tmp_path: Path) -> None:
        """Changes that wait together merge; fewer contacts are sent than changes read."""
        changes = stream(3000, 20)
        run = await run_engine(
            tmp_path,
            changes,
            SimConfig(known_count=20, latency="5"),
            settings(batch=100, linger_s=0.05, concurrency=2),
        )
        assert expected_state(changes) == run.sim.contacts
        assert run.sim.stats.contacts_applied < 3000
        assert 0 == run.sim.stats.duplicate_ids_in_a_request
        assert 3000 == run.engine.stats.acked


class TestIsolation:
    async def test_unknown_ids_dead_lettered_valid_ones_applied(self, tmp_path: Path) -> None:
        """A 404 batch is split; known contacts are applied, every unknown-ID change is
        dead-lettered not_found with the API's answer, and later batches are not poisoned."""
        unknown = frozenset({1001, 1002, 1003, 1500})
        changes = stream(1500, 200, unknown=unknown)
        run = await run_engine(
            tmp_path, changes, SimConfig(known_count=200, record_history=True), settings(batch=20)
        )
        known_changes = [c for c in changes if int(c["ID"]) <= 200]
        lost = [c for c in changes if int(c["ID"]) > 200]
        assert expected_state(known_changes) == run.sim.contacts
        assert applied_in_order(run.sim.history)
        # A file without a checkpoint: a merged change's dead letter names its first and last
        # line, and how many more merged between them.
        assert len(lost) == sum(lines_named(d["source"]) for d in run.dead)
        assert {"not_found"} == {d["reason"] for d in run.dead}
        assert {404} == {d["status"] for d in run.dead}
        assert {str(i) for i in unknown} == {str(d["change"]["ID"]) for d in run.dead}
        assert run.engine.scheduler.stats.isolation_requests > 0
        assert 1500 == run.engine.stats.acked

    async def test_rejected_change_isolated(self, tmp_path: Path) -> None:
        """A batch-level 400 (a change the API rejects) is split; the culprit is dead-lettered
        `rejected` with the API's error code and message, the rest is applied."""
        changes: list[Any] = [{"ID": i, "lastname": f"n{i}"} for i in range(1, 41)]
        # Valid for the worker's validator, refused by the API's stricter phone check.
        changes[17] = {"ID": 18, "phone": "call me maybe"}
        run = await run_engine(
            tmp_path, changes, SimConfig(known_count=100), settings(batch=40, linger_s=0.5)
        )
        assert 1 == len(run.dead)
        letter = run.dead[0]
        assert ("rejected", 400, "139") == (letter["reason"], letter["status"], letter["error"])
        assert "phone" in letter["detail"]
        assert "in.jsonl:18" == letter["source"]
        assert 39 == len(run.sim.contacts)

    async def test_invalid_lines_dead_lettered_and_processing_goes_on(self, tmp_path: Path) -> None:
        """Bad JSON, unknown fields, null, a bad date: dead-lettered `invalid`, never sent."""
        changes: list[Any] = [
            {"ID": 1, "lastname": "Lee"},
            b'{"ID": 2, "lastname": ',
            {"ID": 3, "nickname": "x"},
            {"ID": 4, "lastname": None},
            {"ID": 5, "birthday": "2026-02-30"},
            {"ID": 6, "firstname": "Ann"},
        ]
        run = await run_engine(tmp_path, changes, SimConfig(known_count=10))
        assert {"1": {"lastname": "Lee"}, "6": {"firstname": "Ann"}} == run.sim.contacts
        by_source = {d["source"]: d for d in run.dead}
        assert {"in.jsonl:2", "in.jsonl:3", "in.jsonl:4", "in.jsonl:5"} == set(by_source)
        assert {"invalid"} == {d["reason"] for d in run.dead}
        assert by_source["in.jsonl:2"]["raw"] == '{"ID": 2, "lastname": '
        assert "nickname" in by_source["in.jsonl:3"]["detail"]
        assert "2026-02-30" in by_source["in.jsonl:5"]["detail"]
        assert 6 == run.engine.stats.acked


class TestTransient:
    async def test_rate_limited_api_429_with_retry_after(self, tmp_path: Path) -> None:
        """Answers 429 + Retry-After are retried after the wait; nothing is lost."""
        changes = stream(200, 200, seed=3)
        run = await run_engine(
            tmp_path,
            changes,
            SimConfig(known_count=200, rate_limit=40),
            settings(batch=2, rate=0.0, concurrency=4),
        )
        assert run.sim.stats.by_status.get(429, 0) > 0
        assert expected_state(changes) == run.sim.contacts
        assert [] == run.dead

    async def test_5xx_storm_and_dropped_connections(self, tmp_path: Path) -> None:
        """Half the requests fail (503, 400/105, dropped connections): all retried, all applied,
        per-ID order kept."""
        changes = stream(1500, 400, seed=5)
        config = SimConfig(
            known_count=400, transient_error_rate=0.35, drop_rate=0.15, record_history=True
        )
        run = await run_engine(tmp_path, changes, config, settings(batch=5))
        assert Ending.DRAINED == run.result.ending
        assert expected_state(changes) == run.sim.contacts
        assert applied_in_order(run.sim.history)
        assert run.engine.scheduler.stats.retries > 0
        assert run.sim.stats.dropped > 0
        assert [] == run.dead

    async def test_413_shrinks_batches(self, tmp_path: Path) -> None:
        """An API that takes at most 7 objects per request: batches shrink, all is applied."""
        changes = stream(500, 200, seed=11)
        run = await run_engine(
            tmp_path,
            changes,
            SimConfig(known_count=200, max_array=7),
            settings(batch=50, linger_s=0.05),
        )
        assert expected_state(changes) == run.sim.contacts
        assert run.engine.scheduler.ceiling <= 7
        assert [] == run.dead

    async def test_max_retries_gives_up_fatally(self, tmp_path: Path) -> None:
        """With --max-retries, an API that never recovers ends the run fatally, unacked."""
        run = await run_engine(
            tmp_path, stream(20, 20), SimConfig(transient_error_rate=1.0), settings(max_retries=2)
        )
        assert Ending.FATAL == run.result.ending
        assert 0 == run.engine.stats.acked


class TestAuth:
    @pytest.mark.parametrize("auth_status", [401, 400])
    async def test_refused_credentials_stop_everything(
        self, tmp_path: Path, auth_status: int
    ) -> None:
        """Code 104 under 401 or 400: the run stops at once with AUTH, a few requests at most,
        nothing acknowledged, nothing dead-lettered."""
        run = await run_engine(
            tmp_path,
            stream(500, 100),
            SimConfig(auth_status=auth_status),
            settings(concurrency=4),
            client_secret="wrong",
            checkpoint=True,
        )
        assert Ending.AUTH == run.result.ending
        assert run.result.verdict is not None and "104" == run.result.verdict.error
        assert run.sim.stats.requests <= 4
        assert 0 == run.engine.stats.acked
        assert [] == run.dead
        # The checkpoint says how far was read (DESIGN 9); its acknowledged prefix is empty.
        checkpoint = orjson.loads((tmp_path / "cp.json").read_bytes())
        assert (0, 0) == (checkpoint["line"], checkpoint["offset"])
        assert checkpoint["read_to"] >= (tmp_path / "in.jsonl").stat().st_size

    async def test_account_disabled_is_fatal(self, tmp_path: Path) -> None:
        """A 403 with code 116 (access disabled) stops the run with AUTH."""
        run = await run_engine(tmp_path, stream(50, 10), SimConfig(disabled_code="116"))
        assert Ending.AUTH == run.result.ending
        assert "116" in run.result.message


class TestCheckpoint:
    async def test_checkpoint_marks_the_acked_prefix(self, tmp_path: Path) -> None:
        """After a drained run the checkpoint points at the end of the file."""
        changes = stream(100, 10)
        run = await run_engine(tmp_path, changes, SimConfig(known_count=10), checkpoint=True)
        assert run.source is not None
        size = (tmp_path / "in.jsonl").stat().st_size
        assert size == run.source.progress.offset
        assert size == orjson.loads((tmp_path / "cp.json").read_bytes())["offset"]

    async def test_a_resume_says_where_it_starts(self, tmp_path: Path) -> None:
        """Opening a jsonl: source whose checkpoint is past the top logs `source.resumed` with
        the first line it reads (1-based, as dead letters count) and its byte offset; a fresh
        start (no checkpoint yet) logs nothing of the kind."""
        import orjson
        import structlog

        from worker.backends.jsonl.source import JsonlSource

        path, checkpoint = tmp_path / "in.jsonl", tmp_path / "cp.json"
        lines = [orjson.dumps(change) + b"\n" for change in stream(5, 5)]
        path.write_bytes(b"".join(lines))
        offset = len(lines[0]) + len(lines[1]) + len(lines[2])

        async def opened() -> list[dict[str, Any]]:
            source = JsonlSource(str(path), checkpoint=str(checkpoint))
            with structlog.testing.capture_logs() as logs:
                await source.open()
            await source.close()
            return [entry for entry in logs if entry["event"] == "source.resumed"]

        assert [] == await opened()
        body = {"path": str(path), "line": 3, "offset": offset}
        checkpoint.write_bytes(orjson.dumps(body))
        expected = {"path": str(path), "checkpoint": str(checkpoint), "line": 4, "offset": offset}
        assert [expected] == [{key: entry[key] for key in expected} for entry in await opened()]
