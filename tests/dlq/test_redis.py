"""``dlq show`` and ``dlq replay`` on a Redis dead-letter stream (the real Redis on 6379)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import redis

from tests.cli.test_cli import Gateway
from tests.dlq.conftest import (
    CHANGES,
    DEAD,
    MISSING,
    REDIS,
    Dlq,
    applied_after_replay,
    applied_first,
    input_bytes,
    run_worker,
    tally,
)
from worker.backends.redis import producer as redis_enqueue
from worker.core.partition import partition_of


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the shared Redis."""
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def stream(client: redis.Redis) -> Iterator[str]:
    """A stream name of this test's own; every key under it is deleted afterwards."""
    name = f"dlqtest:{uuid.uuid4().hex[:12]}"
    yield name
    keys = list(client.scan_iter(match=f"{name}*", count=1000))
    if keys:
        client.delete(*keys)


def add_letters(client: redis.Redis, dead: str, letters: list[dict[str, object]]) -> None:
    for letter in letters:
        client.xadd(dead, {"letter": json.dumps(letter)})


class TestRoundTrip:
    @pytest.mark.slow
    def test_show_replay_run_again(
        self, dlq: Dlq, gateway: Gateway, client: redis.Redis, stream: str, tmp_path: Path
    ) -> None:
        """A real run leaves its dead letters in `<stream>:dead`; `show` counts them; once the
        contacts exist `replay --reason not_found` puts them back into the stream, the next run
        applies them, the hash beside the stream marks them, and a second replay sends none."""
        uri = f"{REDIS}?stream={stream}&consumer=dlq-test&claim_idle_s=1"
        anyio.run(redis_enqueue.enqueue, uri, input_bytes().splitlines())
        dead = f"{stream}:dead"
        run_worker(
            gateway,
            tmp_path,
            uri,
            lambda: client.xlen(stream) == 0 and client.xlen(dead) == 8,
        )
        assert applied_first() == gateway.get("/_sim/contacts")

        summary = dlq("show", uri, "--json").json()
        assert (DEAD, 8, 0, 6) == tally(summary)
        assert summary["store"].endswith(dead)

        gateway.configure(known_count=200)
        report = dlq("replay", uri, "--to", uri, "--reason", "not_found", "--json").json()
        assert ({"not_found": 5}, {"invalid": 1}) == (report["replayed"], report["without_change"])
        assert 5 == client.xlen(stream)
        assert 5 == client.hlen(f"{dead}:replayed")
        assert not client.exists(f"{dead}:replaying")  # the lock is gone

        run_worker(
            gateway,
            tmp_path,
            uri,
            lambda: (
                client.xlen(stream) == 0 and gateway.get("/_sim/contacts") == applied_after_replay()
            ),
        )
        again = dlq("replay", uri, "--to", uri, "--reason", "not_found", "--json").json()
        assert ({}, {"not_found": 5}) == (again["replayed"], again["already_replayed"])
        assert 0 == client.xlen(stream)
        assert 5 == dlq("show", uri, "--json").json()["replayed"]


class TestReplay:
    def test_into_a_partitioned_input(self, dlq: Dlq, client: redis.Redis, stream: str) -> None:
        """Replayed into `partitions=3`, each change lands in its contact's partition stream
        (the enqueue writer's hash), in dead-letter order; `dead_stream=` names the letters."""
        letters = [
            {"reason": "not_found", "change": change, "at": "2026-11-26T14:00:00Z"}
            for change in MISSING
        ]
        add_letters(client, f"{stream}:letters", letters)
        source = f"{REDIS}?stream={stream}&dead_stream={stream}:letters"
        target = f"{REDIS}?stream={stream}:in&partitions=3"
        report = dlq("replay", source, "--to", target, "--json").json()
        assert {"not_found": 5} == report["replayed"]
        for p in range(3):
            entries = client.xrange(f"{stream}:in:{p}")
            expected = [c for c in MISSING if partition_of(str(c["ID"]), 3) == p]
            assert expected == [json.loads(fields[b"change"]) for _, fields in entries]

    def test_letters_written_during_a_replay_wait_for_the_next(
        self, dlq: Dlq, client: redis.Redis, stream: str
    ) -> None:
        """The end is fixed when the replay starts: a replay into the stream whose worker
        dead-letters the changes again cannot go round in circles."""
        dead = f"{stream}:dead"
        add_letters(client, dead, [{"reason": "not_found", "change": c} for c in CHANGES[:3]])
        uri = f"{REDIS}?stream={stream}"
        assert 3 == sum(dlq("replay", uri, "--to", uri, "--json").json()["replayed"].values())
        add_letters(client, dead, [{"reason": "not_found", "change": CHANGES[3]}])
        report = dlq("replay", uri, "--to", uri, "--json").json()
        assert ({"not_found": 1}, {"not_found": 3}) == (
            report["replayed"],
            report["already_replayed"],
        )

    def test_a_second_replay_at_once_is_refused(
        self, dlq: Dlq, client: redis.Redis, stream: str
    ) -> None:
        """While another replay holds `<dead>:replaying`, a replay exits 1 and sends nothing."""
        add_letters(client, f"{stream}:dead", [{"reason": "not_found", "change": MISSING[0]}])
        client.set(f"{stream}:dead:replaying", "someone", px=10_000)
        uri = f"{REDIS}?stream={stream}"
        result = dlq("replay", uri, "--to", uri)
        assert 1 == result.code
        assert "another `dlq replay`" in result.stderr
        assert 0 == client.xlen(stream)

    def test_a_lock_taken_over_meanwhile_stops_the_replay(
        self, client: redis.Redis, stream: str
    ) -> None:
        """Between two pages the lock ran out and another replay took it: the first stops
        (StoreBusy) instead of renewing the other's lock and sending the same letters."""
        from worker.backends import open_store
        from worker.deadletters.store import StoreBusy

        add_letters(
            client, f"{stream}:dead", [{"reason": "not_found", "change": c} for c in MISSING]
        )

        async def two_pages() -> None:
            store = open_store(f"{REDIS}?stream={stream}")
            await store.open(replay=True)
            try:
                assert await store.read(1)
                client.set(f"{stream}:dead:replaying", "another replay", px=10_000)
                with pytest.raises(StoreBusy, match="lock ran out"):
                    await store.read(1)
            finally:
                await store.close()

        anyio.run(two_pages)
        assert b"another replay" == client.get(f"{stream}:dead:replaying")  # left alone

    def test_a_key_that_is_not_a_stream(self, dlq: Dlq, client: redis.Redis, stream: str) -> None:
        """A dead-letter key of another type is a clear error, exit 2."""
        client.set(f"{stream}:dead", "x")
        result = dlq("show", f"{REDIS}?stream={stream}")
        assert 2 == result.code
        assert "not a stream" in result.stderr
